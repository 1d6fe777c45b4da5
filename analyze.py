"""Analyse training runs: per-checkpoint metrics, essential dynamics, stages, figures and a report.

    python analyze.py out/tiny                              # outputs in out/tiny
    python analyze.py out/s0 out/s1 out/s2 --out=out/seeds  # seeds: mean ± std across runs, outputs in --out
                                                            # (default: the first run directory)
Per run (cached, only new checkpoints are evaluated): analysis.jsonl (one row per checkpoint), ed_outputs.f32
(the raw model outputs on the fixed ED batch, one float32 row per checkpoint, for essential dynamics) and
analysis_meta.json (the settings; changing them recomputes everything). Into the output directory:
stages.json, summary.json, report.md, figures/*.png. Several runs share one stage detection (on the mean
curve over the steps common to all runs) and one PCA (all runs' rows in one Gram matrix, each run centred
on its own mean). Without llc.jsonl the stages come from the test loss (a warning, also in summary.json).
Quicker on a CPU: --eval_size=2048 --hessian_batch=256 (or --hessian_probes=0 --lanczos_iters=0).
Specs: ../shared/spec/regression.md §8-9, llc-and-ed.md §3-5.
"""
import argparse, io, json, math, os, sys, time, warnings
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch.func import functional_call, grad

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402

import common
import data

REFERENCE = Path(__file__).resolve().parent.parent / "shared" / "reference" / "paper_v1_seedmean.csv"
STAGE_COLORS = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#dd8452", "#937860"]


# ------------------------------------------------------------------------------------- stage detection
def gp_smooth(x, y, x_eval, lengthscales=np.geomspace(0.15, 4, 18), noises=np.geomspace(1e-6, 1, 25),
              max_fit=400):
    """GP regression with an RBF kernel (numpy); lengthscale and noise ratio by maximum marginal likelihood
    on a grid, the amplitude profiled out in closed form. One eigendecomposition per lengthscale makes the
    whole noise grid cheap. Fits on at most `max_fit` points spread evenly in x. Returns (mean at x_eval, hp)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) > max_fit:
        keep = np.unique(np.searchsorted(x, np.linspace(x[0], x[-1], max_fit)).clip(0, len(x) - 1))
        x, y = x[keep], y[keep]
    mu, sd = y.mean(), y.std() or 1.0
    z, n, best = (y - mu) / sd, len(x), (-np.inf,)
    for ls in lengthscales:
        lam, Q = np.linalg.eigh(np.exp(-0.5 * (x[:, None] - x[None]) ** 2 / ls ** 2))
        qz = Q.T @ z
        for r in noises:
            ev = lam.clip(0) + r
            amp2 = max(np.sum(qz ** 2 / ev) / n, 1e-300)
            lml = -0.5 * n * np.log(amp2) - 0.5 * np.log(ev).sum()
            if lml > best[0]:
                best = (lml, ls, r, amp2, Q @ (qz / ev))
    _, ls, r, amp2, alpha = best
    mean = mu + sd * np.exp(-0.5 * (np.asarray(x_eval, float)[:, None] - x[None]) ** 2 / ls ** 2) @ alpha
    return mean, dict(lengthscale=float(ls), noise_std=float(sd * math.sqrt(r * amp2)))


def d_dx(x, f):
    """Mean of forward and backward differences (ends: the one-sided difference), as the paper's d_dt."""
    fw = np.diff(f) / np.diff(x)
    return np.concatenate([fw[:1], 0.5 * (fw[1:] + fw[:-1]), fw[-1:]])


def prominence(a, i):
    """How far the local minimum a[i] lies below the lower of the two highest points separating it from a
    lower value (or from the edge) on either side: small for wiggles inside a flat stretch."""
    lo = np.nonzero(a[:i] < a[i])[0]
    left = a[(lo[-1] if len(lo) else 0):i + 1].max()
    lo = np.nonzero(a[i + 1:] < a[i])[0]
    right = a[i:(i + 1 + lo[0]) if len(lo) else len(a)].max()
    return float(min(left, right) - a[i])


