"""Tests of bench/ (bench/bench.py and its parts): the analytic FLOP counts against torch's
FlopCounterMode, the command line, a quick run of every section, the devinterp column in its own
environment (only torch, numpy, devinterp and model.py there), the memory of an LLC sweep over 50
checkpoints against one, and the shape of the code (lines, functions)."""
import ast
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT

BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))  # bench/'s modules import each other by name, as when run there

import bench  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import report  # noqa: E402
from fast import icl_loss_and_grads  # noqa: E402
from model import ICLConfig  # noqa: E402

PEERS = os.path.join(ROOT, "peers")


SMALL = ICLConfig(n_layer=3, K=5, d_model=32, d_mlp=48, n_head=2)


@pytest.mark.parametrize("cfg", [ICLConfig(), SMALL])
def test_flop_counts_match_torch_flop_counter(cfg):
    model, task, B = cfg.build(0), data.Task(K=cfg.K), 4
    xs, ys = task.sample(torch.Generator().manual_seed(0), B)
    with FlopCounterMode(display=False) as fc:
        task.loss(model(task.model_input(xs, ys)), ys)
    assert fc.get_total_flops() == bench.icl_flops(cfg, B, backward=False)
    with FlopCounterMode(display=False) as fc:
        task.loss(model(task.model_input(xs, ys)), ys).backward()
    assert fc.get_total_flops() == bench.icl_flops(cfg, B)
    params = {k: v.detach()[None] for k, v in model.named_parameters()}
    def baddbmm_(s, a, b, *args, out_shape=None, **kw):
        """The counter has no formula for the in-place baddbmm_ (the hand-derived per-head sums):
        the out-of-place one's."""
        return flop_counter.bmm_flop(a, b)
    mapping = {torch.ops.aten.baddbmm_: baddbmm_}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        icl_loss_and_grads(cfg, params, xs[None], ys[None])
    assert fc.get_total_flops() == bench.icl_flops(cfg, B, sliced=True)
    ratio = bench.icl_flops(ICLConfig(), 1, sliced=True) / bench.icl_flops(ICLConfig(), 1)
    assert 0.8 < ratio < 0.85


