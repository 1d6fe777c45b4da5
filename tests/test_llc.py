"""Tests of llc.py: the SGLD update (torch oracle and Triton kernel under the interpreter),
known-answer LLCs (quadratic, monomials, reduced-rank regression), restriction, seeding, divergence,
the batched chains against a one-chain-at-a-time loop, and the resumable command line. Known-answer
numbers are printed (pytest -s)."""
import copy
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import common
import data
import fast
import llc
import sgld
from data import RunLoss, Task, to_tokens
from fast import icl_loss_and_grads
from model import ICLConfig

NBETA_1000 = 1000 / math.log(1000)  # devinterp's known-answer nbeta: n / ln n with n = 1000
# the Triton kernel's tests: the GPU, else the interpreter
KDEV = "cuda" if torch.cuda.is_available() else "cpu"


def quad_loss(params, batch):
    """A pure function of w (the data are ignored): L(w) = |w|^2 / 2, so nbeta*L is exactly
    Gaussian."""
    return 0.5 * sum((p ** 2).sum() for p in params.values())


ZERO_DATA = (torch.zeros(1, 1),)  # a one-row fixed dataset for potentials that ignore the data


def quad_expected(d, eps, nbeta, gamma):
    """Exact stationary E[nbeta L] of the discrete SGLD chain on L = |w|^2/2: per coordinate
    w' = (1 - eps k/2) w + sqrt(eps) xi with k = nbeta + gamma has variance
    1 / (k (1 - eps k / 4))."""
    k = nbeta + gamma
    return d / 2 * nbeta / (k * (1 - eps * k / 4))


def stationary_energy(p, nbeta, eps, gamma=0.0, num=1201):
    """E[nbeta w^p / 2] under the exact stationary law of the 1-D chain w' = w - (eps/2) U'(w) +
    sqrt(eps) xi, U = nbeta w^p / 2 + gamma w^2 / 2: the transition kernel on a grid, its left
    eigenvector by a linear solve. This is the SGLD discretisation bias computed, not assumed
    (checked against quad_expected below)."""
    c = nbeta / 2
    R = (40 / c) ** (1 / p) + 10 * math.sqrt(eps)
    w = np.linspace(-R, R, num)
    mu = w - eps / 2 * (c * p * w ** (p - 1) + gamma * w)
    K = np.exp(-(w[None, :] - mu[:, None]) ** 2 / (2 * eps))
    K /= K.sum(1, keepdims=True)
    A = K.T - np.eye(num)
    A[-1] = 1.0
    rhs = np.zeros(num)
    rhs[-1] = 1.0
    pi = np.linalg.solve(A, rhs)
    return float((pi * c * w ** p).sum())


def run(loss_fn, params, data=ZERO_DATA, **kw):
    kw = {"epsilon": 1e-3, "gamma": 0.0, "nbeta": NBETA_1000, "num_chains": 8, "num_draws": 1000,
          "num_burnin": 200, **kw}
    return llc.estimate_llc(loss_fn, params, data, **kw)


# --------------------------------------------------------------------------------------- the update
def test_oracle_update_is_the_closed_form():
    W = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    W0 = torch.tensor([0.5, -1.0, 0.0])
    G = torch.tensor([[0.2, 0.4, -0.6], [1.0, 0.0, 2.0]])
    xi = torch.tensor([[1.0, 0.0, -1.0], [0.5, -0.5, 2.0]])
    eps, gamma, nbeta = 0.01, 3.0, 50.0
    want = W - eps / 2 * (nbeta * G + gamma * (W - W0)) + math.sqrt(eps) * xi
    # by hand for one entry: 1 - 0.005 * (50*0.2 + 3*0.5) + 0.1*1 = 1.0425
    assert math.isclose(want[0, 0].item(), 1.0425, rel_tol=1e-6)
    Wt = W.clone()
    sgld.sgld_update_torch(Wt, W0, G, xi, *sgld.sgld_coefficients(eps, gamma, nbeta))
    torch.testing.assert_close(Wt, want, rtol=1e-6, atol=1e-7)


def _kernel_step(W, W0, G, coeffs, key, block=4096):
    W = W.clone()
    fast.sgld_update_triton(W, W0, G, *coeffs, key=key, block=block)
    return W