def detect_stages(steps, values, slope_frac=0.1, prom_frac=0.03, min_change_frac=0.05, min_log_len=0.25,
                  flat_frac=0.05):
    """Stage boundaries from a curve over training steps (llc-and-ed.md §4), automatically.

    1. Smooth the curve against x = log(t+1) with `gp_smooth`; slope s = d(curve)/dx at the checkpoints.
    2. Candidates: local minima of |s| below slope_frac * max|s| (the paper: |s| < 8 ~ 0.065 max) whose
       prominence is at least prom_frac * max|s| (drops wiggles in flat stretches).
    3. Pruning, with thr = max(min_change_frac * range, 2 * GP noise std): a candidate within min_log_len of
       either end is dropped; the first candidate is dropped if the curve has not yet moved by thr from its
       start (a flat start is part of the first stage); of two consecutive candidates closer than
       min_log_len or whose values differ by less than thr, the one with the larger |s| is dropped (repeat).
    4. Types from the smoothed change over each stage: A rising, B falling by more than flat_frac * range,
       else Other. A flat last stage is allowed (the paper's LR5).
    """
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    ok = np.isfinite(values)
    steps, values = steps[ok], values[ok]
    x = np.log1p(steps)
    if len(x) < 5 or np.ptp(values) == 0:
        m, hp, cand, minima = values, {}, [], []
    else:
        m, hp = gp_smooth(x, values, x)
        a = np.abs(d_dx(x, m))
        amax, thr = a.max(), max(min_change_frac * np.ptp(m), 2 * hp["noise_std"])
        minima = [i for i in range(1, len(x) - 1)
                  if a[i] <= a[i - 1] and a[i] < a[i + 1] and a[i] < slope_frac * amax]
        cand = [i for i in minima if prominence(a, i) >= prom_frac * amax
                and min(x[i] - x[0], x[-1] - x[i]) >= min_log_len]
        if cand and abs(m[cand[0]] - m[0]) < thr:
            cand.pop(0)
        while True:
            bad = [k for k in range(len(cand) - 1) if x[cand[k + 1]] - x[cand[k]] < min_log_len
                   or abs(m[cand[k + 1]] - m[cand[k]]) < thr]
            if not bad:
                break
            k = bad[0]
            cand.pop(k if a[cand[k]] > a[cand[k + 1]] else k + 1)
    edges = [0, *cand, len(x) - 1]
    rng = np.ptp(m) or 1.0
    stages = []
    for j, (i0, i1) in enumerate(zip(edges[:-1], edges[1:])):
        dv = float(m[i1] - m[i0])
        kind = "A" if dv > flat_frac * rng else "B" if dv < -flat_frac * rng else "Other"
        stages.append(dict(name=f"LR{j + 1}", start=int(steps[i0]), end=int(steps[i1]), type=kind, change=dv))
    return dict(boundaries=[int(steps[i]) for i in cand], stages=stages, candidates=[int(steps[i]) for i in minima],
                smoothed=np.asarray(m).tolist(),
                steps=steps.astype(int).tolist(), gp=hp,
                params=dict(slope_frac=slope_frac, prom_frac=prom_frac, min_change_frac=min_change_frac,
                            min_log_len=min_log_len, flat_frac=flat_frac))


# --------------------------------------------------------------------------------- essential dynamics
def gram(mats, rows=None, cols=None, mem_bytes=2 ** 28):
    """G = X X^T in float64, X the row-wise stack of mats[i][rows[i]] (arrays or np.memmaps of equal width),
    summed over column chunks so only an (N x chunk) slab is ever in memory: any number of features."""
    rows = [np.arange(len(m)) for m in mats] if rows is None else rows
    N = sum(len(r) for r in rows)
    cols = np.arange(mats[0].shape[1]) if cols is None else np.asarray(cols)
    chunk, G = max(1, mem_bytes // (8 * N)), np.zeros((N, N))
    for i in range(0, len(cols), chunk):
        c = cols[i:i + chunk]
        Xc = np.concatenate([np.asarray(m[np.ix_(r, c)], dtype=np.float64) for m, r in zip(mats, rows)])
        G += Xc @ Xc.T
    return G


def pca_from_gram(G, k=4, groups=None):
    """Centred PCA from a Gram matrix (llc-and-ed.md §3.2): G_c = J G J, J = I - 11^T/N; scores U sqrt(L).
    With `groups` (a label per row, e.g. the run) each group is centred on its own mean, so that several
    seeds share one basis of their development rather than of their differences. Signs are fixed so that
    the last row's score is >= 0. Returns (scores (N, k), explained-variance ratios)."""
    g = np.zeros(len(G)) if groups is None else np.asarray(groups)
    Gc = np.array(G, dtype=np.float64)
    for lab in np.unique(g):  # J G J in O(N^2): subtract each group's mean row, then its mean column
        i = g == lab
        Gc[i] -= Gc[i].mean(0)
        Gc[:, i] -= Gc[:, i].mean(1, keepdims=True)
    lam, U = np.linalg.eigh(Gc)
    lam, U = lam[::-1].clip(0), U[:, ::-1]
    scores = U[:, :k] * np.sqrt(lam[:k])
    scores *= np.where(scores[-1] < 0, -1.0, 1.0)
    return scores, lam[:k] / (lam.sum() or 1.0)


def smooth_variable_sigma(y, sigmas, truncate=4.0):
    """Gaussian smoothing along axis 0 with a width per output point (llc-and-ed.md §3.3): output i is the
    centre value of a reflect-mode Gaussian filter of width sigmas[i] on the window i ± int(truncate*sigma+0.5)
    clipped to the array (so reflection happens only at the array ends). Weights sum to 1."""
    y, sigmas = np.asarray(y, float), np.asarray(sigmas, float)
    if len(sigmas) != len(y):
        raise ValueError(f"need one sigma per point: {len(sigmas)} sigmas for {len(y)} points")
    if (sigmas < 0).any():
        raise ValueError(f"sigmas must be >= 0, got min {sigmas.min()}")
    out = np.empty_like(y)
    for i, s in enumerate(sigmas):
        r = int(truncate * s + 0.5)
        lo, hi = max(0, i - r), min(len(y), i + r + 1)
        k = np.arange(-r, r + 1)
        w = np.exp(-0.5 * (k / max(s, 1e-12)) ** 2)
        idx = (i - lo + k) % (2 * (hi - lo))  # reflect about the window edges: d c b a | a b c d | d c b a
        idx = np.where(idx >= hi - lo, 2 * (hi - lo) - 1 - idx, idx)
        out[i] = np.tensordot(w / w.sum(), y[lo + idx], axes=1)
    return out


def osculating_circles(c):
    """Centres and radii of the osculating circles of a 2-D curve c (N, 2) at t = 1..N-2 (central differences,
    llc-and-ed.md §3.4). The centres trace the evolute; its cusps mark turns of the trajectory."""
    d1, d2 = (c[2:] - c[:-2]) / 2, c[2:] - 2 * c[1:-1] + c[:-2]
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    speed = np.linalg.norm(d1, axis=1) + 1e-300
    radius = 1.0 / (np.abs(cross) / speed ** 3 + 1e-12)
    tangent = d1 / speed[:, None]
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) * np.where(cross >= 0, 1.0, -1.0)[:, None]
    return c[1:-1] + radius[:, None] * normal, radius


