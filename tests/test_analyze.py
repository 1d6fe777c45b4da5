"""analyze.py and stages.py: stage detection, Gram-matrix PCA, smoothing, osculating circles,
Hessian tools, the task table, the command line, end to end."""
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import analyze
from analysis import metrics, plots, regression, stages, tables
import common
import data
import train


def paper_steps(N=500_000):
    """The reference checkpoint schedule (log 100 ∪ linear 100 below N): 190 steps for N =
    500k."""
    return np.array(train.checkpoint_steps(N, 100, 100), dtype=float)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def true_minima(f, x0, x1):
    """Interior local minima of |f'| of an analytic curve f(x), x = log(t+1), on a fine grid."""
    x = np.linspace(x0, x1, 20001)
    a = np.abs(np.gradient(f(x), x))
    return x[[i for i in range(1, len(x) - 1) if a[i] < a[i - 1] and a[i] <= a[i + 1]]]


# ------------------------------------------------------------------------------------ stage
# detection
LOG_TOL = 0.3  # nats of log(t+1): a boundary within a factor e^0.3 = 1.35 of the target step


def test_stages_found_on_synthetic_curve_with_known_critical_points():
    """Rise, plateau, bigger rise, peak, fall, then a rise: boundaries at the minima of |f'| (x =
    log(t+1) ≈ 6.1 plateau, 9.8 peak, 12.0 trough), typed A, A, B, A; noise adds none."""
    def f(x):
        return (20 * sigmoid((x - 5) / 0.3) + 130 * sigmoid((x - 8) / 0.35)
                - 40 * sigmoid((x - 11) / 0.3) + 30 * sigmoid((x - 13) / 0.3))
    steps = paper_steps()
    x = np.log1p(steps)
    expected = true_minima(f, 0, x[-1])
    assert len(expected) == 3
    rng = np.random.default_rng(0)
    for noise in (0.0, 0.5):
        det = stages.detect_stages(steps, f(x) + noise * rng.standard_normal(len(x)))
        found = np.log1p(det["boundaries"])
        assert len(found) == 3, (noise, det["boundaries"], np.expm1(expected))
        assert np.abs(found - expected).max() < LOG_TOL, (noise, det["boundaries"],
                                                          np.expm1(expected))
        assert [s["type"] for s in det["stages"]] == ["A", "A", "B", "A"]


@pytest.mark.parametrize("kind", ["sigmoid", "linear"])
def test_no_stage_boundaries_on_a_monotone_curve(kind):
    """Still moving at the end of training: one stage."""
    steps = paper_steps()
    x = np.log1p(steps)
    y = {"sigmoid": 150 * sigmoid((x - 8) / 1.2), "linear": 10 * x}[kind]
    y = y + 0.01 * np.ptp(y) * np.random.default_rng(1).standard_normal(len(x))
    det = stages.detect_stages(steps, y)
    assert det["boundaries"] == []
    assert [s["type"] for s in det["stages"]] == ["A"]
    assert (det["stages"][0]["start"], det["stages"][0]["end"]) == (0, int(steps[-1]))


@pytest.mark.parametrize("seed", [1, 4])
def test_a_saturated_curve_ends_in_a_flat_stage_where_it_stops_moving(seed):
    """A loss that falls and then stays flat to within its noise (1% of the range) for the last ~2
    nats of log-time. Whether its slope is told apart from 0 there depends on the noise draw (a
    boundary for 6 of seeds 0-7; none for seed 4); where a boundary is placed does not: after the
    true slope has fallen below slope_frac of its peak, with the rest of the curve moving by less
    than 1% of its range (last stage Other)."""
    steps = paper_steps()
    x = np.log1p(steps)
    f = lambda x: 4.3 - 2.5 * sigmoid((x - 8) / 0.8)  # noqa: E731
    noise = 0.025 * np.random.default_rng(seed).standard_normal(len(x))
    det = stages.detect_stages(steps, f(x) + noise)
    assert len(det["boundaries"]) <= 1
    assert det["stages"][0]["type"] == "B"
    for b in det["boundaries"]:
        slope_max = 2.5 / (4 * 0.8)
        assert abs(np.gradient(f(np.log1p(b) + np.array([0, 1e-6])), 1e-6)[0]) < 0.1 * slope_max
        assert abs(f(np.log1p(b)) - f(x[-1])) < 0.01 * 2.5
        assert det["stages"][-1]["type"] == "Other"


def reference_curve(reference_dir):
    """The paper's seed-mean v1 LLC and its per-checkpoint standard error std/sqrt(5 seeds)."""
    ref = np.genfromtxt(reference_dir / "paper_v1_seedmean.csv", delimiter=",", names=True)
    return ref["step"], ref["llc_mean"], ref["llc_std"] / math.sqrt(5)


PAPER_BOUNDARIES = np.log1p([1_000, 40_000, 126_000, 320_000])  # the paper's LR1-LR5 boundaries