@pytest.mark.skipif(fast.triton is None, reason="triton not installed")
def test_triton_kernel_matches_oracle_and_noise_is_standard_normal():
    gen = torch.Generator().manual_seed(0)
    C, P = 4, 10_007  # P not a multiple of the block: the masked tail is exercised
    W, G, W0 = (torch.randn(*s, generator=gen).to(KDEV) for s in ((C, P), (C, P), (P,)))
    a, b, c = sgld.sgld_coefficients(1e-3, 6.0, 60.0)
    det = W.clone()
    sgld.sgld_update_torch(det, W0, G, torch.zeros_like(W), a, b, c)
    torch.testing.assert_close(_kernel_step(W, W0, G, (a, b, 0.0), 123), det, rtol=0, atol=1e-6)
    # noise: the kernel's result minus the deterministic part, over 3 steps (keys) x C chains x P
    z = torch.stack([(_kernel_step(W, W0, G, (a, b, c), sgld.noise_key(7, t)) - det) / c
                     for t in range(3)])
    z = z.double()
    N = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(N)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / N)
    # Gaussian tails
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3) < 0.1
    flat = z.reshape(-1, P)  # rows: (step, chain) pairs; every pair of rows must be uncorrelated
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(len(flat), dtype=torch.bool)]
    assert off.abs().max().item() < 5 / math.sqrt(P), "noise correlated across chains or steps"
    # the same key reproduces the same noise
    torch.testing.assert_close(_kernel_step(W, W0, G, (a, b, c), sgld.noise_key(7, 1)),
                               z[1].float() * c + det)
    # two checkpoints (rows of W0) of 2 chains each: each chain pulled to its own row; chain 2 + c
    # draws chain c's noise
    W0s = torch.stack([W0, -W0])
    det2 = W.clone()
    sgld.sgld_update_torch(det2, W0s, G, torch.zeros(2, P, device=KDEV), a, b, c)
    torch.testing.assert_close(det2[2:], W[2:] - a * G[2:] - b * (W[2:] + W0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_kernel_step(W, W0s, G, (a, b, 0.0), 123), det2, rtol=0, atol=1e-6)
    z2 = _kernel_step(W, W0s, G, (a, b, c), sgld.noise_key(7, 0)) - det2
    torch.testing.assert_close(z2[2:], z2[:2], rtol=0, atol=1e-5)
    assert (z2[1] - z2[0]).abs().max() > 0.1


@pytest.mark.skipif(fast.triton is None, reason="triton not installed")
def test_triton_backend_runs_in_the_estimator():
    r = run(quad_loss, {"w": torch.zeros(3, device=KDEV)}, num_chains=2, num_draws=6, num_burnin=2,
            update_backend="triton")
    assert (r["update_backend"] == "triton" and np.isfinite(r["llc_mean"])
            and r["loss_trace"].shape == (2, 6))


def test_xla_backend_if_available():
    pytest.importorskip("torch_xla")
    import torch_xla.core.xla_model as xm
    r = run(quad_loss, {"w": torch.zeros(3)}, num_draws=5, num_burnin=0, device=xm.xla_device())
    assert r["update_backend"] == "xla" and np.isfinite(r["llc_mean"])


# ------------------------------------------------------------------------------------ known answers
def test_stationary_energy_solver_matches_the_exact_quadratic():
    for gamma in (0.0, 10.0):
        want = quad_expected(1, 1e-3, NBETA_1000, gamma)
        assert math.isclose(stationary_energy(2, NBETA_1000, 1e-3, gamma), want, rel_tol=1e-3)


@pytest.mark.parametrize("gamma", [0.0, 20.0])
def test_quadratic_gives_half_the_dimension(gamma):
    d, eps = 4, 1e-3
    r = run(quad_loss, {"w": torch.zeros(d)}, gamma=gamma, epsilon=eps)
    # d/2 times the (exact) discretisation/localisation bias
    expected = quad_expected(d, eps, NBETA_1000, gamma)
    print(f"\nquadratic d={d} gamma={gamma}: llc {r['llc_mean']:.3f} +- {r['llc_se']:.3f}, true "
          f"{d / 2}, expected with SGLD bias {expected:.3f}")
    assert abs(r["llc_mean"] - expected) < 4 * r["llc_se"]
    assert abs(r["llc_mean"] - d / 2) < 4 * r["llc_se"] + abs(expected - d / 2)
    assert r["rhat"] < 1.05


@pytest.mark.parametrize("powers", [[2], [2, 2], [2, 2, 2], [4], [4, 2]])
def test_monomial_potentials(powers):
    """K(w) = 1/2 sum_i w_i^{p_i} at w0 = 0 has lambda = sum 1/p_i (llc-peers.md 7.2); with gamma =
    0 the continuous Gibbs posterior gives exactly that at any nbeta, so the only bias is SGLD's
    discretisation."""
    p = torch.tensor(powers, dtype=torch.float32)
    eps = 1e-3
    r = run(lambda prm, b: 0.5 * (prm["w"] ** p).sum(), {"w": torch.zeros(len(powers))},
            epsilon=eps, num_burnin=1000)
    true = sum(1 / q for q in powers)
    expected = sum(stationary_energy(q, NBETA_1000, eps) for q in powers)
    print(f"\nmonomial {powers}: llc {r['llc_mean']:.4f} +- {r['llc_se']:.4f}, true {true}, "
          f"expected with SGLD bias {expected:.4f}")
    assert abs(r["llc_mean"] - expected) < 4 * r["llc_se"]
    assert abs(r["llc_mean"] - true) < 4 * r["llc_se"] + abs(expected - true)


def aoyagi_watanabe(m, h, n):
    """Learning coefficient of reduced-rank regression at the zero map (true rank 0)."""
    if m + h < n:
        return m * h / 2
    if n + h < m:
        return h * n / 2
    if m + n < h:
        return m * n / 2
    return (2 * m * n + 2 * h * n + 2 * m * h - m * m - n * n - h * h + (m + h + n) % 2) / 8


@pytest.mark.slow
@pytest.mark.parametrize("m,h,n", [(5, 3, 5), (5, 4, 5), (4, 3, 8), (8, 3, 4), (3, 8, 4)])
def test_reduced_rank_regression(m, h, n):
    """devinterp's test_accuracy_rrr (llc-peers.md 7.1): y independent of x, the model trained by
    Adam to the empirical minimiser, then SGLD with eps 6e-4, gamma 1, nbeta = n/ln n, full batch.
    We run 8 x 4000 draws (devinterp: 3 x 2000) so the chain noise (~1.5%) is small against the 15%
    tolerance."""
    torch.manual_seed(1)
    x, y = torch.randn(1000, m), torch.randn(1000, n)
    model = torch.nn.Sequential(torch.nn.Linear(m, h, bias=False),
                                torch.nn.Linear(h, n, bias=False))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(5000):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}
    r = llc.estimate_llc(lambda prm, b: F.mse_loss(functional_call(model, prm, (b[0],)), b[1]),
                         params, (x, y), epsilon=6e-4, gamma=1.0, nbeta=NBETA_1000, num_chains=8,
                         num_draws=4000, seed=42)
    true = aoyagi_watanabe(m, h, n)
    print(f"\nRRR (m,h,n)=({m},{h},{n}): llc {r['llc_mean']:.3f} +- {r['llc_se']:.3f} (chain std "
          f"{r['llc_std']:.3f}), true {true}, error {r['llc_mean'] / true - 1:+.1%}")
    assert abs(r["llc_mean"] / true - 1) < 0.15


