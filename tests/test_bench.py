"""Tests of bench.py: the analytic FLOP counts against torch's FlopCounterMode, a quick run of every section (the
devinterp column skipped when its environment is absent, and run when it is there), and the memory of an LLC
sweep over 50 checkpoints against one."""
import json
import os

import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import bench
import common
import llc
from data import Task, to_tokens
from model import ICLConfig, build_model


@pytest.mark.parametrize("cfg", [ICLConfig(), ICLConfig(n_layer=3, K=5, d_model=32, d_mlp=48, n_head=2)])
def test_flop_counts_match_torch_flop_counter(cfg):
    model, task, B = build_model(cfg, 0), Task(K=cfg.K), 4
    xs, ys = task.sample(torch.Generator().manual_seed(0), B)
    with FlopCounterMode(display=False) as fc:
        task.loss(model(to_tokens(xs, ys)), ys)
    assert fc.get_total_flops() == bench.icl_flops(cfg, B, backward=False)
    with FlopCounterMode(display=False) as fc:
        task.loss(model(to_tokens(xs, ys)), ys).backward()
    assert fc.get_total_flops() == bench.icl_flops(cfg, B)
    params = {k: v.detach()[None] for k, v in model.named_parameters()}
    # the counter has no formula for the in-place baddbmm_ (the per-head sums of icl_grad): the out-of-place one's
    baddbmm_ = lambda s, a, b, *args, out_shape=None, **kw: flop_counter.bmm_flop(a, b)  # noqa: E731
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: baddbmm_}) as fc:
        llc.icl_loss_and_grads(cfg, params, xs[None], ys[None])
    assert fc.get_total_flops() == bench.icl_flops(cfg, B, sliced=True)
    assert 0.8 < bench.icl_flops(ICLConfig(), 1, sliced=True) / bench.icl_flops(ICLConfig(), 1) < 0.85


@pytest.fixture
def l2h4_run(tmp_path):
    cfg = dict(D=4, K=8, sigma2=0.125, num_tasks=0, task_seed=0, n_layer=2, n_head=4, d_model=64, d_mlp=64, seed=0)
    common.atomic_write(tmp_path / "run" / "config.json", json.dumps(cfg))
    common.save_checkpoint(tmp_path / "run", 5, build_model(common.model_config(cfg), 0))
    return tmp_path / "run"


def test_quick_bench_prints_every_table_and_skips_a_missing_devinterp(tmp_path, capsys):
    md = tmp_path / "bench.md"
    res = bench.main(["--quick", "--sections=peak,train,sgld", "--devinterp_python=/nonexistent/python",
                      "--threads=1,2",
                      f"--md={md}", f"--json={tmp_path / 'bench.json'}"])
    out = capsys.readouterr().out
    assert "devinterp skipped" in out and "| ours (llc.py, native_loop) | 1 |" in out
    assert "| train.py (train.train) |" in out and "fp32 matmul peak" in out
    assert set(res["sgld"]["table"]) == {"ours@1", "plain@1", "ours@2", "plain@2"} and res["peak"] > 0
    assert "| ours (llc.py, native_loop) | 2 |" in out and set(res["sgld"]["peaks"]) == {1, 2}
    assert all(v > 0 for v in res["train"]["steps_per_s"].values())
    assert md.read_text().startswith("# Benchmark") and json.loads((tmp_path / "bench.json").read_text())["sgld"]


@pytest.mark.skipif(not os.path.exists(bench.DEFAULTS["devinterp_python"]),
                    reason=f"no devinterp environment at {bench.DEFAULTS['devinterp_python']}")
def test_devinterp_column_runs_in_its_own_environment(l2h4_run, capsys):
    res = bench.main(["--quick", "--sections=sgld", f"--ckpt={l2h4_run}", "--draws=3", "--burnin=1", "--threads=1"])
    t = res["sgld"]["table"]
    assert t["devinterp@1"]["chain_steps_per_s"] > 0 and t["devinterp@1"]["chains"] == 2
    assert t["devinterp@1"]["version"] == "1.3.2"


PEERS = os.path.join(os.path.dirname(bench.__file__), "peers")


@pytest.mark.skipif(not os.path.isdir(os.path.join(PEERS, "devinterp")), reason="no peers/ folder (.ci/peers makes it)")
def test_devinterp_column_from_its_source_on_this_python(l2h4_run):
    """The GPU machine's way (no pip there): devinterp's source folder on the path of the running python."""
    res = bench.main(["--quick", "--sections=sgld", f"--ckpt={l2h4_run}", "--draws=3", "--burnin=1", "--threads=1",
                      "--devinterp_python=/nonexistent/python", f"--devinterp_path={PEERS}"])
    t = res["sgld"]["table"]
    assert t["devinterp@1"]["chain_steps_per_s"] > 0 and t["devinterp@1"]["version"] == "1.3.2"


def test_llc_sweep_memory_does_not_grow_with_the_number_of_checkpoints(tmp_path):
    """Peak RSS of llc.py over 50 checkpoints is within 1.5x of that over one (it holds one checkpoint and its
    chains at a time; the rows go to the file)."""
    cfg = dict(D=4, K=4, sigma2=0.125, num_tasks=0, task_seed=0, n_layer=1, n_head=2, d_model=16, d_mlp=16, seed=0)
    model = build_model(common.model_config(cfg), 0)
    bench.make_sweep_run(str(tmp_path), model, 50, cfg)
    extra = ["--num_chains=4", "--batch_size=64", "--num_burnin=0", "--num_draws=2", "--n=64", "--device=cpu"]
    one = bench.sweep_maxrss(str(tmp_path), [0], extra)
    many = bench.sweep_maxrss(str(tmp_path), list(range(50)), extra)
    print(f"\npeak RSS: 1 checkpoint {one:.0f} MB, 50 checkpoints {many:.0f} MB, ratio {many / one:.3f}")
    assert len(common.read_jsonl(tmp_path / "mem_50.jsonl")) == 50
    assert many / one <= 1.5
