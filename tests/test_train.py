import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import data
import train
from conftest import ROOT

SMALL = ["--D=3", "--K=4", "--n_layer=1", "--n_head=2", "--d_model=16", "--d_mlp=16",
         "--batch_size=32", "--max_steps=400", "--n_log=30", "--n_lin=8", "--log_interval=25",
         "--eval_batch_size=64"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_train(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=ENV,
                          capture_output=True, text=True, **kw)


def test_lr_schedule_matches_the_reference_table():
    table = {0: 1.2e-8, 1_000: 1.2e-5, 40_000: 4.8e-4, 126_000: 1.512e-3, 249_999: 3.0e-3,
             320_000: 2.16e-3, 499_999: 4.8e-14}
    for step, want in table.items():
        assert train.lr_at(step, 3e-3, 500_000) == pytest.approx(want, rel=2e-3), step
    # against torch's own OneCycleLR on a short run
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=1000, pct_start=0.5,
                                                anneal_strategy="linear", div_factor=499,
                                                final_div_factor=499, cycle_momentum=False)
    for step in range(1000):
        assert train.lr_at(step, 3e-3, 1000) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9,
                                                              abs=1e-18)
        opt.step()
        sched.step()


def test_checkpoint_steps():
    s = train.checkpoint_steps(500_000)
    assert len(s) == 190 and s[0] == 0 and s[-1] == 499_999
    assert {0, 984, 40_292, 126_262, 318_181, 499_999} <= set(s)


def test_configure_errors(tmp_path):
    d = train.DEFAULTS
    cfg = common.configure(d, ["--lr=1", "--out_dir=out/x", "--compile=True", "--seed", "3",
                               "--tf32"])
    assert (cfg["lr"] == 1.0 and isinstance(cfg["lr"], float) and cfg["out_dir"] == "out/x"
            and cfg["compile"])
    assert cfg["seed"] == 3 and cfg["tf32"] is True
    # string keys are taken verbatim
    assert common.configure(d, ["--out_dir=123"])["out_dir"] == "123"
    with pytest.raises(common.ConfigError, match="unknown option 'lrr'.*did you mean lr"):
        common.configure(d, ["--lrr=1"])
    with pytest.raises(common.ConfigError, match="batch_size must be int"):
        common.configure(d, ["--batch_size=1.5"])
    with pytest.raises(common.ConfigError, match="expected --key=value"):
        common.configure(d, ["--seed"])
    bad = tmp_path / "bad.py"
    bad.write_text("lr = 1e-3\nwarmup = 5\n")
    with pytest.raises(common.ConfigError, match=f"unknown option 'warmup' in config file {bad}"):
        common.configure(d, [str(bad)])
    # every shipped config parses
    for f in ["L2H4.py", "L2H4K16.py", "L2H4M64.py", "tiny.py", "L2W256.py", "lm_tiny.py"]:
        os.chdir(ROOT)
        common.configure(train.defaults_for(train.task_in([f"configs/{f}"])), [f"configs/{f}"])
    assert common.configure(d, ["configs/L2H4K16.py"])["K"] == 16


def test_cli_reports_config_errors_before_work(tmp_path):
    r = run_train([*SMALL, f"--out_dir={tmp_path}/r", "--max_step=3"])
    assert (r.returncode == 2 and "unknown option 'max_step'" in r.stderr
            and r.stderr.count("\n") == 1)
    r = run_train([*SMALL, f"--out_dir={tmp_path}/r", "--optimizer=sgd"])
    assert (r.returncode == 2 and "optimizer must be one of adam, adamw" in r.stderr
            and r.stderr.count("\n") == 1)
    assert not (tmp_path / "r").exists()
    r = run_train(["--help"])
    assert r.returncode == 0 and all(f"--{k}=" in r.stdout for k in train.DEFAULTS)
    assert ("--K=8" in r.stdout and "pairs per context" in r.stdout
            and "--corpus='python'" in r.stdout)


def test_flags_without_a_config_file_mean_the_demo():
    """No config file: the defaults are the CPU demo's (configs/tiny.py), never the paper's
    500k-step run."""
    cfg = common.configure(train.DEFAULTS, ["--device=cpu"])
    tiny = common.read_config_file(ROOT / "configs" / "tiny.py")
    assert cfg["max_steps"] == 2000 and all(cfg[k] == v for k, v in tiny.items())