# -------------------------------------------------------------------------------------- restriction
def test_glob_patterns_on_model_names():
    names = [k for k, _ in ICLConfig().build(0).named_parameters()]
    att = sgld.select_params(names, "blocks.*.attention.**")
    assert att == [f"blocks.{i}.attention.{p}.weight" for i in (0, 1) for p in ("qkv", "out")]
    assert sgld.select_params(names, "*.weight") == ["token_embedding.weight",
                                                     "postn_embedding.weight"]
    no_bias = sgld.select_params(names, "blocks.0.**", exclude="**.bias")  # exclude wins
    assert no_bias and all(n.startswith("blocks.0.") and not n.endswith(".bias") for n in no_bias)
    assert sgld.select_params(names, ["unembedding.1.*"]) == ["unembedding.1.weight",
                                                              "unembedding.1.bias"]
    assert sgld.select_params(names) == names
    with pytest.raises(ValueError, match="blocks.7"):
        sgld.select_params(names, "blocks.7.**")
    with pytest.raises(ValueError, match="no parameter"):
        sgld.select_params(names, "blocks.**", exclude="**")


def test_excluding_an_ignored_parameter_changes_nothing():
    kw = dict(num_draws=300, num_burnin=50)
    base = run(quad_loss, {"w": torch.zeros(3)}, **kw)
    extra = run(lambda p, b: quad_loss({"w": p["w"]}, b),
                {"extra": torch.ones(5), "w": torch.zeros(3)}, exclude="extra", **kw)
    assert extra["llc_mean"] == base["llc_mean"]
    assert torch.equal(extra["loss_trace"], base["loss_trace"]) and extra["num_params"] == 3


def test_restricted_llc_is_smaller_than_the_full_llc():
    params = {"a.w": torch.zeros(3), "b.w": torch.zeros(3)}
    full, part = run(quad_loss, params), run(quad_loss, params, include="a.*")
    assert part["num_params"] == 3
    assert full["llc_mean"] - part["llc_mean"] > 4 * math.hypot(full["llc_se"], part["llc_se"])
    assert abs(part["llc_mean"] - quad_expected(3, 1e-3, NBETA_1000, 0)) < 4 * part["llc_se"]


# ------------------------------------------------------------------------------- seeds and failures
def test_same_seed_is_identical_and_other_seeds_agree_within_the_standard_error():
    params = {"w": torch.zeros(4)}
    r0, r0b, r1 = (run(quad_loss, params, seed=0), run(quad_loss, params, seed=0),
                   run(quad_loss, params, seed=1))
    assert (r0["llc_per_chain"] == r0b["llc_per_chain"]
            and torch.equal(r0["loss_trace"], r0b["loss_trace"]))
    assert r0["llc_mean"] != r1["llc_mean"]
    assert abs(r0["llc_mean"] - r1["llc_mean"]) < 4 * math.hypot(r0["llc_se"], r1["llc_se"])


def test_divergent_chains_are_dropped_and_reported():
    # quartic potential, large step: a chain that wanders far enough overshoots and blows up,
    # others do not
    r = run(lambda p, b: 0.5 * (p["w"] ** 4).sum(), {"w": torch.zeros(1)}, epsilon=0.03,
            num_chains=16, num_draws=200, num_burnin=0)
    bad = r["nan_chains"]
    assert 0 < len(bad) < 16
    per_chain = np.array(r["llc_per_chain"])
    assert np.isnan(per_chain[bad]).all() and np.isfinite(np.delete(per_chain, bad)).all()
    assert math.isclose(r["llc_mean"], np.nanmean(per_chain)) and np.isfinite(r["llc_se"])


def test_all_chains_diverging_is_a_clear_error():
    with pytest.raises(llc.AllChainsDivergedError, match="all 4 SGLD chains diverged.*epsilon=1"):
        run(quad_loss, {"w": torch.zeros(2)}, epsilon=1.0, nbeta=100.0, num_chains=4, num_draws=50)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="non-finite"):
        run(quad_loss, {"w": torch.tensor([0.0, float("nan")])})
    with pytest.raises(ValueError, match="batch_size=5 at most 1"):
        run(quad_loss, {"w": torch.zeros(2)}, batch_size=5)
    with pytest.raises(ValueError, match="per_token"):
        run(quad_loss, {"w": torch.zeros(2)}, per_token=True)
    with pytest.raises(ValueError, match="epsilon"):
        run(quad_loss, {"w": torch.zeros(2)}, epsilon=-1.0)


def test_ess_and_rhat():
    g = np.random.default_rng(0)
    iid = g.standard_normal((4, 4000))
    ess, rhat, var = sgld.ess_rhat(iid)
    assert 0.85 < ess / iid.size < 1.15 and rhat < 1.01 and abs(var - 1) < 0.05
    # AR(1), rho = 0.9: integrated autocorrelation time (1 + rho) / (1 - rho) = 19
    ar = np.zeros((4, 4000))
    for t in range(1, 4000):
        ar[:, t] = 0.9 * ar[:, t - 1] + g.standard_normal(4)
    assert 0.7 < sgld.ess_rhat(ar)[0] / (ar.size / 19) < 1.3
    assert sgld.ess_rhat(iid + np.arange(4)[:, None])[1] > 1.5  # chains stuck at different levels