def test_stages_on_the_paper_llc_curve(reference_dir):
    """Boundaries near 1k, 40k, 126k, 320k, each within LOG_TOL nats of log(t+1), types A, A, B, B,
    Other; with the standard errors as heteroscedastic noise and without them."""
    steps, llc, se = reference_curve(reference_dir)
    for s in (se, None):
        det = stages.detect_stages(steps, llc, s)
        found = np.log1p(det["boundaries"])
        assert len(found) == 4, det["boundaries"]
        assert np.abs(found - PAPER_BOUNDARIES).max() < LOG_TOL, det["boundaries"]
        assert [s["type"] for s in det["stages"]] == ["A", "A", "B", "B", "Other"]


def test_stages_on_the_paper_llc_curve_with_noise_of_two_standard_errors(reference_dir):
    """Independent noise of 2 se per checkpoint (seeds 0-9), the GP told the se. Measured for seeds
    0-99: no boundary farther than LOG_TOL from the four (so none below step 300); 40k and 320k
    found for all 100 seeds, 1k for 99, 126k for 89, all four for 88 (here 8 of 10: seed 8 misses
    1k, seed 9 126k). Asserted: what held for every seed, and all four for at least 7 of the 10. The
    last stage's type is not asserted: its rise (+4.5 LLC, 2.7% of the range, Other in the paper)
    smooths to 9-15 here, mostly typed A."""
    steps, llc, se = reference_curve(reference_dir)
    complete = 0
    for seed in range(10):
        noisy = llc + 2 * se * np.random.default_rng(seed).standard_normal(len(llc))
        det = stages.detect_stages(steps, noisy, se)
        dist = np.abs(np.log1p(det["boundaries"])[:, None] - PAPER_BOUNDARIES[None])
        assert (dist.min(1) < LOG_TOL).all(), (seed, det["boundaries"])  # nothing spurious
        assert (dist[:, [1, 3]] < LOG_TOL).any(0).all(), (seed, det["boundaries"])  # 40k and 320k
        if len(det["boundaries"]) == 4:
            complete += 1
            assert [s["type"] for s in det["stages"][:4]] == ["A", "A", "B", "B"], seed
    assert complete >= 7


def test_gp_uses_the_standard_errors_as_noise():
    """Points with a large standard error barely pull the fit; the se scale and t0 are learned."""
    t = np.expm1(np.linspace(0, 12, 120))
    y = 10 * sigmoid((np.log1p(t) - 6) / 0.7) + 0.05 * np.random.default_rng(0).standard_normal(120)
    se = np.full(120, 0.05)
    se[::10], y[::10] = 5.0, y[::10] + 4.0  # every 10th point off by 4 but marked as noisy
    mean, cov, hp = stages.gp_fit(t, y, se)
    assert np.abs(mean - 10 * sigmoid((np.log1p(t) - 6) / 0.7)).max() < 0.3, hp
    assert 0.3 < hp["se_scale"] < 3 and 1 <= hp["t0"] <= t[-1]
    assert cov.shape == (120, 120) and np.all(np.diag(cov) >= -1e-9)
    plain, _, _ = stages.gp_fit(t, y)  # the same points as equals: the outliers pull the fit
    assert np.abs(plain - mean)[::10].max() > 0.3


def test_stages_degenerate_inputs():
    assert stages.detect_stages([0, 1, 2], [1.0, 2.0, 3.0])["boundaries"] == []
    det = stages.detect_stages(np.arange(50), np.ones(50))
    assert det["boundaries"] == [] and det["stages"][0]["type"] == "Other"


def test_stage_names_take_the_prefix(reference_dir):
    """LR1, LR2, ... by default; the prefix a task gives (LM for the language model) otherwise."""
    steps, llc, se = reference_curve(reference_dir)
    names = [s["name"] for s in stages.detect_stages(steps, llc, se)["stages"]]
    assert names == [f"LR{j}" for j in range(1, 6)]
    det = stages.detect_stages(steps, llc, se, prefix="LM")
    assert [s["name"] for s in det["stages"]] == [f"LM{j}" for j in range(1, 6)]


# ------------------------------------------------------------------------------------ essential
# dynamics
def test_streaming_gram_pca_equals_svd_of_stacked_data(tmp_path):
    rng = np.random.default_rng(0)
    N, F = 30, 1500
    X = (rng.standard_normal((N, 3)) * [10, 3, 1]) @ rng.standard_normal((3, F)) \
        + 0.1 * rng.standard_normal((N, F)) + 5.0
    X = X.astype(np.float32)
    path = tmp_path / "x.f32"
    X.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r").reshape(N, F)
    # two "runs" (row subsets, one permuted) and a tiny memory budget: many column chunks
    rows = [np.arange(0, 12)[::-1], np.arange(12, N)]
    G = stages.gram([mm, mm], rows, mem_bytes=8 * N * 97)
    Xs = np.concatenate([X[r] for r in rows]).astype(np.float64)
    np.testing.assert_allclose(G, Xs @ Xs.T, rtol=1e-10)
    scores, evr = stages.pca_from_gram(G, k=4)
    Xc = Xs - Xs.mean(0)
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    ref = U[:, :4] * S[:4]
    for c in range(4):
        sign = np.sign(ref[:, c] @ scores[:, c])
        np.testing.assert_allclose(scores[:, c], sign * ref[:, c], atol=1e-6 * S[0])
    np.testing.assert_allclose(evr, S[:4] ** 2 / (S ** 2).sum(), rtol=1e-8)
    # several runs: each centred on its own mean, one shared basis
    groups = np.repeat([0, 1], [len(r) for r in rows])
    scores_g, evr_g = stages.pca_from_gram(G, k=3, groups=groups)
    Xg = np.concatenate([Xs[groups == g] - Xs[groups == g].mean(0) for g in (0, 1)])
    U, S, _ = np.linalg.svd(Xg, full_matrices=False)
    np.testing.assert_allclose(np.abs(scores_g), np.abs(U[:, :3] * S[:3]), atol=1e-6 * S[0])
    np.testing.assert_allclose(evr_g, S[:3] ** 2 / (S ** 2).sum(), rtol=1e-8)
    cols = np.arange(0, F, 7)  # the y-only variant: a column subset
    Xy = X[:, cols].astype(np.float64)
    np.testing.assert_allclose(stages.gram([mm], cols=cols, mem_bytes=800), Xy @ Xy.T, rtol=1e-10)