def test_micro_batches_give_the_whole_batch_gradient(tmp_path):
    """Gradient accumulation over micro-batches (memory) trains the same model as whole batches, up
    to rounding."""
    runs = {}
    for m in (0, 8):
        cfg = common.configure(train.DEFAULTS, [*SMALL, f"--out_dir={tmp_path}/m{m}", "--stop_at=3",
                                                f"--micro_batch={m}"])
        train.train(cfg)
        runs[m] = _final_params(tmp_path / f"m{m}")
    # the accumulation really ran
    assert any(not torch.equal(runs[0][k], runs[8][k]) for k in runs[0])
    for k in runs[0]:
        torch.testing.assert_close(runs[8][k], runs[0][k], rtol=1e-4, atol=1e-6)


def _final_params(out):
    return common.load_params(out, common.list_checkpoints(out)[-1])


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_train([*SMALL, f"--out_dir={ref}"], timeout=300).returncode == 0
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SMALL, f"--out_dir={cut}"],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mid = [s for s in train.checkpoint_steps(400, 30, 8) if s >= 100][0]
    target = common.ckpt_path(cut, mid)  # a mid-run checkpoint; kill soon after it appears
    t0 = time.time()
    while not target.exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = common.list_checkpoints(cut)[-1]
    assert killed_at < common.list_checkpoints(ref)[-1], (
        "the run finished before it could be killed")
    r = run_train([*SMALL, f"--out_dir={cut}"], timeout=300)
    assert r.returncode == 0 and "resuming" in r.stderr
    a, b = _final_params(ref), _final_params(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log has each eval step once, and the same values as the uninterrupted run
    # noqa: E731
    evals = lambda d: [r for r in common.read_jsonl(d / "log.jsonl") if r["kind"] == "eval"]
    steps = [r["step"] for r in evals(cut)]
    assert steps == sorted(set(steps)) == [r["step"] for r in evals(ref)]
    assert [r["loss"] for r in evals(cut)] == [r["loss"] for r in evals(ref)]


def test_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = common.configure(train.DEFAULTS, [*SMALL, f"--out_dir={out}", "--stop_at=30"])
    train.train(cfg)
    steps = common.list_checkpoints(out)
    last = common.ckpt_path(out, steps[-1])
    last.write_bytes(last.read_bytes()[:100])  # truncated
    with pytest.raises(common.CheckpointError, match=str(last)):
        common.load_params(out, steps[-1])
    with pytest.raises(common.CheckpointError, match="no checkpoint for step 7777"):
        common.load_params(out, 7777)
    # resuming skips the broken file, with a warning, and rewrites it
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        train.train({**cfg, "stop_at": 40})
    assert common.load_params(out, steps[-1]).keys() == (
        data.load_model(out, 0).state_dict().keys()
        - {k for k, _ in data.load_model(out, 0).named_buffers()})


def test_resume_refuses_a_different_config(tmp_path):
    cfg = common.configure(train.DEFAULTS, [*SMALL, f"--out_dir={tmp_path}", "--stop_at=2"])
    train.train(cfg)
    with pytest.raises(common.ConfigError, match="different config"):
        train.train({**cfg, "lr": 1e-2})


def test_checkpoint_holds_parameters_only(tmp_path):
    cfg = common.configure(train.DEFAULTS, [*SMALL, f"--out_dir={tmp_path}", "--stop_at=3"])
    train.train(cfg)
    params = common.load_params(tmp_path, 3)
    model = data.load_model(tmp_path, 3)
    assert set(params) == {k for k, _ in model.named_parameters()}
    assert json.loads((tmp_path / "config.json").read_text())["d_model"] == 16
    rows = common.read_jsonl(tmp_path / "log.jsonl")
    ev = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in ev] == [0, 1, 2, 3] and list(ev[0])[0] == "step"
    assert {"loss", "loss/4", "delta_ridge", "pred_norm", "icl_1_2", "icl_2_4", "ood_tasks/100",
            "weight_norm", "lr", "step_time"} <= set(ev[0])


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--standalone", str(ROOT / "train.py"), *SMALL, f"--out_dir={tmp_path}",
                        "--stop_at=12"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    grid = [s for s in train.checkpoint_steps(400, 30, 8) if s <= 12]
    assert 12 not in grid  # --stop_at off the grid: its step is saved too
    assert common.list_checkpoints(tmp_path) == grid + [12]
    ev = [r["step"] for r in common.read_jsonl(tmp_path / "log.jsonl") if r["kind"] == "eval"]
    assert ev == grid + [12]  # rank 0 alone wrote