# ---------------------------------------------------------- the regression model: batched vs a loop
def _reference_loop(model, loss_of, params, next_batches, C, steps, burnin, epsilon, gamma, nbeta,
                    g_noise):
    """One chain at a time with plain autograd on a copy of the model; the same minibatches and
    noise."""
    names = list(params)
    W0 = torch.cat([params[k].reshape(-1) for k in names])
    W = W0.repeat(C, 1)
    models = [copy.deepcopy(model) for _ in range(C)]
    a, b, c = sgld.sgld_coefficients(epsilon, gamma, nbeta)
    trace = torch.zeros(C, steps - burnin)
    for t in range(steps):
        batch = next_batches(t)
        noise = torch.randn(W.shape, generator=g_noise)
        for ch in range(C):
            mod = models[ch]
            torch.nn.utils.vector_to_parameters(W[ch], mod.parameters())
            mod.zero_grad()
            loss = loss_of(mod, tuple(x[ch] for x in batch))
            loss.backward()
            g = torch.nn.utils.parameters_to_vector(p.grad for p in mod.parameters())
            if t >= burnin:
                trace[ch, t - burnin] = loss.detach()
            W[ch] = W[ch] - a * g - b * (W[ch] - W0) + c * noise[ch]
    return trace


@pytest.mark.parametrize("mode", ["stream", "fixed"])
def test_batched_chains_match_a_one_chain_at_a_time_loop(mode):
    model, task = ICLConfig().build(0), Task()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    C, B, steps, burnin, seed = 3, 16, 10, 3, 5
    hp = dict(epsilon=1e-3, gamma=6.0, nbeta=60.0)
    (g_data, g_noise, _, _), _ = sgld.make_generators(seed, "cpu")
    if mode == "stream":
        data = task.sample

        def next_batches(t):
            xs, ys = data(g_data, C * B)
            return xs.view(C, B, *xs.shape[1:]), ys.view(C, B, -1)
    else:
        # a fixed set of 40 rows: 2 batches per epoch (the last 8 rows dropped),
        # reshuffled every epoch
        data = task.sample(torch.Generator().manual_seed(9), 40)
        perm = None

        def next_batches(t):
            nonlocal perm
            if t % 2 == 0:
                perm = torch.argsort(torch.rand(C, 40, generator=g_data), dim=1)
            idx = perm[:, (t % 2) * B:(t % 2 + 1) * B]
            return data[0][idx], data[1][idx]
    ref = _reference_loop(model, lambda mod, bt: task.loss(mod(to_tokens(*bt)), bt[1]), params,
                          next_batches, C, steps, burnin, g_noise=g_noise, **hp)
    r = llc.estimate_llc(RunLoss(model, task), params, data, num_chains=C, num_draws=steps - burnin,
                         num_burnin=burnin, batch_size=B, seed=seed,
                         n=64 if mode == "stream" else None, **hp)
    torch.testing.assert_close(r["loss_trace"].float(), ref, rtol=2e-5, atol=2e-6)
    assert r["nan_chains"] == []


def test_per_token_llc_averages_to_the_llc():
    model, task = ICLConfig(d_model=16, d_mlp=16).build(0), Task()
    params = {k: v.detach() for k, v in model.named_parameters()}
    kw = dict(epsilon=1e-3, gamma=6.0, nbeta=60.0, num_chains=2, num_draws=8, batch_size=16, n=64,
              seed=3)
    whole = llc.estimate_llc(RunLoss(model, task), params, task.sample, **kw)
    tok = llc.estimate_llc(RunLoss(model, task, per_token=True), params, task.sample,
                           per_token=True, **kw)
    assert len(tok["llc_per_token"]) == task.K
    assert math.isclose(np.mean(tok["llc_per_token"]), tok["llc_mean"], rel_tol=1e-9)
    assert math.isclose(tok["llc_mean"], whole["llc_mean"], rel_tol=1e-3)


# --------------------------------------------------------------------------------- the command line
def write_run(path, **model):
    """A run directory with checkpoints 0, 10 and 20 of a small regression model (`model`: its
    sizes), written through common's own format."""
    cfg = {**dict(D=4, K=4, sigma2=0.125, num_tasks=0, task_seed=0, n_layer=1, n_head=2,
                  d_model=8, d_mlp=8, seed=0), **model}
    common.atomic_write(path / "config.json", json.dumps(cfg))
    for step in (0, 10, 20):
        common.save_checkpoint(path, step, data.build_model(cfg, step))
    return path


@pytest.fixture
def tiny_run(tmp_path):
    return write_run(tmp_path)


CLI = ["--num_chains=2", "--num_draws=6", "--num_burnin=2", "--batch_size=8", "--n=32",
       "--trace_points=4"]


def test_cli_writes_one_row_per_checkpoint_and_resumes_after_a_torn_line(tiny_run, capsys):
    llc.main([str(tiny_run), *CLI])  # the run directory positionally, as for analyze.py
    path = tiny_run / "llc.jsonl"
    rows = common.read_jsonl(path)
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert set(common.read_jsonl(path)[0]) >= {"llc_mean", "llc_std", "llc_se", "llc_per_chain",
                                               "rhat", "init_loss", "nan_chains", "loss_trace",
                                               "trace_draws", "epsilon", "wall_time"}
    assert (len(rows[0]["loss_trace"]) == 2 and len(rows[0]["loss_trace"][0]) == 4
            and rows[0]["trace_draws"][-1] == 6)
    text = path.read_text()  # simulate a kill during the last append
    path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + text.splitlines()[-1][:37])
    llc.main(["--ckpt", str(tiny_run), *CLI])
    again = common.read_jsonl(path)
    assert [r["step"] for r in again] == [0, 10, 20] and again[2]["llc_mean"] == rows[2]["llc_mean"]
    # no torn or duplicate row left
    assert all(json.loads(line) for line in path.read_text().splitlines())
    llc.main(["--ckpt", str(tiny_run), *CLI])  # all done: nothing appended
    assert len(common.read_jsonl(path)) == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # other settings would mix two estimators in one file
        llc.main(["--ckpt", str(tiny_run), *CLI, "--epsilon=1e-2"])
    assert e.value.code == 2 and "epsilon=0.0003" in capsys.readouterr().err