@pytest.mark.parametrize("direction", [1, -1])
def test_osculating_circle_of_a_circle(direction):
    centre, R, n = np.array([1.0, -2.0]), 3.0, 400
    t = direction * np.linspace(0, 2 * np.pi, n, endpoint=False) + 0.3
    c = centre + R * np.stack([np.cos(t), np.sin(t)], 1)
    centres, radii = stages.osculating_circles(c)
    assert centres.shape == (n - 2, 2)
    # central differences on a sampled circle give R (1 + cos h)/2: 6e-5 relative at h = 2π/400
    np.testing.assert_allclose(radii, R, rtol=1e-4)
    np.testing.assert_allclose(centres, np.broadcast_to(centre, centres.shape), atol=1e-3)


def test_evolute_cusps_of_an_ellipse_are_at_its_vertices():
    """The evolute of an ellipse (an astroid) has its four cusps at the ellipse's vertices, where
    the curvature is extremal; the sharpest points are the two ends of the major axis."""
    n = 400
    t = 2 * np.pi * np.arange(n) / n + 0.05
    c = np.stack([3 * np.cos(t), np.sin(t)], 1)
    # t = π/2 .. 2π
    vertices = np.round((np.pi / 2 * np.arange(1, 5) - 0.05) * n / (2 * np.pi)).astype(int)
    out = stages.cusp_candidates(c, skip=1, top=4)
    assert np.abs(np.sort(out["cusps"]) - vertices).max() <= 2, (out, vertices)
    out = stages.cusp_candidates(c, skip=1, top=2)
    assert np.abs(np.sort(out["sharp"]) - vertices[[1, 3]]).max() <= 1, (out, vertices)
    # the criterion is geometric: the same ellipse traversed at a varying speed has the same cusps
    t2 = 2 * np.pi * (np.arange(n) / n) ** 1.3 + 0.05
    c2 = np.stack([3 * np.cos(t2), np.sin(t2)], 1)
    v2 = [int(np.argmin(np.abs(t2 - v))) for v in np.pi / 2 * np.arange(1, 5)]
    assert np.abs(np.sort(stages.cusp_candidates(c2, skip=1, top=4)["cusps"]) - v2).max() <= 2, v2


def test_variable_sigma_smoother():
    rng = np.random.default_rng(0)
    n = 200
    sig = np.linspace(0.1, 30, n)
    # weights sum to 1: constants are preserved, also at the ends and with several channels
    np.testing.assert_allclose(stages.smooth_variable_sigma(np.full((n, 3), 2.5), sig), 2.5,
                               rtol=1e-12)
    y = rng.standard_normal(n)
    # sigma 0: identity
    np.testing.assert_array_equal(stages.smooth_variable_sigma(y, np.zeros(n)), y)
    # constant sigma: a reflect-mode ('symmetric' padding) convolution with the normalised Gaussian
    s, r = 2.5, int(4 * 2.5 + 0.5)
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
    ref = np.convolve(np.pad(y, r, mode="symmetric"), w / w.sum(), mode="valid")
    np.testing.assert_allclose(stages.smooth_variable_sigma(y, np.full(n, s)), ref, atol=1e-12)
    # symmetric kernel: a straight line is unchanged away from the ends
    line = stages.smooth_variable_sigma(np.arange(n, dtype=float), np.full(n, 3.0))
    np.testing.assert_allclose(line[15:-15], np.arange(n)[15:-15], atol=1e-9)
    with pytest.raises(ValueError, match="one sigma per point"):
        stages.smooth_variable_sigma(y, sig[:-1])
    with pytest.raises(ValueError, match=">= 0"):
        stages.smooth_variable_sigma(y, -sig)


# ------------------------------------------------------------------------------------------ Hessian
def flat_loss(model, loss_of_output, inputs):
    names, ps = zip(*[(n, p.detach()) for n, p in model.named_parameters()])
    w0 = torch.cat([p.reshape(-1) for p in ps])

    def f(w):
        chunks = torch.split(w, [p.numel() for p in ps])
        params = {n: c.view_as(p) for n, c, p in zip(names, chunks, ps)}
        return loss_of_output(functional_call(model, params, (inputs,)))
    return f, w0


