"""Observables during sampling (sgld.Settings.observe) and the susceptibilities built on them: a
known answer where the sampler's stationary distribution is exact (a quadratic loss, full-batch
gradients: a Gaussian), a plain reference computation of the running moments, and LLC values that
do not move when observables are recorded."""

import numpy as np
import pytest
import torch

import analyze
import common
import data
import llc
import sgld
from analysis import susceptibility
from test_llc import write_run

D, N = 3, 64
EPS, NBETA, GAMMA = 1e-3, 10.0, 1.0


def quadratic():
    """A linear regression with a fixed set of rows: its mean squared error is quadratic in w, and
    w* is its exact minimum, so SGLD with full batches is a linear Gaussian recursion around w*."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        N, generator=g, dtype=torch.float64)
    w_star = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]

    def loss_fn(p, batch):
        xb, yb = batch
        return ((xb @ p["w"] - yb) ** 2).mean()
    probes = [(torch.randn(32, D, generator=g, dtype=torch.float64) * s, None) for s in (1.0, 2.0)]
    probes = [(Xp, Xp @ w_star + 0.5) for Xp, _ in probes]  # probe 1 is shifted: its targets too
    return X, y, w_star, loss_fn, probes


PROBLEM = quadratic()


def stationary_cov():
    """The exact stationary covariance of x = w - w* under sgld's update x <- M x + sqrt(eps) xi,
    M = I - (eps/2) (nbeta * Hessian + gamma): per eigenvalue l of the precision, eps / (1 - (1 -
    eps l / 2)^2), not the continuum's 1 / l."""
    X = PROBLEM[0]
    lam, U = torch.linalg.eigh(NBETA * 2 * X.T @ X / N + GAMMA * torch.eye(D, dtype=X.dtype))
    var = EPS / (1 - (1 - EPS * lam / 2) ** 2)
    return U @ torch.diag(var) @ U.T


def run(observe, chain_mode="vmap", draws=20_000, every=5, chains=8, burnin=2000):
    X, y, w_star, loss_fn, _ = PROBLEM
    return sgld.estimate_llc(loss_fn, {"w": w_star}, (X, y), epsilon=EPS, nbeta=NBETA,
                             gamma=GAMMA, num_chains=chains, num_draws=draws, num_burnin=burnin,
                             chain_mode=chain_mode, observe=observe,
                             observe_every=every)


def probe_losses(p):
    """The observable vector: the parameters themselves, then the loss on each probe set."""
    _, _, _, loss_fn, probes = PROBLEM
    return torch.cat([p["w"], torch.stack([loss_fn(p, pr) for pr in probes])])


def quad_moments(A, b, B, d, S):
    """Cov(x'Ax + b'x, x'Bx + d'x) for x ~ N(0, S): 2 tr(A S B S) + b' S d."""
    return float(2 * torch.trace(A @ S @ B @ S) + b @ S @ d)


def test_observed_covariance_matches_the_exact_gaussian_answer():
    """The chains' covariance of w and of the probe losses against the exact stationary answer,
    within 4 standard errors (the spread of the chains' own covariances / sqrt(chains)); the se is
    small enough for the comparison to mean something."""
    obs = run(probe_losses)["observed"]
    est, se = obs["cov"].mean(0), obs["cov"].std(0, ddof=1) / np.sqrt(obs["cov"].shape[0])
    S = stationary_cov()
    _, _, w_star, _, probes = PROBLEM
    quad = [(Xp.T @ Xp / len(Xp), 2 * Xp.T @ (Xp @ w_star - yp) / len(Xp)) for Xp, yp in probes]
    exact = np.zeros((D + 2, D + 2))
    exact[:D, :D] = S.numpy()
    for i, (A, b) in enumerate(quad):
        exact[D + i, :D] = exact[:D, D + i] = (S @ b).numpy()  # Cov(x'Ax + b'x, x) = S b
        for j, (B, d) in enumerate(quad):
            exact[D + i, D + j] = quad_moments(A, b, B, d, S)
    z = np.abs(est - exact) / se
    assert z.max() < 4, (z.round(2), est, exact)
    assert (se.diagonal() < 0.1 * np.abs(exact.diagonal())).all(), (se, exact)
    assert obs["draws"] == 20_000 // 5 and obs["mean"].shape == (8, D + 2)