def test_help_lists_every_option_and_a_bad_option_is_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as ok:
        bench.main(["--help"])
    lines = {ln.split()[0].split("=")[0]: ln
             for ln in capsys.readouterr().out.splitlines() if ln.startswith("  --")}
    assert ok.value.code == 0 and set(lines) == {f"--{k}" for k in bench.DEFAULTS}
    # every option has its meaning
    assert all(len(ln.split("  ", 2)[-1].strip()) > 5 for ln in lines.values())
    with pytest.raises(SystemExit) as bad:
        bench.main(["--draw=3"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and len(err.strip().splitlines()) == 1 and "draws" in err


def test_bench_runs_as_a_script_from_any_folder(tmp_path):
    """`python bench/bench.py` finds the top-level modules and its own, wherever it starts."""
    def run(*args):
        return subprocess.run([sys.executable, str(BENCH / "bench.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True)
    ok, bad = run("--help"), run("--draw=3")
    assert ok.returncode == 0 and "--devinterp_path=" in ok.stdout, ok.stderr
    assert bad.returncode == 2 and bad.stderr.startswith("bench/bench.py: "), bad.stderr


def imports(source):
    """The top-level module names a piece of source imports."""
    return {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
            for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names}


def test_the_devinterp_worker_needs_only_torch_devinterp_and_model_py_and_bench_not_train():
    stdlib = set(sys.stdlib_module_names)
    worker = imports((BENCH / "devinterp_worker.py").read_text())
    assert worker - stdlib == {"torch", "devinterp", "model"}
    assert imports((ROOT / "model.py").read_text()) - stdlib == {"torch"}
    assert not [p.name for p in BENCH.glob("*.py") if "train" in imports(p.read_text())]


def test_bench_lines_and_functions_are_short():
    """At most 100 characters a line and 60 lines a function, in bench/'s files and this one."""
    files = [p for p in sorted(BENCH.iterdir()) if p.suffix in (".py", ".sh")]
    long_lines, long_functions = [], []
    for p in files + [ROOT / "tests" / "test_bench.py"]:
        text = p.read_text()
        long_lines += [f"{p.name}:{i}" for i, ln in enumerate(text.splitlines(), 1)
                       if len(ln) > 100]
        if p.suffix == ".py":
            long_functions += [f"{p.name}:{n.name}" for n in ast.walk(ast.parse(text))
                               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                               and n.end_lineno - n.lineno + 1 > 60]
    assert len(files) >= 5 and not long_lines and not long_functions, (long_lines, long_functions)


@pytest.fixture
def l2h4_run(tmp_path):
    cfg = dict(D=4, K=8, sigma2=0.125, num_tasks=0, task_seed=0, n_layer=2, n_head=4, d_model=64,
               d_mlp=64, seed=0)
    common.atomic_write(tmp_path / "run" / "config.json", json.dumps(cfg))
    common.save_checkpoint(tmp_path / "run", 5, data.build_model(cfg, 0))
    return tmp_path / "run"


def test_quick_bench_prints_every_table_and_skips_a_missing_devinterp(tmp_path, capsys):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    res = bench.main(["--quick", "--sections=peak,train,sgld", "--threads=1,2", "--nbeta=50",
                      "--devinterp_python=/nonexistent/python", f"--md={md}", f"--json={js}"])
    out = capsys.readouterr().out
    assert "devinterp skipped" in out and "| ours (sgld.py, native_loop) | 1 |" in out
    assert "| train.py --fast_grad=auto (hand-derived here) |" in out and "fp32 matmul peak" in out
    assert "| train.py --fast_grad=False (autograd) |" in out
    assert set(res["sgld"]["table"]) == {"ours@1", "plain@1", "ours@2", "plain@2"}
    assert "| ours (sgld.py, native_loop) | 2 |" in out and set(res["sgld"]["peaks"]) == {1, 2}
    assert res["peak"] > 0 and all(v > 0 for v in res["train"]["steps_per_s"].values())
    # the presets are defaults: given options win
    assert res["config"]["n"] == bench.QUICK["n"] and res["config"]["nbeta"] == 50
    head = "# Benchmark (bench/bench.py)\n\n`python bench/bench.py --quick"
    assert md.read_text().startswith(head)
    assert json.loads(js.read_text())["sgld"]


def test_observe_section_times_the_probes_beside_the_plain_estimate(l2h4_run, capsys):
    res = bench.main(["--quick", "--sections=observe", f"--ckpt={l2h4_run}", "--rounds=2"])
    o = res["observe"]
    assert len(o["times"]["plain"]) == len(o["times"]["probes"]) == 2 and o["ratio"] > 0
    assert f"{o['ratio']:.2f}x the plain estimate's sampling time" in capsys.readouterr().out


def devinterp_column(run, *extra):
    res = bench.main(["--quick", "--sections=sgld", f"--ckpt={run}", "--draws=3", "--burnin=1",
                      "--threads=1", *extra])
    t = res["sgld"]["table"]
    assert res["sgld"]["notes"] == [] and t["devinterp@1"]["version"] == "1.3.2"
    assert t["devinterp@1"]["chain_steps_per_s"] > 0 and t["devinterp@1"]["chains"] == 2


DEVINTERP_PY = bench.DEFAULTS["devinterp_python"]
NO_PEERS = not os.path.isdir(os.path.join(PEERS, "devinterp"))


@pytest.mark.skipif(not os.path.exists(DEVINTERP_PY),
                    reason=f"no devinterp environment at {DEVINTERP_PY}")
def test_devinterp_column_runs_in_its_own_environment(l2h4_run):
    """devinterp's venv holds only torch, numpy and devinterp (the project's other dependencies
    are absent)."""
    devinterp_column(l2h4_run, f"--devinterp_python={DEVINTERP_PY}", "--devinterp_path=")


@pytest.mark.skipif(NO_PEERS, reason="no peers/ folder (.ci/peers makes it)")
def test_devinterp_column_from_its_source_on_this_python(l2h4_run):
    """The GPU machine's way (no pip there): devinterp's source folder on the path of the running
    python."""
    devinterp_column(l2h4_run, "--devinterp_python=/nonexistent/python",
                     f"--devinterp_path={PEERS}")


def test_diverged_chains_are_counted_and_stop_the_comparison():
    """A diverged chain's LLC is NaN: a round's line gives the finite chains' mean and how many
    diverged (a plain mean was NaN), a table row says how many, and means over survivors are not
    compared in standard errors."""
    nan, inf = float("nan"), float("inf")
    assert bench.llc_text([1.0, nan, 3.0, inf]) == "llc 2.00 (2 of 4 chains diverged)"
    assert bench.llc_text([1.0, 3.0]) == "llc 2.00"
    assert bench.llc_text([nan, nan]) == "llc - (all 2 chains diverged)"
    ours, plain = bench.chain_stats([160.0, nan, 162.0]), bench.chain_stats([167.0, 168.0, 169.0])
    assert (ours["mean"], ours["chains"], ours["diverged"], plain["diverged"]) == (161.0, 2, 1, 0)
    assert report.diverged(ours) == "; 1 of 3 chains diverged" and report.diverged(plain) == ""
    assert "not compared" in report.compare("plain@1", ours, plain)
    same = report.compare("plain@1", plain, plain)
    assert same.endswith("+0.00 = +0.00 combined standard errors")
    assert bench.chain_stats([nan])["chains"] == 0


@pytest.mark.skipif(NO_PEERS, reason="no peers/ folder (.ci/peers makes it)")
def test_diverging_chains_keep_every_column(l2h4_run, capsys):
    """The GPU run's failure: at an unstable step size devinterp raises at a chain's first NaN loss
    (ending its whole estimate) and ours raises when all chains diverge. Now every sampler's column
    stays, its chains counted as diverged; devinterp's chain stops at its first NaN draw."""
    model = data.load_model(l2h4_run, 5)
    task = data.Task()
    xs, ys = task.sample(torch.Generator().manual_seed(0), 256)
    cfg = {**bench.DEFAULTS, **bench.QUICK, "devinterp_path": PEERS, "burnin": 2, "draws": 5,
           "nbeta": 1e7}
    dv, msg = bench.run_devinterp(cfg, "cpu", model, task.model_input(xs, ys), ys, 1.0, 0, 1)
    assert msg is None and all(math.isnan(x) for x in dv["per_chain"])
    assert dv["steps"] == 2 * (2 + 1)  # 2 chains x (burn-in + the step of draw 0)
    res = bench.main(["--quick", "--sections=sgld", f"--ckpt={l2h4_run}", "--draws=3", "--burnin=1",
                      "--threads=1", "--nbeta=1e7", "--devinterp_python=/nonexistent/python",
                      f"--devinterp_path={PEERS}"])
    out, err = capsys.readouterr()
    t = res["sgld"]["table"]
    assert res["sgld"]["notes"] == [] and [v["diverged"] for v in t.values()] == [2, 2, 2]
    assert set(t) == {"ours@1", "plain@1", "devinterp@1"} and "llc nan" not in err
    assert "| devinterp 1.3.2 | 1 |" in out and "not compared, chains diverged" in out


def test_llc_sweep_memory_does_not_grow_with_the_number_of_checkpoints(tmp_path):
    """Peak RSS of llc.py over 50 checkpoints is within 1.5x of that over one (it holds one
    checkpoint and its chains at a time; the rows go to the file)."""
    cfg = dict(D=4, K=4, sigma2=0.125, num_tasks=0, task_seed=0, n_layer=1, n_head=2, d_model=16,
               d_mlp=16, seed=0)
    bench.make_sweep_run(str(tmp_path), data.build_model(cfg, 0), 50, cfg)
    extra = ["--num_chains=4", "--batch_size=64", "--num_burnin=0", "--num_draws=2", "--n=64",
             "--device=cpu"]
    one = bench.sweep_maxrss(str(tmp_path), [0], extra)
    many = bench.sweep_maxrss(str(tmp_path), list(range(50)), extra)
    print(f"\npeak RSS: 1 checkpoint {one:.0f} MB, 50 checkpoints {many:.0f} MB, "
          f"ratio {many / one:.3f}")
    assert len(common.read_jsonl(tmp_path / "mem_50.jsonl")) == 50
    assert many / one <= 1.5
