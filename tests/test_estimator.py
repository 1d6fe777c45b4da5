"""The estimator's error budget: L(w*) paired with each draw's own minibatch, a standard error that
is at least the chain means' spread (validated by coverage over independent sampler seeds), the
drift diagnostic, and llc.py's follow mode (checkpoints estimated as a training run writes them)."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

import common
import data
import sgld
from data import Task
from model import ICLConfig
from conftest import ROOT
from test_llc import CLI, quad_expected, quad_loss, tiny_run  # noqa: F401  (a fixture)


def regression(n, paired, seed=0):
    """The regression task on a small model at its initialisation, paired or not, L(w*) on n rows.
    """
    model, task = ICLConfig(d_model=16, d_mlp=16).build(0), Task()
    params = {k: v.detach() for k, v in model.named_parameters()}
    return sgld.estimate_llc(data.RunLoss(model, task), params, task.sample, epsilon=1e-3,
                             gamma=6.0, nbeta=60.0, num_chains=4, num_draws=60, num_burnin=20,
                             batch_size=32, n=n, seed=seed, paired=paired)


def test_paired_llc_owes_nothing_to_the_l_w_star_set():
    """Paired, the estimate is the same whatever the size of the separate L(w*) set (it is only
    reported), the unpaired one moves with that set's sampling error; pairing also narrows the
    spread of the chain means."""
    small, big = regression(64, True), regression(2048, True)
    assert small["llc_mean"] == big["llc_mean"] and small["llc_se"] == big["llc_se"]
    assert small["init_loss"] != big["init_loss"] and small["paired"] is True
    plain_small, plain_big = regression(64, False), regression(2048, False)
    # nbeta x the sets' difference
    shift = 60.0 * (plain_big["init_loss"] - plain_small["init_loss"])
    assert math.isclose(plain_small["llc_mean"] - plain_big["llc_mean"], shift, rel_tol=1e-6,
                        abs_tol=1e-6)
    assert big["llc_std"] < plain_big["llc_std"]
    # its L(w*) error, about 60 x 4 / 512 = 0.5, is small beside the se's
    plain_huge = regression(2 ** 18, False)
    assert (abs(big["llc_mean"] - plain_huge["llc_mean"])
            <= 2 * math.hypot(big["llc_se"], plain_huge["llc_se"]))
    assert abs(big["init_loss_paired"] - big["init_loss"]) < 0.05 * big["init_loss"]


def test_the_standard_error_covers_the_truth_over_independent_seeds():
    """40 estimates with independent sampler seeds on a quadratic whose stationary answer is exact:
    +-2 llc_se covers it in about 95 % (>= 34 of 40: 3 binomial sd below 38), the mean reported se
    is within [0.8, 1.6] of the estimates' actual spread, and llc_se is never below either of its
    two parts."""
    eps, nbeta = 1e-2, 2.0
    exact = quad_expected(4, eps, nbeta, 0.0)
    rows = [sgld.estimate_llc(quad_loss, {"w": torch.zeros(4)}, (torch.zeros(1, 1),), epsilon=eps,
                              gamma=0.0, nbeta=nbeta, num_chains=8, num_draws=200, num_burnin=200,
                              seed=s)
            for s in range(40)]
    est, se = np.array([r["llc_mean"] for r in rows]), np.array([r["llc_se"] for r in rows])
    covered = int((abs(est - exact) <= 2 * se).sum())
    print(f"exact {exact:.3f}: mean {est.mean():.3f}, spread {est.std(ddof=1):.3f}, mean se "
          f"{se.mean():.3f}, covered {covered}/40")
    assert covered >= 34
    assert 0.8 <= se.mean() / est.std(ddof=1) <= 1.6
    assert all(r["llc_se"] >= max(r["llc_se_ess"], r["llc_se_chains"]) for r in rows)


def test_the_drift_statistic_flags_chains_that_have_not_settled():
    """From w* = 0 with the loss relaxing on ~50 steps, 100 draws without burn-in still climb (large
    drift, one warning); after 1,000 burn-in steps the last half of 400 draws is flat (|z| < 3, no
    warning)."""
    kw = dict(epsilon=1e-3, gamma=0.0, nbeta=20.0, num_chains=32, seed=0)
    w = {"w": torch.zeros(1024)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cold = sgld.estimate_llc(quad_loss, w, (torch.zeros(1, 1),), num_draws=100, num_burnin=0,
                                 **kw)
    print(f"cold: drift {cold['llc_drift']:.2f} (z {cold['llc_drift_z']:.1f})")
    assert cold["llc_drift"] > 0 and cold["llc_drift_z"] > sgld.DRIFT_Z
    assert sum("still drift" in str(c.message) for c in caught) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warm = sgld.estimate_llc(quad_loss, w, (torch.zeros(1, 1),), num_draws=400, num_burnin=1000,
                                 **kw)
    print(f"warm: drift {warm['llc_drift']:.2f} (z {warm['llc_drift_z']:.1f})")
    assert (abs(warm["llc_drift_z"]) < 3
            and not [c for c in caught if "still drift" in str(c.message)])


def test_follow_mode_estimates_checkpoints_as_they_appear(tiny_run):  # noqa: F811
    """llc.py --follow on a run whose last checkpoint is not there yet: it estimates what exists,
    waits, takes the later checkpoints as they are written, and stops once the run's last step
    (max_steps - 1) has its row; with no new checkpoint it stops after the timeout, saying so."""
    cfg = common.load_run(tiny_run)
    common.atomic_write(tiny_run / "config.json",
                        __import__("json").dumps({**cfg, "max_steps": 21}))
    held = tiny_run / "held"
    held.mkdir()
    for p in (tiny_run / "checkpoints").glob("step_0000020.*"):
        shutil.move(p, held / p.name)
    cmd = [sys.executable, str(ROOT / "llc.py"), str(tiny_run), *CLI, "--follow=60"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while len(common.read_jsonl(tiny_run / "llc.jsonl")) < 2 and time.time() - t0 < 60:
        time.sleep(0.5)
    assert proc.poll() is None  # still waiting for step 20
    for p in held.iterdir():
        shutil.move(p, tiny_run / "checkpoints" / p.name)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, err
    assert [r["step"] for r in common.read_jsonl(tiny_run / "llc.jsonl")] == [0, 10, 20]
    assert "last checkpoint (20) is done" in err
    out = subprocess.run(cmd[:-1] + ["--follow=1", "--out=other.jsonl", "--steps="],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "done" in out.stderr  # the last step exists: no waiting at all


def test_a_horizon_extrapolates_each_chain_from_the_last_half_of_its_draws():
    """horizon = the draws run is the plain mean; a longer horizon counts the steps not run at each
    chain's mean over the last half of its draws (per chain, then averaged); with burn-in a horizon
    is refused."""
    kw = dict(epsilon=1e-3, gamma=0.0, nbeta=20.0, num_chains=4, num_draws=100, num_burnin=0,
              seed=0)
    w, d = {"w": torch.zeros(64)}, (torch.zeros(1, 1),)
    plain = sgld.estimate_llc(quad_loss, w, d, **kw)
    same = sgld.estimate_llc(quad_loss, w, d, horizon=100, **kw)
    longer = sgld.estimate_llc(quad_loss, w, d, horizon=400, **kw)
    x = plain["llc_trace"].numpy()
    want = (x.sum(1) + 300 * x[:, 50:].mean(1)) / 400
    assert same["llc_mean"] == plain["llc_mean"]
    assert (np.allclose(longer["llc_per_chain"], want)
            and math.isclose(longer["llc_mean"], want.mean()))
    # the chains climb from w*: the unrun steps sit higher
    assert longer["llc_mean"] > plain["llc_mean"]
    assert longer["llc_se"] == longer["llc_se_chains"]
    try:
        sgld.estimate_llc(quad_loss, w, d, **{**kw, "num_burnin": 10, "horizon": 400})
    except ValueError as e:
        assert "horizon" in str(e)
    else:
        raise AssertionError("a horizon with burn-in was accepted")


class Gated(torch.nn.Module):
    """A fork's model: a 0-dim gate and a temperature beside a weight matrix."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 2) * 0.3)
        self.gate = torch.nn.Parameter(torch.tensor(0.7))
        self.temperature = torch.nn.Parameter(torch.tensor(1.2))

    def forward(self, x):
        return self.gate * torch.tanh(x @ self.w / self.temperature)