@pytest.mark.slow
def test_tiny_demo_learns_in_context(tmp_path):
    """The CPU demo config must show ICL: final test loss < 2.3 (zero predictor 4.125, ridge 1.66).
    """
    cfg = common.configure(train.DEFAULTS,
                           [str(ROOT / "configs" / "tiny.py"), f"--out_dir={tmp_path}"])
    row = train.train(cfg)
    assert row["step"] == cfg["max_steps"] - 1 and row["loss"] < 2.3


def test_jsonl_torn_line(tmp_path):
    p = tmp_path / "x.jsonl"
    common.append_jsonl(p, {"step": 1})
    with open(p, "a") as f:
        f.write('{"step": 2, "lo')  # a kill mid-write
    with pytest.warns(UserWarning, match="incomplete"):
        assert common.read_jsonl(p) == [{"step": 1}]
    with pytest.warns(UserWarning, match="dropped"):
        common.append_jsonl(p, {"step": 3})
    assert common.read_jsonl(p) == [{"step": 1}, {"step": 3}]


def test_training_fast_path_equals_autograd_and_falls_back_on_an_edited_model(
        tmp_path, monkeypatch, recwarn):
    """The hand-derived gradient trains the regression model: on a batch its loss and gradients
    equal autograd's; a forked model (its MLP branch scaled) fails the check, trains with autograd
    and says so once."""
    import model as model_py
    cfg = common.configure(train.DEFAULTS,
                           [*SMALL, f"--out_dir={tmp_path}/a", "--stop_at=2", "--fast_grad=True"])
    model, task = data.build_model(cfg, 0), data.task_for(cfg)
    gen = torch.Generator()
    step_grads = train.hand_derived(cfg, model, task, gen, 32, torch.device("cpu"), False)
    assert step_grads is not None
    xs, ys = task.sample(gen.manual_seed(5), 32)
    loss = step_grads(xs, ys, 1.0)
    hand = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = task.loss(model(task.model_input(xs, ys)), ys)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-7)
    for k, p in model.named_parameters():
        torch.testing.assert_close(hand[k], p.grad, rtol=1e-4,
                                   atol=1e-6 * p.grad.abs().max().item(), msg=k)
    assert train.hand_derived({**cfg, "fast_grad": False}, model, task, gen, 32,
                              torch.device("cpu"), False) is None

    def forked(self, x):
        y = x + self.attention(self.layer_norms[0](x))
        return y + 1.5 * self.compute(self.layer_norms[1](y))
    monkeypatch.setattr(model_py.Block, "forward", forked)
    row = train.train(cfg)
    warned = [w for w in recwarn if "hand-derived gradient disagrees" in str(w.message)]
    assert len(warned) == 1 and "--fast_grad=False" in str(warned[0].message) and row["step"] == 2


def test_fast_grad_auto_is_the_hand_derived_gradient_on_cpu_only(tmp_path):
    """The default is autograd (False); auto (configs/L2H4.py) takes the hand-derived gradient on
    CPU and autograd on CUDA and XLA (where it was slower); True/False win; a run resumes under
    another setting, also one whose config.json holds the old boolean."""
    cpu, cuda, xla = (torch.device(d) for d in ("cpu", "cuda", "xla"))
    got = {(s, d.type): train.wants_fast_grad(s, d) for s in ("auto", "True", "False", True, False)
           for d in (cpu, cuda, xla)}
    assert {k for k, v in got.items() if v} == {("auto", "cpu"), *((s, d) for s in ("True", True)
                                                                  for d in ("cpu", "cuda", "xla"))}

    def parse(*args):
        return common.configure(train.DEFAULTS, [*SMALL, *args], train.CHOICES)
    cfg = parse(f"--out_dir={tmp_path}", "--stop_at=1")
    assert cfg["fast_grad"] == "False" and parse("--fast_grad=auto")["fast_grad"] == "auto"
    with pytest.raises(common.ConfigError, match="fast_grad must be one of auto, True, False"):
        parse("--fast_grad=yes")
    model, task, gen = data.build_model(cfg, 0), data.task_for(cfg), torch.Generator()
    # the default: autograd
    assert train.hand_derived(cfg, model, task, gen, 32, cpu, False) is None
    auto = {**cfg, "fast_grad": "auto"}
    assert train.hand_derived(auto, model, task, gen, 32, cuda, False) is None  # (touches no CUDA)
    assert train.hand_derived(auto, model, task, gen, 32, cpu, False) is not None
    train.train({**cfg, "device": "cpu"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fast_grad": True}))  # an older run
    assert train.train({**cfg, "device": "cpu", "stop_at": 2, "fast_grad": "False"})["step"] == 2