def test_running_moments_equal_a_plain_computation():
    """One chain at a time (chain_mode='loop'), every observation kept by the observable itself: the
    per-chain mean and covariance (ddof 1) equal numpy's over the kept list."""
    kept = []

    def observe(p):
        kept.append(p["w"].detach().clone())
        return p["w"]
    obs = run(observe, chain_mode="loop", draws=300, every=7, chains=3, burnin=50)["observed"]
    xs = torch.stack(kept).reshape(-1, 3, D).numpy()  # (observations, chains, D)
    assert xs.shape[0] == obs["draws"] == len(range(0, 300, 7))
    for c in range(3):
        np.testing.assert_allclose(obs["mean"][c], xs[:, c].mean(0), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(obs["cov"][c], np.cov(xs[:, c].T), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_observing_changes_no_llc_value(mode):
    plain = run(None, mode, draws=400, chains=4, burnin=50)
    seen = run(probe_losses, mode, draws=400, chains=4, burnin=50)
    assert plain["llc_per_chain"] == seen["llc_per_chain"]
    assert "observed" in seen and "observed" not in plain


def test_observe_every_must_be_positive():
    with pytest.raises(ValueError, match="observe_every=0 must be at least 1"):
        run(probe_losses, every=0)


# -------------------------------------------------------------------------------- llc.py --probes
@pytest.fixture
def two_layer_run(tmp_path):
    """A run with 2 layers of 4 heads (8 components for --restrictions=heads), 3 checkpoints."""
    return write_run(tmp_path, n_layer=2, n_head=4, d_model=16, d_mlp=16)


PROBES = ["--probes=ood_inputs/3,tasks/4,tasks/16,positions", "--probe_rows=32", "--bif_rows=8",
          "--observe_every=2", "--num_chains=3", "--num_draws=30", "--num_burnin=4",
          "--batch_size=8", "--n=32", "--trace_points=4"]


def test_one_command_gives_finite_susceptibilities_for_every_head_and_probe(two_layer_run, capsys):
    """--restrictions=heads with three probe distributions (and the 4 positions): each checkpoint's
    8 rows carry a finite susceptibility and se per probe; the positions' add up to 0 (they are
    deviations from their own mean); the per-sample covariances are written beside the rows and
    analyze.py draws and summarises them; a rerun does nothing, other probes are refused."""
    llc.main([str(two_layer_run), "--restrictions=heads", *PROBES])
    rows = common.read_jsonl(two_layer_run / "llc_heads.jsonl")
    assert len(rows) == 3 * 8 and {r["probes"] for r in rows} == {PROBES[0].partition("=")[2]}
    for r in rows:
        chi, se = r["susceptibility"], r["susceptibility_se"]
        assert set(chi) == {"ood_inputs/3", "tasks/4", "tasks/16",
                            *(f"position/{k}" for k in range(1, 5))}
        assert all(np.isfinite(chi[p]) and se[p] > 0 for p in chi), r
        assert abs(sum(chi[f"position/{k}"] for k in range(1, 5))) < 1e-9 + 1e-6 * max(
            abs(v) for v in chi.values())
        with np.load(two_layer_run / r["loss_kernel"]) as z:
            assert z["cov"].shape == (16, 16) and int(z["samples"]) == 8
    capsys.readouterr()
    llc.main([str(two_layer_run), "--restrictions=heads", *PROBES])
    assert "0 checkpoint(s) to do" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        llc.main([str(two_layer_run), "--restrictions=heads", "--probes=ood_inputs/5",
                  *PROBES[1:]])
    assert e.value.code == 2 and "probes='ood_inputs/3,tasks/4,tasks/16,positions'" in (
        capsys.readouterr().err)
    summary = analyze.main([str(two_layer_run), "--eval_size=64", "--ed_batch=16",
                            "--hessian_probes=0", "--lanczos_iters=0"])
    sus = summary["susceptibility"]
    assert len(sus["components"]) == 8 and len(sus["probes"]) == 7 and sus["steps"] == 3
    assert sus["loss_kernel"]["samples"] == 8 and sus["loss_kernel"]["step"] == 20
    assert {"figures/9_susceptibility.png", "figures/10_loss_kernel.png"} <= set(
        summary["figures"])


@pytest.mark.parametrize("bad, says", [
    ("--bif_rows=17", "--bif_rows=17 must be in 0 .. probe_rows / 2 (16)"),
    ("--probes=sideways/2", "--probes: data_refine 'sideways/2'"),
    ("--observe_every=0", "observe_every=0 must be at least 1"),
])
def test_bad_probe_options_are_one_line(two_layer_run, capsys, bad, says):
    with pytest.raises(SystemExit) as e:
        llc.main([str(two_layer_run), *PROBES, bad])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (two_layer_run / "llc.jsonl").exists()


def test_token_rows_on_a_task_without_per_prediction_losses_is_one_line(two_layer_run, capsys,
                                                                         monkeypatch):
    """A forked task with no loss_elements: --token_rows is a usage error naming what is missing,
    before anything is written."""
    monkeypatch.delattr(data.Task, "loss_elements")
    with pytest.raises(SystemExit) as e:
        llc.main([str(two_layer_run), *PROBES, "--bif_rows=0", "--token_rows=4"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "loss_elements" in err, err
    assert not (two_layer_run / "llc.jsonl").exists()


def test_columns_are_the_covariances_they_name():
    """Probes.columns against a direct computation on a random covariance: chi = -(Cov[phi, L_p] -
    Var[phi]) with phi the mean of the K position losses, each chain's, then their mean and sd /
    sqrt(chains)."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 6, 6))
    cov = A @ A.transpose(0, 2, 1)  # 4 chains, K = 4 positions + 2 probes
    pr = susceptibility.Probes.__new__(susceptibility.Probes)
    pr.names, pr.positions, pr.samples, pr.tokens = ["a", "b"], True, 0, 0
    out = pr.columns(dict(cov=cov, mean=np.zeros((4, 6)), draws=7), None, 0)
    phi = np.r_[np.full(4, 0.25), 0, 0]
    for name, j in (("a", 4), ("b", 5), ("position/2", 1)):
        each = -(cov[:, j] @ phi - np.einsum("i,cij,j->c", phi, cov, phi))
        assert out["susceptibility"][name] == pytest.approx(each.mean(), rel=1e-12)
        assert out["susceptibility_se"][name] == pytest.approx(each.std(ddof=1) / 2, rel=1e-12)


def test_development_finds_where_the_matrix_changes():
    """A matrix that jumps between two checkpoints: the speed peaks there, and a boundary at that
    step is aligned (ratio within 1.6), one a decade away is not."""
    steps = [0, 10, 100, 1000, 10_000, 100_000]
    chi = np.zeros((2, 3, len(steps)))
    chi[:, :, 4:] = 1.0 + np.arange(6).reshape(2, 3, 1)  # the change: between 1,000 and 10,000
    chi += 1e-3 * np.random.default_rng(0).normal(size=chi.shape)
    dev = susceptibility.development(dict(steps=steps, chi=chi), [3000, 300])
    peak = int(np.argmax(dev["speed"]))
    assert dev["speed_steps"][peak] == pytest.approx(np.sqrt(1001 * 10_001) - 1)
    assert dev["boundaries"][0]["aligned"] and not dev["boundaries"][1]["aligned"]
    assert dev["evr"][0] > 0.9