def test_zero_dim_parameters_are_sampled_in_every_autograd_mode():
    """0-dim parameters (a gate, a temperature) go through the flat buffer and back in vmap and loop
    modes, giving the same chains."""
    torch.manual_seed(0)
    x = torch.randn(256, 3)
    y = Gated()(x).detach() + 0.1 * torch.randn(256, 2)
    model = Gated()
    rows = {mode: sgld.estimate_llc(model, None, (x, y),
                                    loss=lambda out, b: ((out - b[1]) ** 2).mean(), epsilon=1e-3,
                                    gamma=100.0, nbeta=10.0, num_chains=2, num_draws=20,
                                    batch_size=32, chain_mode=mode) for mode in ("vmap", "loop")}
    assert rows["vmap"]["num_params"] == 8
    np.testing.assert_allclose(rows["vmap"]["llc_per_chain"], rows["loop"]["llc_per_chain"],
                               rtol=1e-4)


def test_sgld_py_alone_runs_the_documented_devinterp_style_call(tmp_path):
    """docs/estimator.md's devinterp-style snippet (its first python block, the README's too), run
    with sgld.py copied alone into an empty folder, the project not importable: an nn.Module, a
    DataLoader whose last batch is short (2,000 = 31 x 64 + 16 rows), and a finite, sensible row;
    no fast paths there."""
    doc = (ROOT / "docs" / "estimator.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc.split("## A devinterp-style call", 1)[1],
                        re.S)[1]
    # the section's block is the first, and the README's estimator section shows the same call
    assert snippet == re.search(r"```python\n(.*?)```", doc, re.S)[1]
    readme = (ROOT / "README.md").read_text().split("## The estimator API", 1)[1]
    assert snippet == re.search(r"```python\n(.*?)```", readme, re.S)[1]
    shutil.copy(ROOT / "sgld.py", tmp_path / "sgld.py")
    check = """
import json, os, sys
import sgld
assert sgld.fast_paths() is None  # fast/ (or any project module) is on no path
assert not any(os.path.exists(os.path.join(p or ".", "fast")) for p in sys.path)
print("ROW " + json.dumps({k: v for k, v in row.items() if not hasattr(v, "shape")}))
"""
    (tmp_path / "snippet.py").write_text(snippet + check)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.split("ROW ", 1)[1])
    print(out.stdout.split("ROW ", 1)[0].strip())
    assert math.isfinite(row["llc_mean"]) and 0 < row["llc_mean"] < row["num_params"] / 2
    assert 0 < row["llc_se"] < row["llc_mean"] and not row["nan_chains"]
    assert ((row["batch_size"], row["n"], row["num_chains"], row["num_draws"])
            == (64, 16 * 64, 4, 200))
    assert len(row["llc_per_chain"]) == 4 and row["update_backend"] == "torch"
    assert row["num_params"] == 8 * 16 + 16 + 16 + 1