def small_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    xs, ys = torch.randn(32, 3), torch.randn(32)
    yield mlp, (lambda o: (o[:, 0] - ys).pow(2).mean()), xs
    from data import Task, to_tokens
    from model import ICLConfig
    icl = ICLConfig(D=2, K=3, n_layer=1, n_head=2, d_model=4, d_mlp=4).build(0)
    b = Task(D=2, K=3).eval_batch(0, 16)
    yield icl, (lambda o: Task.loss(o, b["ys"])), to_tokens(b["xs"], b["ys"])


@pytest.mark.parametrize("which", [0, 1], ids=["mlp", "icl_transformer"])
def test_hessian_tools_match_the_exact_hessian(which):
    model, loss_of_output, inputs = list(small_models())[which]
    hvp, n = metrics.make_hvp(model, loss_of_output, inputs)
    f, w0 = flat_loss(model, loss_of_output, inputs)
    H = torch.autograd.functional.hessian(f, w0).double()
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(hvp(v).double(), H @ v.double(), rtol=1e-4, atol=1e-5)
    # Hutchinson: each probe is exactly v^T H v, and the mean is unbiased (within 5 standard errors)
    probes = 300
    est, vals = metrics.hutchinson_trace(hvp, n, probes, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    for val in vals[:3]:
        r = (torch.randint(0, 2, (n,), generator=g).double() * 2 - 1)
        assert val == pytest.approx(float(r @ H @ r), rel=1e-4, abs=1e-5)
    se = math.sqrt(2 * float((H ** 2).sum() - (H.diagonal() ** 2).sum()) / probes)
    assert abs(est - float(H.trace())) < 5 * se + 1e-6
    # Lanczos with a full Krylov space recovers the top eigenvalues exactly
    exact = torch.linalg.eigvalsh(H).flip(0)[:3].numpy()
    top = metrics.lanczos_top(hvp, n, n, 3, torch.Generator().manual_seed(3))
    np.testing.assert_allclose(top, exact, rtol=1e-3, atol=1e-4 * abs(exact[0]))
    # and a few iterations already give the largest one to within a few percent
    top1 = metrics.lanczos_top(hvp, n, 20, 1, torch.Generator().manual_seed(3))[0]
    assert top1 == pytest.approx(exact[0], rel=0.05)


# ------------------------------------------------------------------------------------------ end to
# end
def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def tiny_run(out_dir, seed, diverged=(), holes=()):
    """A 60-step run and synthetic llc.jsonl rows in llc.py's format (rise, peak, fall). At the
    indices in `diverged` all chains diverged (llc_mean null, as llc.py writes it); at those in
    `holes` one chain did (null in llc_per_chain and loss_trace) and llc_se and rhat are null."""
    argv = [f"--out_dir={out_dir}", f"--seed={seed}", "--max_steps=60", "--batch_size=32",
            "--n_log=12", "--n_lin=4", "--eval_batch_size=64", "--log_interval=20",
            "--d_model=16", "--d_mlp=16", "--n_head=2", "--device=cpu"]
    cfg = common.configure(train.DEFAULTS, argv)
    train.train(cfg)
    steps = common.list_checkpoints(out_dir)
    rng = np.random.default_rng(seed)
    for i, s in enumerate(steps):
        if i in diverged:
            common.append_jsonl(out_dir / "llc.jsonl",
                                dict(step=s, llc_mean=None, nan_chains=[0, 1],
                                     error="all 2 SGLD chains diverged"))
            continue
        llc = 5 + 40 * math.exp(-((math.log1p(s) - 2.5) / 1.2) ** 2) + 20 * math.log1p(s) / 4
        traces = [(0.5 + llc / 60 * (1 - np.exp(-np.arange(1, 11) / 3))
                   + 0.01 * rng.standard_normal(10)).tolist()
                  for _ in range(2)]
        row = dict(step=s, llc_mean=llc, llc_std=3.0, llc_se=0.5,
                   llc_per_chain=[llc - 1, llc + 1], rhat=1.01 + 0.01 * i, init_loss=0.5,
                   nan_chains=[], loss_trace=traces, trace_draws=list(range(10, 101, 10)),
                   epsilon=1e-3, gamma=6.0, nbeta=60.0, num_chains=2, num_draws=100,
                   num_burnin=0, batch_size=32, seed=0, wall_time=0.1)
        if i in holes:
            row.update(llc_per_chain=[llc, None], llc_se=None, rhat=None, nan_chains=[1],
                       loss_trace=[traces[0], traces[1][:4] + [None] * 6])
        common.append_jsonl(out_dir / "llc.jsonl", row)
    return steps


FAST = ["--eval_size=128", "--ed_batch=32", "--hessian_batch=16", "--hessian_probes=1",
        "--lanczos_iters=3"]
FIGURES = ["1_loss_llc.png", "2_essential_dynamics.png", "3_behaviour.png", "4_structure.png",
           "5_llc_diagnostics.png"]


def fake_run(path, cfg=None):
    """A folder that passes as a run on the command line: config.json and one (empty) checkpoint
    file."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg or {}))
    common.ckpt_path(path, 0).touch()
    return str(path)


def one_line_exit(capsys, argv):
    """analyze.main(argv) must exit with code 2 and one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        analyze.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_command_line_runs_options_and_errors(tmp_path, capsys):
    """Bare arguments are run directories, .py files are config files, `--key value` keeps its
    value; bad options, no run directory or one that is not a run fail with one line and exit code
    2, before anything is written."""
    fast = tmp_path / "fast.py"
    fast.write_text("eval_size = 64\n")
    s0, s1 = fake_run(tmp_path / "s0"), fake_run(tmp_path / "s1")
    argv = [s0, "--out", "out/seeds", s1, str(fast), "--chunk", "0", "--device=cpu"]
    opt, runs = analyze.parse(argv)
    assert runs == [s0, s1]
    parsed = (opt["out"], opt["eval_size"], opt["chunk"], opt["device"])
    assert parsed == ("out/seeds", 64, 0, "cpu")
    nowhere, bare, nockpt = tmp_path / "nowhere", tmp_path / "bare", tmp_path / "nockpt"
    bare.mkdir(), nockpt.mkdir()
    (nockpt / "config.json").write_text("{}")
    odd = fake_run(tmp_path / "odd", {"task": "vision"})
    before = sorted(tmp_path.rglob("*"))
    assert "unknown option 'eval_sise'" in one_line_exit(capsys, [s0, "--eval_sise=64"])
    assert "eval_size must be int" in one_line_exit(capsys, [s0, "--eval_size=lots"])
    err = one_line_exit(capsys, [s0, "--alpha=high"])
    assert err == "analyze.py: alpha must be float, got str 'high' in argument --alpha=high"
    assert "run directories" in one_line_exit(capsys, ["--eval_size=64"])
    for d in (nowhere, bare):
        assert "not a training run" in one_line_exit(capsys, [s0, str(d)])
    assert "no checkpoints" in one_line_exit(capsys, [str(nockpt)])
    assert "task must be one of" in one_line_exit(capsys, [odd])
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_help_lists_every_option_and_a_misspelt_option_exits_2(tmp_path):
    """`python analyze.py --help` exits 0 and lists every option with its default and a one-line
    meaning; `--eval_sise=3` exits 2 with one line on stderr (naming the option and its likely
    spelling), writing nothing."""
    from conftest import ROOT
    r = subprocess.run([sys.executable, str(ROOT / "analyze.py"), "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for key, val in analyze.DEFAULTS.items():
        line = next((ln for ln in lines if ln.strip().startswith(f"--{key}={val!r} ")), None)
        assert line is not None and len(line.split(f"--{key}={val!r}", 1)[1].strip()) > 10, (
            key, line)
    run = fake_run(tmp_path / "run")
    before = sorted(tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, str(ROOT / "analyze.py"), run, "--eval_sise=3"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "eval_sise" in r.stderr and "eval_size" in r.stderr and r.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_each_task_names_an_evaluator_and_a_figure_set():
    """data.TASKS names functions that exist here and in plots; the regression evaluator brings the
    ED variant's columns (the y-predictions), its summary keys, and the in-repo paper curves only
    for K=8 on the 500k schedule."""
    def named(name, module):  # the task table's 'module:function' (the LM's) or a local name
        return data.resolve(name) if ":" in name else getattr(module, name)
    for name in data.TASKS:
        kind = data.kind({"task": name})
        assert callable(named(kind.evaluator, analyze)), name
        assert callable(named(kind.figures, plots)), name
    repo = analyze.Path(analyze.__file__).resolve().parent
    assert regression.REFERENCE.resolve().is_relative_to(repo)
    opt = dict(analyze.DEFAULTS, ed_batch=3)
    cfg = dict(K=8, D=4, max_steps=500_000)
    ev = analyze.Evaluator(**regression.evaluator(None, cfg, opt, torch.device("cpu")))
    assert ev.meta["width"] == 3 * 16 * 5 and not ev.final and "icl_1_4" in ev.summary_keys
    feats = np.arange(ev.meta["width"]).reshape(3, 16, 5)
    # channel 0 at the x tokens
    np.testing.assert_array_equal(ev.ed_cols, feats[:, 0::2, 0].ravel())
    assert len(ev.reference) == 190 and ev.reference["step"][-1] == 499_999
    assert {"llc_mean", "loss_mean"} <= set(ev.reference.dtype.names)
    short = regression.evaluator(None, dict(cfg, max_steps=60), opt, torch.device("cpu"))
    assert short["reference"] is None


@pytest.mark.slow
def test_end_to_end_two_seeds_cache_and_fallback(tmp_path):
    runs = [tmp_path / "s0", tmp_path / "s1"]
    steps = tiny_run(runs[0], 0, diverged=[3], holes=[0, 5])
    tiny_run(runs[1], 1)
    with pytest.warns(UserWarning, match="diverged"):
        summary = analyze.main([str(runs[0]), *FAST])
    out = runs[0]
    for name in FIGURES:
        w, h = png_size(out / "figures" / name)
        assert 300 <= w <= 3000 and 200 <= h <= 3000, name
        assert (out / "figures" / name).stat().st_size > 10_000, name
    disk = json.loads((out / "summary.json").read_text())
    assert disk == json.loads(json.dumps(summary))
    assert {"runs", "signal", "warnings", "n_checkpoints", "boundaries", "stages", "detector",
            "essential_dynamics", "figures"} <= set(disk)
    assert disk["signal"] == "llc" and disk["n_checkpoints"] == len(steps)
    # the diverged row is reported and left out of the stage detection; the rows with holes are kept
    assert len(disk["warnings"]) == 1 and f"[{steps[3]}]" in disk["warnings"][0]
    assert disk["llc_diverged_steps"] == [[steps[3]]]
    det = json.loads((out / "stages.json").read_text())
    assert steps[3] not in det["steps"] and {steps[0], steps[5]} <= set(det["steps"])
    assert det["params"]["heteroscedastic"]
    st = disk["stages"]
    assert st[0]["start"] == 0 and st[-1]["end"] == steps[-1]
    assert all(s["type"] in ("A", "B", "Other") for s in st)
    assert all(a["end"] == b["start"] for a, b in zip(st, st[1:]))
    assert {"loss", "delta_ridge", "llc", "weight_norm"} <= set(st[0]["metrics"])
    ev = disk["essential_dynamics"]["explained_variance"]
    assert len(ev) == 4 and 0 < sum(ev) <= 1 + 1e-9 and ev == sorted(ev, reverse=True)
    assert json.loads((out / "stages.json").read_text())["boundaries"] == disk["boundaries"]
    assert "| LR1 |" in (out / "report.md").read_text()
    assert [s["name"] for s in st] == [f"LR{j + 1}" for j in range(len(st))]
    rows = common.read_jsonl(out / "analysis.jsonl")
    assert len(rows) == len(steps)
    assert {"hessian_trace", "hessian_eigs", "ln_collapse/unembed", "tok_spec", "unembed_w",
            "loss/8", "pred_norm"} <= set(rows[0])

    # cached: a rerun evaluates nothing new
    ed_size = (out / "ed_outputs.f32").stat().st_size
    with pytest.warns(UserWarning, match="diverged"):
        analyze.main([str(out), *FAST])
    assert len(common.read_jsonl(out / "analysis.jsonl")) == len(steps)
    assert (out / "ed_outputs.f32").stat().st_size == ed_size

    # two seeds into --out: mean ± std, stages on the mean LLC
    both = tmp_path / "both"
    with pytest.warns(UserWarning, match="diverged"):
        summary2 = analyze.main([*map(str, runs), f"--out={both}", *FAST])
    assert summary2["runs"] == [str(r) for r in runs]
    assert all((both / "figures" / f).exists() for f in FIGURES)

    # no llc.jsonl: stages from the test loss, with a warning in the output and in summary.json
    (out / "llc.jsonl").unlink()
    with pytest.warns(UserWarning, match="test loss"):
        summary3 = analyze.main([str(out), *FAST])
    assert summary3["signal"] == "loss" and "test loss" in summary3["warnings"][0]
    assert all((out / "figures" / f).stat().st_size > 10_000 for f in FIGURES)


# --------------------------------------------------------------------------------------- language
# model
def test_lm_demo_pipeline_train_llc_analyze(tmp_path):
    """The LM demo pipeline (train -> llc -> analyze) end to end at a tiny size: figures (the
    head-score panel included), summary keys and per-head scores in analysis.jsonl."""
    import llc
    import lm.data as lm_data
    import lm.plots
    from conftest import ROOT
    data_dir, out = tmp_path / "python-v5000-ctx32", tmp_path / "run"
    lm_data.prepare(data_dir, "python", 5000, 32, 0.05, "train", progress=lambda msg: None)
    train.train(common.configure(train.defaults_for("lm"), [
        str(ROOT / "configs" / "lm_tiny.py"), f"--out_dir={out}", f"--data_dir={data_dir}",
        "--n_ctx=32", "--d_model=16", "--n_head=2", "--batch_size=8", "--max_steps=24",
        "--n_log=8", "--n_lin=0", "--ckpt_every=23", "--eval_batch_size=8", "--log_interval=8",
        "--device=cpu"]))
    steps = common.list_checkpoints(out)
    assert len(steps) >= 6
    llc.main([f"--ckpt={out}", "--num_chains=2", "--num_draws=8", "--num_burnin=0",
              "--batch_size=4", "--n=16", "--epsilon=1e-3", "--gamma=100", "--nbeta=10"])
    assert len(common.read_jsonl(out / "llc.jsonl")) == len(steps)
    summary = analyze.main([str(out), "--lm_rows=48", "--lm_ed=48", "--lm_head_seqs=20",
                            "--lm_bigram_seqs=48", "--lm_ngrams=50", "--threads=1"])
    for key in ("signal", "boundaries", "stages", "essential_dynamics", "figures", "final"):
        assert key in summary
    assert set(summary["figures"]) == {f"figures/{f}" for f in lm.plots.FIGURES}
    for f in lm.plots.FIGURES:
        w, h = png_size(out / "figures" / f)
        assert w > 200 and h > 200
    assert len(summary["essential_dynamics"]["explained_variance"]) >= 2
    names = [s["name"] for s in summary["stages"]]
    assert names == [f"LM{j + 1}" for j in range(len(names))] and names
    assert [s["name"] for s in json.loads((out / "stages.json").read_text())["stages"]] == names
    rows = common.read_jsonl(out / "analysis.jsonl")
    assert [r["step"] for r in rows] == steps
    heads = [f"{k}/L{a}H{b}" for k in ("prev_token", "prefix") for a in range(2) for b in range(2)]
    heads += [f"kcomp/{a}-{b}" for a in range(2) for b in range(2)]
    for r in rows:
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in heads), r
        assert r["loss"] > 0 and len(r["pos_norms"]) == 32
        assert {"bigram", "icl", "ngram/2"} <= r.keys()
    assert (out / "report.md").exists()
    assert json.loads((out / "summary.json").read_text())["signal"] in ("llc", "loss")
    # cached: a second call evaluates nothing new and gives the same stages; with synthetic refined
    # LLCs of the model's four heads (two planted shapes) the clusters carry the mean head scores at
    # the last checkpoint
    names, groups = ["L0H0", "L0H1", "L1H0", "L1H1"], [0, 1, 1, 0]
    Y = planted_curves(steps, groups)
    write_refined(out / "llc_heads.jsonl", steps, dict(zip(names, Y)), restriction_set="heads",
                  restriction=None)
    write_refined(out / "llc_data-code.jsonl", steps, {"code": Y[0]}, data_refine=None)
    again = analyze.main([str(out), "--lm_rows=48", "--lm_ed=48", "--lm_head_seqs=20",
                          "--lm_bigram_seqs=48", "--lm_ngrams=50", "--threads=1",
                          "--head_clusters=2"])
    assert again["boundaries"] == summary["boundaries"]
    assert again["figures"][-2:] == ["figures/6_head_llc.png", "figures/8_data_refined_llc.png"]
    clusters = again["refined"]["head_clusters"]["clusters"]
    assert [c["heads"] for c in clusters] == [["L0H0", "L1H1"], ["L0H1", "L1H0"]]
    for c in clusters:
        for key in ("prev_token", "prefix"):
            assert c[key] == pytest.approx(np.mean([rows[-1][f"{key}/{h}"] for h in c["heads"]]))
    assert "| 0 | L0H0, L1H1 | " in (out / "report.md").read_text()
    assert len(common.read_jsonl(out / "analysis.jsonl")) == len(steps)


# ------------------------------------------------------------------------------------------ refined
# LLCs
def planted_curves(steps, groups, seed=0):
    """Curves over `steps` of three shapes in log-time (0 rising, 1 rise-and-fall, 2 falling), one
    per entry of `groups`, each scaled by a random factor with 5% multiplicative noise."""
    rng = np.random.default_rng(seed)
    x = np.log1p(np.asarray(steps, float)) / np.log1p(max(steps)) * 8
    shapes = [5 + 40 * sigmoid(x - 3), 2 + 50 * np.exp(-((x - 4) / 1.5) ** 2),
              60 - 50 * sigmoid(x - 5)]
    return np.array([shapes[g] * rng.uniform(0.5, 2) * (1 + 0.05 * rng.standard_normal(len(x)))
                     for g in groups])


def same_partition(labels, groups):
    # noqa: E731
    pairs = lambda v: {(i, j) for i in range(len(v)) for j in range(len(v)) if v[i] == v[j]}
    return pairs(list(labels)) == pairs(list(groups))


def test_kmeans_and_silhouette_recover_planted_clusters():
    """Three shapes of curve (scales differ, 5% noise, a negative and a missing estimate): the
    silhouette picks k = 3 and k-means finds the planted groups (up to relabelling); a given k is
    used as is."""
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1]
    Y = planted_curves(np.arange(30) ** 3, groups)
    Y[0, 3], Y[4, 5] = -1.0, np.nan
    labels, k, sil = stages.cluster_curves(Y)
    assert k == 3 and same_partition(labels, groups), (labels, sil)
    assert sil[3] == max(sil.values()) and set(sil) == {2, 3, 4, 5, 6} and labels[0] == 0
    Z = stages.normalise_curves(Y)
    # missing: the row's mean
    assert np.isfinite(Z).all() and np.allclose(Z.mean(1), 0) and Z[4, 5] == 0
    # negative: on the floor
    assert np.allclose(np.delete(Z, 4, 0).std(1), 1) and Z[0, 3] == Z[0].min()
    assert stages.silhouette(Z, labels) > 0.5 > stages.silhouette(Z, np.arange(len(Z)) % 3)
    labels2, k2, sil2 = stages.cluster_curves(Y, k=2)
    assert k2 == 2 and sil2 == {} and len(set(labels2.tolist())) == 2
    assert stages.cluster_curves(Y[:2])[1] == 1  # too few curves to choose
    # identical curves (e.g. one checkpoint each): one cluster found whatever k, silhouette 0
    labels3, _, sil3 = stages.cluster_curves(np.ones((4, 1)))
    assert set(labels3.tolist()) == {0} and set(sil3.values()) == {0.0}


def write_refined(path, steps, curves, **keys):
    """llc.py's refined rows: {name: curve} into path, each row with `keys` and its name under the
    one key whose value is None (restriction or data_refine); a NaN value is a diverged estimate
    (llc_mean null)."""
    name_key = next(k for k, v in keys.items() if v is None)
    for name, y in curves.items():
        for s, v in zip(steps, y):
            ok = bool(np.isfinite(v))
            common.append_jsonl(path, dict(step=s, llc_mean=float(v) if ok else None,
                                           llc_se=0.3 if ok else None, llc_std=1.0, rhat=1.0,
                                           num_params=100, **{**keys, name_key: name}))


@pytest.mark.slow
def test_refined_llcs_clusters_figures_and_stages(tmp_path):
    """A run without llc_*.jsonl: no refined outputs. With synthetic head, paper-component and
    data-refined rows: figures 6-8, the head clusters (the planted pairs, no head scores for
    regression) in summary.json, report.md and on stdout, --head_clusters fixes k, --refined_stages
    gives every curve's boundaries."""
    run = tmp_path / "run"
    steps = tiny_run(run, 0)
    plain = analyze.main([str(run), *FAST])
    assert "refined" not in plain and len(plain["figures"]) == 5
    assert not (run / "figures" / "6_head_llc.png").exists()
    heads, groups = ["L0H0", "L0H1", "L1H0", "L1H1", "L1H2"], [0, 1, 1, 0, 1]
    Y = planted_curves(steps, groups)
    Y[2, 4] = np.nan
    write_refined(run / "llc_heads.jsonl", steps, dict(zip(heads[::-1], Y[::-1])),
                  restriction_set="heads", restriction=None)
    paper = {"all": Y.sum(0), "token_embedding": Y[0], "blocks.0.mlp": Y[1]}
    write_refined(run / "llc_paper.jsonl", steps, paper, restriction_set="paper", restriction=None)
    for name, y in (("tasks/64", Y[0]), ("ood_inputs/3", Y[1])):
        path = run / f"llc_data-{name.replace('/', '-')}.jsonl"
        write_refined(path, steps, {name: y}, data_refine=None)
    summary = analyze.main([str(run), *FAST, "--refined_stages=True"])
    assert summary["boundaries"] == plain["boundaries"]
    new = ["figures/6_head_llc.png", "figures/7_component_llc.png",
           "figures/8_data_refined_llc.png"]
    assert summary["figures"] == plain["figures"] + new
    for f in new:
        assert png_size(run / f)[0] > 300 and (run / f).stat().st_size > 10_000
    ref = json.loads((run / "summary.json").read_text())["refined"]
    # heads in numeric order, files by name
    assert ref["curves"] == {"heads": heads, "paper": ["all", "token_embedding", "blocks.0.mlp"],
                             "data": ["ood_inputs/3", "tasks/64"]}
    hc = ref["head_clusters"]
    assert hc["k"] == 2 and hc["chosen_by"] == "silhouette"
    assert [c["heads"] for c in hc["clusters"]] == [["L0H0", "L1H1"], ["L0H1", "L1H0", "L1H2"]]
    # regression: no head scores
    assert all(set(c) == {"cluster", "heads"} for c in hc["clusters"])
    report = (run / "report.md").read_text()
    assert "| 0 | L0H0, L1H1 |" in report and "| 1 | L0H1, L1H0, L1H2 |" in report
    assert "## Refined LLCs" in report
    assert set(ref["stages"]) == {"heads", "paper", "data"}
    assert set(ref["stages"]["data"]) == {"tasks/64", "ood_inputs/3"}
    assert all(isinstance(d["boundaries"], list) and d["types"]
               for per in ref["stages"].values() for d in per.values())
    fixed = analyze.main([str(run), *FAST, "--head_clusters=3"])
    assert fixed["refined"]["head_clusters"]["k"] == 3 and "stages" not in fixed["refined"]


def test_weight_and_data_refined_rows_of_one_sweep_stay_apart(tmp_path):
    """A heads sweep on the run's data and one on a refined distribution are different curves, not
    one overwriting the other."""
    row = lambda **kw: {"step": 5, "llc_mean": 1.0, "llc_se": 0.1, **kw}  # noqa: E731
    common.append_jsonl(tmp_path / "llc_heads.jsonl",
                        row(restriction_set="heads", restriction="L0H0"))
    common.append_jsonl(tmp_path / "llc_heads_data-code.jsonl",
                        row(restriction_set="heads", restriction="L0H0", data_refine="code",
                            llc_mean=9.0))
    common.append_jsonl(tmp_path / "llc_data-code.jsonl", row(data_refine="code", llc_mean=3.0))
    groups = tables.read_refined(tmp_path)
    assert groups["heads"]["L0H0"][5]["llc_mean"] == 1.0
    assert groups["heads on code"]["L0H0"][5]["llc_mean"] == 9.0
    assert groups["data"]["code"][5]["llc_mean"] == 3.0