def cusp_candidates(curve, skip=8, top=3):
    """Checkpoint indices of the sharpest evolute cusps and of the sharpest points of a 2-D curve (N, 2).

    Cusps: among every `skip`-th osculating centre, the smallest centre displacement per unit displacement
    of the curve itself (llc-and-ed.md §3.4 uses the bare centre displacement; dividing by the curve's own
    step keeps a trajectory that has not started moving from counting as a cusp). Sharp points: the smallest
    radii. Indices refer to rows of `curve`."""
    centres, radii = osculating_circles(curve)
    idx = np.arange(0, len(centres), skip)
    moved = np.linalg.norm(np.diff(curve[1:-1][idx], axis=0), axis=1)
    ratio = np.linalg.norm(np.diff(centres[idx], axis=0), axis=1) / np.maximum(moved, 1e-300)
    return dict(cusps=[int(idx[i]) + 1 for i in np.argsort(ratio)[:top]],
                sharp=[int(i) + 1 for i in np.argsort(radii)[:top]])


# ------------------------------------------------------------------------------------------- Hessian
def make_hvp(model, loss_of_output, inputs):
    """Hessian-vector product of the loss over the flattened parameters (grad of grad-dot, torch.func).
    The returned function takes and returns CPU vectors whatever the model's device."""
    names, ps = zip(*[(n, p.detach()) for n, p in model.named_parameters()])
    w0 = torch.cat([p.reshape(-1) for p in ps])

    def f(w):
        chunks = torch.split(w, [p.numel() for p in ps])
        return loss_of_output(functional_call(model, {n: c.view_as(p) for n, c, p in zip(names, chunks, ps)},
                                              (inputs,)))
    g = grad(f)
    return (lambda v: grad(lambda w: torch.dot(g(w), v.to(w0)))(w0).cpu()), w0.numel()


def hutchinson_trace(hvp, n, probes, gen):
    """Hutchinson estimate with Rademacher probes: returns (mean of v^T H v, per-probe values)."""
    vals = [float(torch.dot(v, hvp(v))) for v in
            (torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1 for _ in range(probes))]
    return float(np.mean(vals)), vals


def lanczos_top(hvp, n, iters, k, gen):
    """Top-k (largest algebraic) eigenvalues by Lanczos with full re-orthogonalisation (float64 basis)."""
    iters = min(iters, n)
    V, alpha, beta = [], [], []
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    v /= v.norm()
    for j in range(iters):
        V.append(v)
        w = hvp(v.float()).double()
        alpha.append(float(w @ v))
        Q = torch.stack(V)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)
        b = float(w.norm())
        if b < 1e-10 or j == iters - 1:
            break
        beta.append(b)
        v = w / b
    T = np.diag(alpha) + np.diag(beta[:len(alpha) - 1], 1) + np.diag(beta[:len(alpha) - 1], -1)
    return np.linalg.eigvalsh(T)[::-1][:k].tolist()


# ------------------------------------------------------------------------------ per-checkpoint analysis
def structure_stats(params, n_layer):
    """LN collapse (fraction of |gamma| < 0.1 per LN), embedding spectra sigma^2/sum and the effective
    unembedding (the final LN's affine folded into output row 0): regression.md §8.2."""
    lns = {f"b{i + 1}-{k}": f"blocks.{i}.layer_norms.{j}"
           for i in range(n_layer) for j, k in enumerate(("attn", "mlp"))}
    lns["unembed"] = "unembedding.0"
    row = {f"ln_collapse/{n}": float((params[p + ".weight"].abs() < 0.1).float().mean()) for n, p in lns.items()}
    for name, key in (("tok_spec", "token_embedding.weight"), ("pos_spec", "postn_embedding.weight")):
        s2 = torch.linalg.svdvals(params[key].double()) ** 2
        row[name] = (s2 / s2.sum()).tolist()
    gamma, beta = params["unembedding.0.weight"], params["unembedding.0.bias"]
    W, b = params["unembedding.1.weight"], params["unembedding.1.bias"]
    row["unembed_w"] = (gamma * W[0]).tolist()
    row["unembed_b"] = float(W[0] @ beta + b[0])
    return row