def test_an_se_target_stops_at_the_draws_a_shorter_run_takes():
    """With se_target the chains stop at the first multiple of 100 draws where llc_se <= target: the
    estimate is exactly a run with that many draws (the same chains), 100 fewer would have missed
    the target, and an unreachable target runs to num_draws."""
    w, kw = {"w": torch.zeros(4)}, dict(num_chains=4, num_draws=2000, num_burnin=100)
    target = 2 * run(quad_loss, w, **kw)["llc_se"]  # about a quarter of the draws
    r = run(quad_loss, w, se_target=target, **kw)
    used = r["draws_used"]
    assert (r["llc_se"] <= target and used % 100 == 0 and 100 <= used < 2000
            and r["num_draws"] == 2000)
    short = run(quad_loss, w, **{**kw, "num_draws": used})
    assert ((short["llc_mean"], short["llc_se"]) == (r["llc_mean"], r["llc_se"])
            and "draws_used" not in short)
    assert used == 100 or run(quad_loss, w, **{**kw, "num_draws": used - 100})["llc_se"] > target
    assert run(quad_loss, w, se_target=1e-9, **kw)["draws_used"] == 2000


def test_cli_se_target_rows_and_resume(tiny_run, capsys):
    """--se_target writes se_target and draws_used; a file without the column reads as no target, so
    the same settings resume it and a target does not mix into it."""
    llc.main([str(tiny_run), *CLI, "--steps=0"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        llc.main([str(tiny_run), *CLI, "--steps=0,10", "--se_target=1e3", "--num_draws=6"])
    assert e.value.code == 2 and "se_target" in capsys.readouterr().err
    llc.main([str(tiny_run), *CLI, "--steps=0,10"])
    assert [("se_target" in r, r["step"]) for r in common.read_jsonl(tiny_run / "llc.jsonl")] == [
        (False, 0), (False, 10)]
    llc.main([str(tiny_run), *CLI, "--steps=20", "--num_draws=300", "--se_target=1e3",
              "--out=se.jsonl"])
    (row,) = common.read_jsonl(tiny_run / "se.jsonl")
    assert row["se_target"] == 1e3 and row["draws_used"] == 100 and row["num_draws"] == 300
    assert "draws=[100]" in capsys.readouterr().err


def test_cli_checkpoint_batches_write_the_one_at_a_time_rows(tiny_run):
    """--ckpt_batch=2 estimates checkpoints two at a time: the same rows as one at a time
    (native_loop on CPU: bit-identical); a checkpoint whose chains all diverge inside a batch is
    redone alone and recorded as a failure, without costing its batch-mate its estimate."""
    model = data.load_model(tiny_run, 20)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(300)
    common.save_checkpoint(tiny_run, 30, model)
    with pytest.raises(SystemExit, match="diverged at 1 checkpoint"):
        llc.main(["--ckpt", str(tiny_run), *CLI, "--out=one.jsonl"])
    with pytest.raises(SystemExit, match="diverged at 1 checkpoint"):
        llc.main(["--ckpt", str(tiny_run), *CLI, "--out=two.jsonl", "--ckpt_batch=2"])
    drop = {"wall_time", "sample_time", "checkpoints_batched"}
    one, two = (common.read_jsonl(tiny_run / f) for f in ("one.jsonl", "two.jsonl"))
    assert ([r["step"] for r in two] == [0, 10, 20, 30] and two[3]["llc_mean"] is None
            and "error" in two[3])
    # 20 was redone alone, 30 failed
    assert [r.get("checkpoints_batched") for r in two] == [2, 2, 1, None]
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop}


def test_cli_subset_restriction_and_missing_steps(tiny_run, capsys):
    llc.main(["--ckpt", str(tiny_run), *CLI, "--steps=10", "--include=blocks.**", "--exclude",
              "**.bias", "--out=rllc.jsonl", "--per_token"])
    (row,) = common.read_jsonl(tiny_run / "rllc.jsonl")
    assert row["step"] == 10 and row["include"] == "blocks.**" and len(row["llc_per_token"]) == 4
    with pytest.raises(SystemExit) as e:
        llc.main(["--ckpt", str(tiny_run), *CLI, "--steps=10,15"])
    assert e.value.code == 2 and "no checkpoint for step(s) [15]" in capsys.readouterr().err


def test_cli_calibrate_writes_a_table_and_trace_figures(tiny_run, capsys):
    llc.main(["--ckpt", str(tiny_run), *CLI, "--calibrate", "--calib_steps=20",
              "--calib_epsilon=1e-3,1e4", "--calib_nbeta=30", "--calib_gamma=6"])
    table = json.loads((tiny_run / "llc_calibration.json").read_text())
    assert len(table) == 2 and table[0]["llc_mean"] is not None and table[1]["llc_mean"] is None
    assert (tiny_run / "llc_calibration" / "step_0000020_gamma_6.png").exists()
    assert "nbeta" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["llc_v1", "llc_v2", "llc_quick", "llc_cpu"])
def test_config_files_parse(name):
    path = os.path.join(os.path.dirname(llc.__file__), "configs", f"{name}.py")
    cfg = common.configure(llc.DEFAULTS, [path])
    assert cfg["epsilon"] > 0 and cfg["num_chains"] >= 1


# -------------------------------------------- the hand-written batched gradient and the chain modes
def _stacked(params, G, seed=0, scale=0.02):
    """G perturbed copies of the parameters, stacked: (G, *shape) per name."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(G, *v.shape, generator=gen) for k, v in params.items()}


@pytest.mark.parametrize("G,per_token", [(1, False), (3, False), (2, True)])
def test_native_gradient_matches_autograd_on_the_module(G, per_token):
    cfg = ICLConfig(n_layer=2, d_model=16, d_mlp=24, n_head=2)
    model, task = cfg.build(0), Task(K=5)
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs, ys = task.sample(torch.Generator().manual_seed(1), G * 7)
    xs, ys = xs.view(G, 7, 5, 4), ys.view(G, 7, 5)
    stk = _stacked(params, G)
    loss, grads = icl_loss_and_grads(cfg, stk, xs, ys, per_token=per_token)
    assert loss.shape == ((G, 5) if per_token else (G,))
    for c in range(G):
        pc = {k: v[c].clone().requires_grad_() for k, v in stk.items()}
        out = functional_call(model, pc, (to_tokens(xs[c], ys[c]),))
        ref = (task.loss_per_token if per_token else task.loss)(out, ys[c])
        ref_g = torch.autograd.grad(ref.mean(), list(pc.values()))
        torch.testing.assert_close(loss[c], ref.detach(), rtol=1e-6, atol=1e-7)
        for (k, _), g in zip(pc.items(), ref_g):
            torch.testing.assert_close(grads[k][c], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(),
                                       msg=k)


@pytest.mark.parametrize("G", [1, 2])
def test_slicing_the_last_block_changes_nothing(G):
    """Computing the last block's queries, MLP and unembedding only at the x-token rows (and only
    output channel 0) gives the very same loss; the gradients agree to float rounding (sums over
    fewer rows)."""
    model, task = ICLConfig().build(0), Task()
    stk = _stacked({k: v.detach() for k, v in model.named_parameters()}, G, seed=2)
    xs, ys = task.sample(torch.Generator().manual_seed(3), G * 16)
    xs, ys = xs.view(G, 16, 8, 4), ys.view(G, 16, 8)
    l1, g1 = icl_loss_and_grads(model.cfg, stk, xs, ys, slice_last=True)
    l0, g0 = icl_loss_and_grads(model.cfg, stk, xs, ys, slice_last=False)
    assert torch.equal(l1, l0)
    assert set(g1) == set(g0) == set(stk)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=2e-6 * g0[k].abs().max().item(),
                                   msg=k)


@pytest.mark.parametrize("include", [None, "blocks.1.**"])
def test_chain_modes_give_the_same_chains(include):
    model, task = ICLConfig(d_model=16, d_mlp=16).build(0), Task()
    params = {k: v.detach() for k, v in model.named_parameters()}
    kw = dict(epsilon=1e-3, gamma=6.0, nbeta=60.0, num_chains=3, num_draws=5, num_burnin=2,
              batch_size=16, n=64, seed=4, include=include)
    loss_fn = RunLoss(model, task)
    assert sgld.pick_chain_mode(loss_fn, "cpu", 16, 10) == "native_loop"
    assert sgld.pick_chain_mode(lambda p, b: 0, "cpu", 1024, 52_000) == "loop"
    assert sgld.pick_chain_mode(lambda p, b: 0, "cpu", 1000, 30) == "vmap"
    runs = {m: llc.estimate_llc(loss_fn, params, task.sample, chain_mode=m, **kw)
            for m in ("native", "native_loop", "loop", "vmap")}
    assert (runs["native"]["chain_mode"] == "native"
            and runs["vmap"]["num_params"] == runs["native"]["num_params"])
    for m, r in runs.items():
        torch.testing.assert_close(r["loss_trace"], runs["vmap"]["loss_trace"], rtol=1e-5,
                                   atol=1e-7, msg=m)
    with pytest.raises(ValueError, match="batched_grad"):
        llc.estimate_llc(quad_loss, {"w": torch.zeros(2)}, ZERO_DATA, chain_mode="native", **{
            k: kw[k] for k in ("epsilon", "gamma", "nbeta")})


def test_native_modes_refuse_a_stale_hand_derived_gradient():
    """A model whose code no longer matches fast/grad.py (here: its output doubled) fails the check
    against autograd: an explicit native mode raises with what to do; auto warns once and runs the
    autograd chains instead."""
    model, task = ICLConfig(d_model=16, d_mlp=16).build(0), Task()
    params = {k: v.detach() for k, v in model.named_parameters()}
    kw = dict(epsilon=1e-3, gamma=6.0, nbeta=60.0, num_chains=2, num_draws=2, batch_size=8, n=32,
              seed=0)
    assert llc.estimate_llc(RunLoss(model, task), params, task.sample,
                            **kw)["chain_mode"] == "native_loop"
    model.forward = lambda tokens: 2 * type(model).forward(model, tokens)
    for mode in ("native", "native_loop"):
        with pytest.raises(ValueError, match="disagrees with autograd.*chain_mode='loop'"):
            llc.estimate_llc(RunLoss(model, task), params, task.sample, chain_mode=mode, **kw)
    with pytest.warns(UserWarning, match="disagrees with autograd.*chain_mode='vmap'") as rec:
        auto = llc.estimate_llc(RunLoss(model, task), params, task.sample, **kw)
    assert len([w for w in rec if "autograd" in str(w.message)]) == 1
    vm = llc.estimate_llc(RunLoss(model, task), params, task.sample, chain_mode="vmap", **kw)
    assert auto["chain_mode"] == "vmap" and torch.equal(auto["loss_trace"], vm["loss_trace"])


def test_a_forked_model_falls_back_to_autograd_in_llc_py(tmp_path, monkeypatch, recwarn):
    """The most common fork: edit model.py (here the MLP branch scaled by 1.5) and rerun llc.py with
    a paper config's --chain_mode=auto. The hand-derived gradient fails its check, llc.py warns once
    and completes, and its row equals --chain_mode=loop's (tests/test_forks.py: the default,
    autograd, never warns)."""
    import model as model_py
    # the L2H4 model: at batch 256, auto's autograd choice on a CPU is the loop
    cfg = dict(task="regression", D=4, K=8, sigma2=0.125, num_tasks=0, task_seed=0, n_layer=2,
               n_head=4, d_model=64, d_mlp=64, seed=0)
    common.atomic_write(tmp_path / "config.json", json.dumps(cfg))
    common.save_checkpoint(tmp_path, 5, data.build_model(cfg, 0))
    block_forward = model_py.Block.forward

    def forked(self, x):
        y = x + self.attention(self.layer_norms[0](x))
        return y + 1.5 * self.compute(self.layer_norms[1](y))
    monkeypatch.setattr(model_py.Block, "forward", forked)
    assert model_py.Block.forward is not block_forward
    cli = ["--num_chains=2", "--num_draws=3", "--num_burnin=1", "--batch_size=256", "--n=512",
           "--device=cpu", "--chain_mode=auto"]
    llc.main([str(tmp_path), *cli, "--out=auto.jsonl"])
    warned = [w for w in recwarn if "hand-derived gradient disagrees" in str(w.message)]
    assert len(warned) == 1 and "chain_mode='loop'" in str(warned[0].message)
    llc.main([str(tmp_path), *cli, "--out=loop.jsonl", "--chain_mode=loop"])
    (auto,), (loop,) = (common.read_jsonl(tmp_path / f) for f in ("auto.jsonl", "loop.jsonl"))
    timing = {"wall_time", "sample_time"}
    assert auto["chain_mode"] == "loop" and auto["llc_mean"] is not None
    assert {k: v for k, v in auto.items() if k not in timing} == {
        k: v for k, v in loop.items() if k not in timing}
    # the real model: the fast path again
    monkeypatch.setattr(model_py.Block, "forward", block_forward)
    llc.main([str(tmp_path), *cli, "--out=native.jsonl"])
    assert common.read_jsonl(tmp_path / "native.jsonl")[0]["chain_mode"] == "native_loop"


@pytest.mark.parametrize("mode,include",
                         [("native_loop", None), ("native", None), ("vmap", "blocks.1.**")])
def test_checkpoints_batched_into_one_computation_give_their_own_estimates(mode, include):
    """A list of checkpoints (their own frozen parameters too) in one batched computation: each
    result equals that checkpoint's own estimate (same minibatches, noise and L(w*) set); a
    checkpoint whose chains all diverge is named in the error."""
    task = Task()
    models = [ICLConfig(d_model=16, d_mlp=16).build(s) for s in range(3)]
    ps = [{k: v.detach() for k, v in m.named_parameters()} for m in models]
    kw = dict(epsilon=1e-3, gamma=6.0, nbeta=60.0, num_chains=3, num_draws=5, num_burnin=2,
              batch_size=16, n=64, seed=4, chain_mode=mode, include=include)
    loss_fn = RunLoss(models[0], task)
    many = llc.estimate_llc(loss_fn, ps, task.sample, **kw)
    assert len(many) == 3 and all(r["checkpoints_batched"] == 3 for r in many)
    for p, r in zip(ps, many):
        own = llc.estimate_llc(loss_fn, p, task.sample, **kw)
        assert own["checkpoints_batched"] == 1 and r["init_loss"] == own["init_loss"]
        torch.testing.assert_close(r["loss_trace"], own["loss_trace"], rtol=1e-5, atol=1e-6)
        if mode == "native_loop":  # one chain at a time: the very same arithmetic
            assert torch.equal(r["loss_trace"], own["loss_trace"])
    assert len({r["llc_mean"] for r in many}) == 3  # three different checkpoints
    if include is None:
        with pytest.raises(llc.AllChainsDivergedError, match=r"checkpoint\(s\) \[1\] of the 3"):
            llc.estimate_llc(loss_fn, [ps[0], {k: 300 * v for k, v in ps[1].items()}, ps[2]],
                             task.sample, **kw)
    with pytest.raises(ValueError, match="same parameter names and shapes"):
        llc.estimate_llc(loss_fn, [ps[0], {"w": torch.zeros(2)}], task.sample, **kw)


def test_cpu_chain_workers_are_bit_identical_and_row_chunks_change_only_rounding():
    """native_loop on CPU: chains spread over worker threads give the very same chains; a batch
    processed in row chunks (10 + 10 + 4 rows here) gives the whole-batch chains up to float
    rounding; the threads are restored."""
    model, task = ICLConfig(d_model=16, d_mlp=16).build(0), Task()
    params = {k: v.detach() for k, v in model.named_parameters()}
    kw = dict(epsilon=1e-3, gamma=6.0, nbeta=60.0, num_chains=3, num_draws=6, num_burnin=2,
              batch_size=24, n=96, seed=7, chain_mode="native_loop")
    loss_fn = RunLoss(model, task)
    run = lambda **o: llc.estimate_llc(  # noqa
        loss_fn, params, task.sample, **kw, **o)["loss_trace"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's own setting must not leak into one chain's arithmetic
    try:
        one, two = run(workers=1, grad_chunk=10), run(workers=2, grad_chunk=10)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    whole = run(workers=1, grad_chunk=0)
    assert not torch.equal(one, whole)  # the chunked sum really ran
    torch.testing.assert_close(one, whole, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="grad_chunk"):
        run(grad_chunk=-1)


@pytest.mark.skipif(not torch.cuda.is_available() or fast.triton is None,
                    reason="needs CUDA and triton")
def test_cuda_graph_replays_the_eager_chains():
    model, task = ICLConfig().build(0), Task()
    params = {k: v.detach().cuda() for k, v in model.named_parameters()}
    kw = dict(epsilon=1e-3, gamma=6.0, nbeta=60.0, num_chains=4, num_draws=20, num_burnin=5,
              batch_size=64, n=256, seed=5, device="cuda", chain_mode="native")
    eager = llc.estimate_llc(RunLoss(model.cuda(), task), params, task.sample, **kw)
    graph = llc.estimate_llc(RunLoss(model.cuda(), task), params, task.sample, cuda_graph=True,
                             **kw)
    assert graph["cuda_graph"] and eager["update_backend"] == "triton"
    torch.testing.assert_close(graph["loss_trace"], eager["loss_trace"], rtol=1e-6, atol=0)


# --------------------------------------------------------------- torchrun: checkpoints across ranks
def test_torchrun_two_gloo_ranks_write_the_single_process_rows(tiny_run):
    """2 CPU ranks (gloo) split 4 checkpoints and rank 0 writes them: the same rows (same numbers,
    same order) as one process; a second torchrun resumes with the two left batched into one
    computation."""
    import subprocess
    import sys
    common.save_checkpoint(tiny_run, 30, data.build_model(common.load_run(tiny_run), 30))
    # the one-chain-at-a-time hand-derived mode: bit-identical across processes (vmap, autograd's
    # default, is equal only to float rounding when the batch of checkpoints differs)
    cli = [*CLI, "--chain_mode=auto"]
    llc.main(["--ckpt", str(tiny_run), *cli, "--out=single.jsonl", "--device=cpu"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torchrun's argparse would take `--n=32` for an abbreviation of its own options
    conf = tiny_run / "llc_conf.py"
    conf.write_text("".join(f"{a[2:].split('=')[0]} = {a.split('=')[1]}\n" for a in CLI)
                    + 'chain_mode = "auto"\n')
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(os.path.dirname(llc.__file__), "llc.py"), str(conf), "--ckpt",
           str(tiny_run), "--device=cpu", "--out=multi.jsonl", "--steps=0,10"]
    # half the checkpoints ...
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    cmd[-1:] = ["--steps=0,10,20,30", "--ckpt_batch=2"]  # the two left as one batch, on rank 0
    # ... then resume
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 checkpoint(s) to do, 2 already" in proc.stderr
    timing = {"wall_time", "sample_time", "checkpoints_batched"}
    single, multi = (common.read_jsonl(tiny_run / f) for f in ("single.jsonl", "multi.jsonl"))
    assert [r["step"] for r in multi] == [0, 10, 20, 30]
    for a, b in zip(single, multi):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing}


@pytest.mark.skipif(fast.triton is None, reason="triton not installed")
def test_triton_update_checks_itself_and_a_broken_kernel_falls_back(monkeypatch):
    """Before its first use on a device the kernel is compared with the torch update (the noise-free
    part exactly, the noise's mean and variance statistically); a kernel that disagrees is reported
    once and not used."""
    kernels = fast.kernels  # the check calls the kernel module's own sgld_update_triton
    monkeypatch.setattr(kernels, "_TRITON_CHECKED", {})
    assert fast.triton_update_ok(KDEV, sgld.sgld_update_torch)
    real = kernels.sgld_update_triton
    for broken in (
            # a wrong drift
            lambda W, W0, G, a, b, c, key: real(W, W0, G, a * 1.01, b, c, key),
            # noise variance 1.44
            lambda W, W0, G, a, b, c, key: real(W, W0, G, a, b, 1.2 * c, key)):
        monkeypatch.setattr(kernels, "_TRITON_CHECKED", {})
        monkeypatch.setattr(kernels, "sgld_update_triton", broken)
        with pytest.warns(UserWarning, match="Triton SGLD update failed its check"):
            assert not fast.triton_update_ok(KDEV, sgld.sgld_update_torch)
        assert not fast.triton_update_ok(KDEV, sgld.sgld_update_torch)  # checked once per device


def test_cli_help_and_bad_options(tiny_run, capsys):
    """--help lists every option with its default and meaning; a misspelt key or a bad value is one
    line on stderr, exit code 2, and nothing is written."""
    with pytest.raises(SystemExit) as e:
        llc.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"--{k}=" in out for k in llc.DEFAULTS)
    assert re.search(r"--epsilon=0.0003 +SGLD step size", out)
    for bad, msg in ((["--epsilonn=1e-3"], "did you mean epsilon"),
                     (["--num_chains=two"], "num_chains must be int"),
                     (["--chain_mode=fast"], "chain_mode must be one of"),
                     ([], "give the run directory"),
                     ([str(tiny_run / "nope")], "is not a training run")):
        with pytest.raises(SystemExit) as e:
            llc.main(([str(tiny_run)] if bad and bad[0].startswith("--") else []) + bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1, (bad, err)
    assert not (tiny_run / "llc.jsonl").exists()