def evaluate_run(out_dir, opt):
    """Evaluate every checkpoint not yet in out_dir/analysis.jsonl; returns (rows sorted by step, ED memmap)."""
    out_dir = Path(out_dir)
    cfg, task = common.load_run(out_dir), common.run_task(out_dir)
    meta = {k: getattr(opt, k) for k in ("eval_size", "eval_seed", "ed_batch", "hessian_batch",
                                         "hessian_probes", "lanczos_iters", "top_eigs")}
    meta["width"] = opt.ed_batch * 2 * cfg["K"] * (cfg["D"] + 1)
    cache, ed_path, meta_path = (out_dir / f for f in ("analysis.jsonl", "ed_outputs.f32", "analysis_meta.json"))
    stale = meta_path.exists() and json.loads(meta_path.read_text()) != meta
    rows = [] if stale else common.read_jsonl(cache)
    need = len(rows) * meta["width"] * 4  # the ED row is appended before its cache row
    if stale or (ed_path.stat().st_size if ed_path.exists() else 0) < need:
        warnings.warn(f"{out_dir}: analysis settings changed or ed_outputs.f32 is incomplete; "
                      "re-evaluating every checkpoint")
        cache.unlink(missing_ok=True)
        rows, need = [], 0
    common.atomic_write(meta_path, json.dumps(meta))
    with open(ed_path, "ab") as f:  # drop the tail of a torn append
        f.truncate(need)
    done = {r["step"] for r in rows}
    todo = [s for s in common.list_checkpoints(out_dir) if s not in done]
    if todo:
        dev = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        batch = {k: v.to(dev) for k, v in task.eval_batch(opt.eval_seed, opt.eval_size).items()}
        ed = {k: v.to(dev) for k, v in task.eval_batch(opt.eval_seed + 1, opt.ed_batch).items()}
        tokens, hb = data.to_tokens(ed["xs"], ed["ys"]), min(opt.hessian_batch, opt.ed_batch)
        t0 = time.time()
        for i, step in enumerate(todo):
            try:
                model = common.load_model(out_dir, step).to(dev)
            except common.CheckpointError as e:
                warnings.warn(f"skipping step {step}: {e}")
                continue
            params = {k: v.detach().cpu() for k, v in model.named_parameters()}
            row = {"step": step, **data.regression_metrics(model, batch, task.sigma2, task.tasks),
                   **structure_stats(params, cfg["n_layer"]), "ed_row": len(rows)}
            if opt.hessian_probes > 0 or opt.lanczos_iters > 0:
                hvp, n = make_hvp(model, lambda o: data.Task.loss(o, ed["ys"][:hb]), tokens[:hb])
                gen = torch.Generator().manual_seed(opt.eval_seed)
                if opt.hessian_probes > 0:
                    tr, probes = hutchinson_trace(hvp, n, opt.hessian_probes, gen)
                    row.update(hessian_trace=tr, hessian_trace_probes=probes)
                if opt.lanczos_iters > 0:
                    row["hessian_eigs"] = lanczos_top(hvp, n, opt.lanczos_iters, opt.top_eigs, gen)
            with torch.no_grad():
                out = model(tokens).float().cpu().numpy().ravel()
            with open(ed_path, "ab") as f:
                f.write(out.tobytes())
                f.flush()
                os.fsync(f.fileno())
            common.append_jsonl(cache, row)
            rows.append(row)
            el = time.time() - t0
            eta = el / (i + 1) * (len(todo) - i - 1)
            print(f"\ranalyze {out_dir.name}: step {step} [{i + 1}/{len(todo)}] {el / (i + 1):.1f}s/ckpt "
                  f"ETA {eta:.0f}s   ", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    X = np.memmap(ed_path, dtype=np.float32, mode="r").reshape(-1, meta["width"]) if rows else None
    return sorted(rows, key=lambda r: r["step"]), X


def read_llc(out_dir):
    """llc.jsonl rows with a finite estimate, the last row per step, sorted; [] when absent."""
    rows = {r["step"]: r for r in common.read_jsonl(Path(out_dir) / "llc.jsonl")
            if isinstance(r.get("llc_mean"), (int, float))}
    return [rows[s] for s in sorted(rows)]


def table(runs, key, steps):
    """(runs, steps[, width]) float array of one metric over the given steps; NaN where a run lacks it."""
    vals = [[by.get(s) for s in steps] for by in ({r["step"]: r.get(key) for r in rows} for rows in runs)]
    width = next((len(v) for row in vals for v in row if isinstance(v, list)), None)
    blank = np.nan if width is None else [np.nan] * width
    return np.array([[blank if v is None else v for v in row] for row in vals], dtype=float)


# -------------------------------------------------------------------------------------------- figures
def _axes(rows, cols, title, w=4.6, h=3.3):
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    fig.suptitle(title, fontsize=11)
    return fig, axes.ravel()


def _time_axis(ax, stages, ylabel, names=False, logy=False):
    """Shared look of every panel over training time: symlog steps, stages shaded, boundaries dashed."""
    for j, s in enumerate(stages):
        ax.axvspan(s["start"], s["end"], color=STAGE_COLORS[j % len(STAGE_COLORS)], alpha=0.12, lw=0)
        if j:
            ax.axvline(s["start"], color="k", ls="--", lw=0.7)
        if names:
            ax.text(math.sqrt((s["start"] + 1) * (s["end"] + 1)), 1.01, f"{s['name']} ({s['type']})",
                    transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
    ax.set_xscale("symlog", linthresh=1, linscale=0.25)
    ax.set_xlim(left=0)
    ax.set_xlabel("training step (symlog)")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")


def _band(ax, steps, Y, label=None, **kw):
    """Mean over runs, with a ±1 std band when there are several runs."""
    mean = np.nanmean(Y, 0)
    line, = ax.plot(steps, mean, label=label, lw=1.3, **kw)
    if len(Y) > 1:
        sd = np.nanstd(Y, 0)
        ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.25, lw=0)


def _save(fig, path):
    """Legends where there are labels, then an atomic PNG write."""
    for a in fig.axes:
        if a.get_legend() is None and a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    common.atomic_write(path, buf.getvalue())
    plt.close(fig)


def fig_loss_llc(path, steps, runs, llc_steps, llcs, det, cfg, ref):
    """The paper's first figure: test loss and LLC over log-steps, stages shaded; the paper's seed-mean curves
    overlaid (`ref`) only for K=8 runs on the paper's 500k-step schedule, where the step axes agree."""
    fig, (a, b) = _axes(2, 1, "Test loss and local learning coefficient", w=8, h=3.2)
    _band(a, steps, table(runs, "loss", steps), label="test loss (eval set)")
    a.axhline(cfg["D"] + cfg["sigma2"], color="grey", ls=":", lw=1, label="zero predictor D+σ²")
    if llc_steps:
        _band(b, llc_steps, table(llcs, "llc_mean", llc_steps), label="LLC λ̂", color="C3")
        if len(llcs) == 1:
            se = table(llcs, "llc_se", llc_steps)[0]
            mean = table(llcs, "llc_mean", llc_steps)[0]
            b.fill_between(llc_steps, mean - 2 * se, mean + 2 * se, color="C3", alpha=0.2, lw=0, label="±2 s.e.")
    else:
        b.text(0.5, 0.5, "no llc.jsonl: stages detected on the test loss", transform=b.transAxes, ha="center")
    (a if det["signal"] == "loss" else b).plot(det["steps"], det["smoothed"], "k", lw=0.8, label="GP fit (stages)")
    if ref is not None:
        a.plot(ref["step"], ref["loss_mean"], color="grey", ls="--", lw=1, label="paper v1 (seed mean)")
        b.plot(ref["step"], ref["llc_mean"], color="grey", ls="--", lw=1, label="paper v1 (seed mean)")
    _time_axis(a, det["stages"], "test loss (MSE)", names=True)
    _time_axis(b, det["stages"], "LLC λ̂")
    _save(fig, path)


def _trajectory(ax, runs_scores, steps, stages, i, j, evr, label=False):
    """PC_i vs PC_j of every run, each stage in its colour (the first run drawn thicker; dark grey: checkpoints
    outside the detected stages, e.g. beyond the last LLC estimate)."""
    for r, sc in enumerate(runs_scores):
        ax.plot(sc[:, i], sc[:, j], color="0.3", lw=0.8)
        for s_i, s in enumerate(stages):
            sel = (steps >= s["start"]) & (steps <= s["end"])
            ax.plot(sc[sel, i], sc[sel, j], color=STAGE_COLORS[s_i % len(STAGE_COLORS)], lw=1.6 if r == 0 else 0.8,
                    label=f"{s['name']} ({s['type']})" if label and r == 0 else None)
    ax.set_xlabel(f"PC{i + 1} ({100 * evr[i]:.1f}%)"), ax.set_ylabel(f"PC{j + 1} ({100 * evr[j]:.1f}%)")


def fig_ed(path, ed, det):
    """Essential dynamics: PC pairs coloured by stage with the evolute and cusps of the first run (grey: the
    unsmoothed scores), explained variance, PCs over time, and the y-prediction-only variant."""
    fig, ax = _axes(2, 3, "Essential dynamics of the model outputs (PCA over checkpoints)")
    k, stages, steps = ed["scores"][0].shape[1], det["stages"], ed["steps"]
    for p, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
        if max(i, j) >= k:
            ax[p].axis("off")
            continue
        for raw in ed["scores"]:
            ax[p].plot(raw[:, i], raw[:, j], color="0.75", lw=0.6)
        _trajectory(ax[p], ed["smoothed"], steps, stages, i, j, ed["evr"], label=p == 0)
        xl, yl = ax[p].get_xlim(), ax[p].get_ylim()
        centres, _ = osculating_circles(ed["smoothed"][0][:, [i, j]])
        ax[p].scatter(centres[:, 0], centres[:, 1], c=np.arange(len(centres)), cmap="viridis", s=3, alpha=0.6,
                      label="evolute (colour: time)" if p == 0 else None)
        cusp = ed["smoothed"][0][np.searchsorted(steps, ed["cusps"][f"PC{i + 1}-PC{j + 1}"]["cusps"])]
        ax[p].plot(cusp[:, i], cusp[:, j], "kx", ms=7, ls="none", label="evolute cusp candidates" if p == 0 else None)
        ax[p].set_xlim(xl), ax[p].set_ylim(yl)  # the evolute runs off to infinity on straight stretches
    n = np.arange(1, len(ed["evr"]) + 1)
    ax[3].bar(n - 0.2, 100 * ed["evr"], 0.4, label="all outputs (B×2K×(D+1))")
    ax[3].bar(n + 0.2, 100 * ed["evr_y"], 0.4, label="y-predictions only (B×K)")
    ax[3].set_xlabel("principal component"), ax[3].set_ylabel("explained variance (%)")
    for c in range(min(k, 3)):
        ax[4].plot(steps, ed["smoothed"][0][:, c], label=f"PC{c + 1}")
    _time_axis(ax[4], stages, "PC score (smoothed, run 1)", names=True)
    if ed["scores_y"][0].shape[1] >= 2:
        _trajectory(ax[5], ed["scores_y"], steps, stages, 0, 1, ed["evr_y"])
        ax[5].set_title("y-predictions only (unsmoothed)", fontsize=9)
    _save(fig, path)


def fig_behaviour(path, steps, runs, det, K):
    fig, ax = _axes(2, 3, "Behaviour on the fixed eval set")
    st, h = det["stages"], max(K // 2, 1)
    for k in range(1, K + 1):
        _band(ax[0], steps, table(runs, f"loss/{k}", steps), label=f"k={k}", color=plt.cm.viridis(k / K))
    _time_axis(ax[0], st, "per-token loss ℓ_k (MSE)", names=True)
    ax[0].legend(fontsize=6, ncol=2)
    _band(ax[1], steps, table(runs, f"icl_1_{h}", steps), label=f"ℓ_{h} − ℓ_1")
    _band(ax[1], steps, table(runs, f"icl_{h}_{K}", steps), label=f"ℓ_{K} − ℓ_{h}")
    _time_axis(ax[1], st, "ICL score (lower = more ICL)")
    _band(ax[2], steps, table(runs, "delta_ridge", steps), label="Δ ridge")
    _band(ax[2], steps, table(runs, "delta_dmmse", steps), label="Δ dMMSE", ls="--")
    _time_axis(ax[2], st, "E[(ŷ − ŷ_baseline)²]", logy=True)
    _band(ax[3], steps, table(runs, "pred_norm", steps), label="E[ŷ²]")
    _time_axis(ax[3], st, "prediction norm E[ŷ²]")
    for g in data.OOD_SCALES:
        _band(ax[4], steps, table(runs, f"ood_inputs/{g}", steps) / g ** 2, label=f"inputs ×{g}")
        _band(ax[5], steps, table(runs, f"ood_tasks/{g}", steps) / g ** 2, label=f"tasks ×{g}")
    _time_axis(ax[4], st, "OOD loss / g²  (x → g·x)", logy=True)
    _time_axis(ax[5], st, "OOD loss / g²  (w → g·w)", logy=True)
    _save(fig, path)


def fig_structure(path, steps, runs, det):
    fig, ax = _axes(2, 3, "Structure of the weights")
    st = det["stages"]
    for key in [k for k in runs[0][0] if k.startswith("ln_collapse/")]:
        _band(ax[0], steps, table(runs, key, steps), label=key.split("/")[1])
    _time_axis(ax[0], st, "LN collapse: fraction |γ| < 0.1", names=True)
    for a, key, name in ((ax[1], "tok_spec", "token"), (ax[2], "pos_spec", "positional")):
        spec = np.nanmean(table(runs, key, steps), 0)
        for c in range(min(spec.shape[1], 6)):
            a.plot(steps, spec[:, c], label=f"σ{c + 1}²/Σσ²", color=plt.cm.viridis(c / 6))
        _time_axis(a, st, f"{name} embedding spectrum σ_i²/Σσ²")
    _band(ax[3], steps, table(runs, "weight_norm", steps), label="‖w‖₂")
    _time_axis(ax[3], st, "weight norm ‖w‖₂")
    hess = [(table(runs, "hessian_trace", steps)[:, :, None], ["trace (Hutchinson mean)"])] \
        if "hessian_trace" in runs[0][0] else []
    if "hessian_eigs" in runs[0][0]:
        eigs = table(runs, "hessian_eigs", steps)
        hess.append((eigs, [f"λ{c + 1} (Lanczos)" for c in range(eigs.shape[2])]))
    for vals, labels in hess:
        for c, lab in enumerate(labels):
            _band(ax[4], steps, vals[:, :, c], label=lab, ls="--" if c else "-")
    _time_axis(ax[4], st, "Hessian trace and top eigenvalues")
    if hess:  # symlog only when an estimate is <= 0 (a non-minimum, or a loose Lanczos Ritz value)
        ax[4].set_yscale("log" if min(np.nanmin(v) for v, _ in hess) > 0 else "symlog")
    w = np.nanmean(table(runs, "unembed_w", steps), 0)
    ax[5].plot(steps, w, color="0.6", lw=0.4)
    _band(ax[5], steps, table(runs, "unembed_b", steps), label="bias W₀·β + b₀", color="C3")
    _time_axis(ax[5], st, "effective unembedding γ_i·W[0,i] (grey)")
    _save(fig, path)


def fig_llc_diagnostics(path, llc_steps, llcs, det):
    fig, ax = _axes(2, 3, "LLC diagnostics (llc.jsonl)")
    if not llc_steps:
        for a in ax:
            a.axis("off")
        ax[0].text(0, 0.5, "no llc.jsonl: run `python llc.py --ckpt=<out_dir>` first", fontsize=11)
        return _save(fig, path)
    st = det["stages"]
    _band(ax[0], llc_steps, table(llcs, "llc_mean", llc_steps), label="λ̂ (mean over chains)", color="C3")
    _band(ax[0], llc_steps, table(llcs, "llc_std", llc_steps), label="std over draws", color="0.5")
    _time_axis(ax[0], st, "LLC λ̂", names=True)
    _band(ax[1], llc_steps, table(llcs, "rhat", llc_steps), label="R̂ across chains")
    ax[1].axhline(1.1, color="r", ls=":", lw=1, label="1.1")
    _time_axis(ax[1], st, "R̂ (Gelman-Rubin)")
    rows = llcs[0]
    pick = sorted({int(round(v)) for v in np.linspace(0, len(rows) - 1, 4)})
    for a, i in zip(ax[2:], pick):
        r = rows[i]
        for c, tr in enumerate(r.get("loss_trace") or []):
            a.plot(r["trace_draws"][:len(tr)], r["nbeta"] * (np.array(tr, dtype=float) - r["init_loss"]), lw=0.8)
        a.axhline(r["llc_mean"], color="k", ls="--", lw=1, label=f"λ̂ = {r['llc_mean']:.1f}")
        a.set_title(f"step {r['step']}: per-chain traces (run 1)", fontsize=9)
        a.set_xlabel("SGLD draw"), a.set_ylabel("nβ·(L_t − L(w*))")
    for a in ax[2 + len(pick):]:
        a.axis("off")
    _save(fig, path)


# ------------------------------------------------------------------------------------ summary and main
SUMMARY_KEYS = ("loss", "delta_ridge", "pred_norm", "icl_1_{h}", "weight_norm", "ln_collapse/unembed",
                "hessian_trace")


def essential_dynamics(runs, mats, steps, cfg, sigma_max, k=4):
    """Joint PCA of all runs' output trajectories (common steps), the y-only variant, smoothing, cusps."""
    B, T, C = len(mats[0][0]) // (2 * cfg["K"] * (cfg["D"] + 1)), 2 * cfg["K"], cfg["D"] + 1
    keep = set(steps)
    sel = [np.array([r["ed_row"] for r in rows if r["step"] in keep]) for rows in runs]
    ycols = np.arange(B * T * C).reshape(B, T, C)[:, 0::2, 0].ravel()
    groups = np.repeat(np.arange(len(sel)), [len(s) for s in sel])
    scores, evr = pca_from_gram(gram(mats, sel), k, groups)
    scores_y, evr_y = pca_from_gram(gram(mats, sel, cols=ycols), k, groups)
    n = len(steps)
    smax = sigma_max if sigma_max >= 0 else 300 * n / 5000
    sigmas = np.linspace(0.1, max(0.1, smax), n)
    cuts = np.cumsum([len(s) for s in sel])[:-1]
    per_run = np.split(scores, cuts)
    smoothed = [smooth_variable_sigma(s, sigmas) for s in per_run]
    skip = 8 if n >= 80 else max(1, n // 10)
    cusps = {}
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        if max(i, j) < scores.shape[1]:
            c = cusp_candidates(smoothed[0][:, [i, j]], skip=skip)
            cusps[f"PC{i + 1}-PC{j + 1}"] = {key: [steps[t] for t in v] for key, v in c.items()}
    return dict(scores=per_run, smoothed=smoothed, evr=evr, evr_y=evr_y, cusps=cusps,
                scores_y=np.split(scores_y, cuts),
                steps=np.array(steps))


def stage_changes(det, steps, runs, llc_steps, llcs, K):
    """For each stage, the seed-mean value of each metric at its first and last checkpoint."""
    keys = [k.format(h=max(K // 2, 1)) for k in SUMMARY_KEYS]
    out = []
    for s in det["stages"]:
        ch = {}
        for key, st, rs, name in [(k, steps, runs, k) for k in keys] + [("llc_mean", llc_steps, llcs, "llc")]:
            if not st or key not in rs[0][0]:
                continue
            v = np.nanmean(table(rs, key, st), 0)
            i0, i1 = (int(np.argmin(np.abs(np.log1p(st) - np.log1p(t)))) for t in (s["start"], s["end"]))
            ch[name] = dict(start=float(v[i0]), end=float(v[i1]), delta=float(v[i1] - v[i0]))
        out.append({**s, "metrics": ch})
    return out


def write_report(out, summary, figures):
    st = summary["stages"]
    cols = [c for c in ("llc", "loss", "delta_ridge", "pred_norm", "weight_norm") if c in st[0]["metrics"]]
    lines = [f"# Developmental stages: {', '.join(summary['runs'])}", "",
             f"{summary['n_checkpoints']} checkpoints, {len(summary['runs'])} run(s); stages detected on "
             f"**{summary['signal']}** (GP fit in log(t+1), minima of |slope|; rule and parameters in "
             "stages.json).", ""]
    lines += [f"> warning: {w}" for w in summary["warnings"]] + [""] * bool(summary["warnings"])
    lines += ["| stage | steps | type | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for s in st:
        cells = [f"{s['metrics'][c]['start']:.4g} → {s['metrics'][c]['end']:.4g}" for c in cols]
        lines.append(f"| {s['name']} | {s['start']:,}–{s['end']:,} | {s['type']} | " + " | ".join(cells) + " |")
    ev = summary["essential_dynamics"]["explained_variance"]
    lines += ["", "Types: A = signal rising, B = falling, Other = flat. Essential dynamics: explained variance "
              + ", ".join(f"PC{i + 1} {100 * v:.1f}%" for i, v in enumerate(ev)) + ".", ""]
    lines += [f"![{Path(f).stem}](figures/{Path(f).name})" for f in figures]
    common.atomic_write(out / "report.md", "\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-checkpoint analysis, essential dynamics, stages, figures.")
    p.add_argument("runs", nargs="+", help="run directories (several = seeds: mean ± std)")
    p.add_argument("--out", default="", help="output directory (default: the first run directory)")
    p.add_argument("--eval_size", type=int, default=8192, help="eval-set sequences for the metrics")
    p.add_argument("--eval_seed", type=int, default=0, help="seeds the eval set (ED/Hessian batch: seed+1)")
    p.add_argument("--ed_batch", type=int, default=1024, help="sequences in the fixed ED batch")
    p.add_argument("--hessian_batch", type=int, default=1024, help="first sequences of the ED batch used")
    p.add_argument("--hessian_probes", type=int, default=2, help="Hutchinson probes (0: no trace)")
    p.add_argument("--lanczos_iters", type=int, default=10, help="Lanczos iterations (0: no eigenvalues)")
    p.add_argument("--top_eigs", type=int, default=3)
    p.add_argument("--ed_sigma_max", type=float, default=-1, help="end of the smoothing-σ ramp (-1: 300·N/5000)")
    for name, val in (("slope_frac", 0.1), ("prom_frac", 0.03), ("min_change_frac", 0.05),
                      ("min_log_len", 0.25), ("flat_frac", 0.05)):
        p.add_argument(f"--{name}", type=float, default=val, help="stage rule, see detect_stages")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="", help="evaluation device (default: cuda if available, else cpu)")
    opt = p.parse_args(argv)
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    out = Path(opt.out or opt.runs[0])
    evals = [evaluate_run(d, opt) for d in opt.runs]
    runs, mats = [r for r, _ in evals], [m for _, m in evals]
    empty = [d for d, r in zip(opt.runs, runs) if not r]
    if empty:
        raise SystemExit(f"analyze.py: no checkpoints in {empty}")
    cfg = common.load_run(opt.runs[0])
    steps = sorted(set.intersection(*[{r["step"] for r in rows} for rows in runs]))
    llcs, warn = [read_llc(d) for d in opt.runs], []
    llc_steps = sorted(set.intersection(*[{r["step"] for r in rows} for rows in llcs]))
    if len(llc_steps) >= 5:
        sig_steps, sig = llc_steps, np.nanmean(table(llcs, "llc_mean", llc_steps), 0)
    else:
        warn.append(f"no usable llc.jsonl (fewer than 5 common LLC estimates in {opt.runs}): stages are "
                    "detected on the test loss instead")
        warnings.warn(warn[-1])
        sig_steps, sig, llc_steps = steps, np.nanmean(table(runs, "loss", steps), 0), []
    det = detect_stages(sig_steps, sig, **{k: getattr(opt, k) for k in
                                           ("slope_frac", "prom_frac", "min_change_frac", "min_log_len", "flat_frac")})
    det["signal"] = "llc" if llc_steps else "loss"
    common.atomic_write(out / "stages.json", json.dumps(det, indent=1))
    ed = essential_dynamics(runs, mats, steps, cfg, opt.ed_sigma_max)
    ref = None
    if cfg["K"] == 8 and cfg.get("max_steps") == 500_000 and REFERENCE.exists():
        ref = np.genfromtxt(REFERENCE, delimiter=",", names=True)
    figs = [out / "figures" / f for f in ("1_loss_llc.png", "2_essential_dynamics.png", "3_behaviour.png",
                                          "4_structure.png", "5_llc_diagnostics.png")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN columns (missing metrics)
        fig_loss_llc(figs[0], steps, runs, llc_steps, llcs, det, cfg, ref)
        fig_ed(figs[1], ed, det)
        fig_behaviour(figs[2], steps, runs, det, cfg["K"])
        fig_structure(figs[3], steps, runs, det)
        fig_llc_diagnostics(figs[4], llc_steps, llcs, det)
        stages = stage_changes(det, steps, runs, llc_steps, llcs, cfg["K"])
    summary = dict(runs=[str(d) for d in opt.runs], signal=det["signal"], warnings=warn, n_checkpoints=len(steps),
                   boundaries=det["boundaries"], stages=stages, detector=dict(params=det["params"], gp=det["gp"]),
                   essential_dynamics=dict(explained_variance=ed["evr"].tolist(),
                                           explained_variance_y=ed["evr_y"].tolist(), cusps=ed["cusps"]),
                   figures=[str(f.relative_to(out)) for f in figs])
    common.atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    write_report(out, summary, figs)
    print(f"analyze.py: {len(det['stages'])} stages on {det['signal']}, boundaries {det['boundaries']}; "
          f"wrote {out}/stages.json, summary.json, report.md, figures/", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
