"""The developmental-stage math: stage detection on a curve over training steps (a GP smoother in
log-time and a significance rule on its slope) and essential dynamics (PCA of output trajectories,
smoothing, evolute cusps). Pure numpy/torch functions, no I/O and no project imports; analyze.py
feeds them and plots.py draws them."""
import math
import warnings
from statistics import NormalDist

import numpy as np
import torch


def _gp_space(t, has_se, corr_len_frac):
    """gp_fit's hyperparameters: {name: (lower, upper, start)}, log scale but for the trend g (y in
    sd units)."""
    # ls 0.05-10 and amp 0.05-20 of the signal; err 1e-4-2, the errors' sd at the last checkpoint,
    # times exp(g (u - u_last)) elsewhere (the estimator's noise grows over training); t0 1 - max t;
    # c 1e-3-1e3 scales the standard errors; w 1e-4-1, the independent share of the error variance,
    # and lc, the correlation length of the shared share, up to corr_len_frac * ls
    space = dict(ls=(-3.0, 2.3, 0.0), amp=(-3.0, 3.0, 0.0), err=(-9.2, 0.7, -3.0),
                 g=(-2.0, 2.0, 0.0), t0=(0.0, math.log(max(float(max(t)), 2.0)), math.log(10.0)))
    if has_se:
        space["c"] = (-6.9, 6.9, 0.0)
    if corr_len_frac > 0:
        r = math.log(corr_len_frac)
        space.update(w=(-9.2, 0.0, math.log(0.5)), lc=(r - 4.6, r, r - 1.0))
    return space


def gp_fit(t, y, se=None, starts=(0.3, 1.0, 3.0), corr_len_frac=0.1):
    """GP regression of a curve y over training steps t: the posterior (mean, covariance,
    hyperparameters) of the signal at t. Signal amp² exp(-(u - u')² / 2 ls²) on u = log(t + t0);
    errors of variance (c·se_i)² + err² e^(2g(u_i - u_last)), a share 1 - w of it shared between
    checkpoints with correlation exp(-|u - u'| / lc), lc <= corr_len_frac * ls (0: independent
    errors); all by maximum marginal likelihood (L-BFGS, float64, one start per lengthscale in
    `starts`)."""
    # Why: common random numbers make neighbouring checkpoints share part of their error, so
    # treating them as independent overstates how sure a slope is. A correlation as long as the
    # signal's lengthscale cannot be told from the signal in one curve (fitted freely, lc runs to
    # any bound and swallows the stages), hence the bound. The long-range part of the shared error
    # (per-chain deviations in results/L2H4-s0-40k correlate 0.97-1.0 at every distance) is a smooth
    # offset that the signal absorbs; it moves no slope. t0 = 1 is log(t+1); a larger t0 compresses
    # the early steps (one stationary lengthscale cannot fit both a flat start and sharp
    # transitions).
    f64 = dict(dtype=torch.float64)
    t, y = torch.as_tensor(np.asarray(t, float), **f64), np.asarray(y, float)
    mu, sd = y.mean(), y.std() or 1.0
    z = torch.as_tensor((y - mu) / sd, **f64)
    s2 = None if se is None else torch.as_tensor((np.asarray(se, float) / sd) ** 2, **f64)
    space = _gp_space(t.tolist(), s2 is not None, corr_len_frac)
    names = list(space)
    lo, hi, th0 = (torch.tensor([space[n][k] for n in names], **f64) for k in range(3))
    eye = torch.eye(len(t), **f64)

    def parts(phi):
        v = lo + (hi - lo) * torch.sigmoid(phi)
        th = {n: v[i] if n == "g" else v[i].exp() for i, n in enumerate(names)}
        u = torch.log(t + th["t0"])
        du = u[:, None] - u[None]
        K = th["amp"] ** 2 * torch.exp(-0.5 * (du / th["ls"]) ** 2)
        var = th["err"] ** 2 * torch.exp(2 * th["g"] * (u - u.max()))
        if s2 is not None:
            var = var + th["c"] ** 2 * s2
        R = eye
        if "w" in th:
            th["lc"] = th["lc"] * th["ls"]
            R = th["w"] * eye + (1 - th["w"]) * torch.exp(-du.abs() / th["lc"])
        d = var.sqrt()
        return K, K + d[:, None] * d[None] * R + 1e-8 * eye, th

    def nll(phi):
        L = torch.linalg.cholesky(parts(phi)[1])
        return 0.5 * z @ torch.cholesky_solve(z[:, None], L)[:, 0] + L.diagonal().log().sum()

    phis = []
    for ls0 in starts:  # ls is the first hyperparameter
        th = th0.clone()
        th[0] = math.log(ls0)
        phis.append(torch.logit((th - lo) / (hi - lo)))
    best = _minimise(nll, phis)
    with torch.no_grad():
        K, Ky, th = parts(best[1])
        A = torch.linalg.solve(Ky, torch.cat([z[:, None], K], 1))
        mean, cov = mu + sd * (K @ A[:, 0]), sd ** 2 * (K - K @ A[:, 1:])
    th = {n: float(v) for n, v in th.items()}
    hp = dict(lengthscale=th["ls"], amplitude=th["amp"] * sd, noise_floor=th["err"] * sd,
              noise_trend=th["g"], t0=th["t0"], nll=best[0], se_scale=th.get("c"),
              shared=1 - th.get("w", 1.0), corr_length=th.get("lc"))
    return mean.numpy(), cov.numpy(), hp


def _minimise(f, phis):
    """(f, argument) at the smallest f reached by L-BFGS from each start in phis (a start that meets
    a matrix that is not positive definite is skipped)."""
    best = (math.inf, None)
    for phi in phis:
        phi = phi.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([phi], max_iter=200, line_search_fn="strong_wolfe",
                                tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            v = f(phi)
            v.backward()
            return v
        try:
            opt.step(closure)
            with torch.no_grad():
                v = float(f(phi))
        except torch.linalg.LinAlgError:
            continue
        if v < best[0]:
            best = (v, phi.detach())
    if best[1] is None:
        raise ValueError("gp_fit: no start reached a positive-definite covariance")
    return best


def slope_matrix(x):
    """The paper's d_dt as a matrix S (S @ f = df/dx): mean of forward and backward differences,
    one-sided at the ends."""
    i, h = np.arange(len(x) - 1), np.diff(x)
    F = np.zeros((len(x) - 1, len(x)))
    F[i, i], F[i, i + 1] = -1 / h, 1 / h
    return np.vstack([F[:1], 0.5 * (F[1:] + F[:-1]), F[-1:]])


def flank_peaks(a, i):
    """The highest a between i and the nearest point lower than a[i] on each side, as (index, edge):
    edge is True where the side runs into the end of the curve without such a point."""
    lo, hi = np.nonzero(a[:i] < a[i])[0], np.nonzero(a[i + 1:] < a[i])[0]
    l0, r1 = (lo[-1] if len(lo) else 0), (i + 1 + hi[0] if len(hi) else len(a))
    return [(l0 + int(np.argmax(a[l0:i + 1])), not len(lo)),
            (i + int(np.argmax(a[i:r1])), not len(hi))]


def _sd(M, i, j):
    """The sd of the difference of entries i and j of a vector with covariance M."""
    return math.sqrt(max(M[i, i] + M[j, j] - 2 * M[i, j], 0.0))


def dip_tests(a, Cs, slope_frac=0.2, alpha=0.05):
    """The candidate boundaries of a curve with |slope| a (the slope's posterior covariance Cs) and
    their tests: (z, [a dict per candidate]). Candidates: the interior local minima of a below
    slope_frac * max(a). One stays if on each side the peak of a (`flank_peaks`) exceeds a at it by
    more than z sd of their difference, one-sided at level alpha, Bonferroni over the candidates: a
    dip of the slope, not a wiggle of the errors."""
    # A flank running into an end of the curve is exempt where the curve is flat at the candidate
    # (|slope| within z sd of 0); flat from there to the end, the boundary moves back to where it
    # became flat. So a curve that stops moving has a boundary where it stops (a saturated loss),
    # one that keeps moving has none.
    minima = [i for i in range(1, len(a) - 1)
              if a[i] <= a[i - 1] and a[i] < a[i + 1] and a[i] < slope_frac * a.max()]
    z = NormalDist().inv_cdf(1 - alpha / max(len(minima), 1))
    flat = a <= z * np.sqrt(np.diag(Cs).clip(0))
    tests = []
    for i in minima:
        fl = flank_peaks(a, i)
        zs = [(a[p] - a[i]) / max(_sd(Cs, i, p), 1e-300) for p, _ in fl]
        exempt = [edge and bool(flat[i]) for _, edge in fl]
        ok = all(zz > z or ex for zz, ex in zip(zs, exempt))
        at = i
        if ok and fl[1][1] and flat[i:].all():
            while at - 1 > fl[0][0] and flat[at - 1]:
                at -= 1
        tests.append(dict(index=i, at=at, flanks=[p for p, _ in fl], z=zs, exempt=exempt,
                          significant=ok))
    return z, tests


def merge_stages(cand, x, m, C, a, z, min_change_frac=0.05, min_log_len=0.25):
    """The boundaries `cand` (indices) thinned until stages differ: from the start to the first
    boundary and between consecutive ones the smoothed curve m must change by more than
    max(min_change_frac * range, z sd of the change) over at least min_log_len in x = log(t+1);
    otherwise the first boundary (against the start), or the one of the pair with the larger |slope|
    a, is dropped, and the check repeats. The last stage may be flat."""
    def same(i, j):
        return (abs(m[j] - m[i]) <= max(min_change_frac * np.ptp(m), z * _sd(C, i, j))
                or x[j] - x[i] < min_log_len)
    cand = sorted(set(cand))
    while True:
        pts = [0, *cand]
        bad = [k for k in range(len(cand)) if same(pts[k], pts[k + 1])]
        if not bad:
            return cand
        k = bad[0]
        cand.pop(k - 1 if k and a[pts[k]] > a[pts[k + 1]] else k)


def detect_stages(steps, values, se=None, alpha=0.05, slope_frac=0.2, min_change_frac=0.05,
                  min_log_len=0.25, flat_frac=0.05, corr_len_frac=0.1, max_fit=400, prefix="LR"):
    """Stage boundaries of a curve over training steps (`se`: its standard errors, e.g. llc_se): the
    critical points of the smoothed curve in log-time, i.e. significant minima of |dm/dlog(t+1)|.
    Stages are named f"{prefix}1", ... and typed A (rising), B (falling) or Other (flat)."""
    # 1. Smooth with `gp_fit` (errors partly shared between neighbouring checkpoints, corr_len_frac;
    #    at most `max_fit` checkpoints, evenly in x = log(t+1)); slope s = dm/dx, its posterior
    #    covariance.
    # 2. `dip_tests`: local minima of |s| below slope_frac of its peak (plateaus, peaks, troughs and
    #    slow-downs of development), kept where the dip is significant against both flanks.
    # 3. `merge_stages`: stages must differ. 4. `_typed_stages`: A, B or Other by the smoothed
    #    change.
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    se = np.full(len(steps), np.nan) if se is None else np.asarray(se, float)
    keep = np.flatnonzero(np.isfinite(values))
    if len(keep) > max_fit:
        x = np.log1p(steps[keep])
        at = np.searchsorted(x, np.linspace(x[0], x[-1], max_fit)).clip(0, len(x) - 1)
        keep = keep[np.unique(at)]
    steps, values, se = steps[keep], values[keep], se[keep]
    known = np.isfinite(se) & (se >= 0)  # a missing standard error: the median of the others
    se = np.where(known, se, np.median(se[known])) if known.any() else None
    x = np.log1p(steps)
    m, C, hp, cand, tests, z = values, np.zeros((len(x), len(x))), {}, [], [], float("nan")
    if len(x) >= 5 and np.ptp(values) > 0:
        m, C, hp = gp_fit(steps, values, se, corr_len_frac=corr_len_frac)
        S = slope_matrix(x)
        a, Cs = np.abs(S @ m), S @ C @ S.T
        z, tests = dip_tests(a, Cs, slope_frac, alpha)
        cand = merge_stages([d["at"] for d in tests if d["significant"]], x, m, C, a, z,
                            min_change_frac, min_log_len)
        tests = [_test_row(d, steps, S @ m, Cs, z, d["at"] in cand) for d in tests]
        hp["z"] = z
    params = dict(alpha=alpha, slope_frac=slope_frac, min_change_frac=min_change_frac,
                  min_log_len=min_log_len, flat_frac=flat_frac, corr_len_frac=corr_len_frac,
                  heteroscedastic=se is not None)
    return dict(boundaries=[int(steps[i]) for i in cand],
                stages=_typed_stages(steps, m, C, cand, z, flat_frac, prefix),
                candidates=[d["step"] for d in tests], tests=tests, smoothed=np.asarray(m).tolist(),
                smoothed_sd=np.sqrt(np.diag(C).clip(0)).tolist(), steps=steps.astype(int).tolist(),
                gp=hp, params=params)


def _test_row(d, steps, s, Cs, z, kept):
    """A candidate's test in plain numbers (detect_stages' "tests": why a boundary is there or not).
    """
    i, fl = d["index"], d["flanks"]
    return dict(step=int(steps[i]), slope=float(s[i]),
                slope_sd=math.sqrt(max(float(Cs[i, i]), 0.0)),
                flank_steps=[int(steps[p]) for p in fl], flank_slopes=[float(s[p]) for p in fl],
                z=[round(float(v), 2) for v in d["z"]], z_needed=round(float(z), 2),
                exempt=d["exempt"], significant=d["significant"],
                boundary=int(steps[d["at"]]) if kept else None)


def _typed_stages(steps, m, C, cand, z, flat_frac, prefix):
    """The stages between the boundaries: A rising, B falling (by more than flat_frac * range and z
    sd of the smoothed change), else Other."""
    edges, out = [0, *cand, len(steps) - 1], []
    for j, (i0, i1) in enumerate(zip(edges[:-1], edges[1:])):
        dv = float(m[i1] - m[i0])
        thr = max(flat_frac * np.ptp(m), z * _sd(C, i0, i1) if math.isfinite(z) else 0.0)
        kind = "A" if dv > thr else "B" if dv < -thr else "Other"
        out.append(dict(name=f"{prefix}{j + 1}", start=int(steps[i0]), end=int(steps[i1]),
                        type=kind, change=dv))
    return out


# --------------------------------------------------------------------------------- essential
# dynamics
def gram(mats, rows=None, cols=None, mem_bytes=2 ** 28):
    """G = X X^T in float64, X the row-wise stack of mats[i][rows[i]] (arrays or np.memmaps of equal
    width), summed over column chunks so only an (N x chunk) slab is ever in memory: any number of
    features."""
    rows = [np.arange(len(m)) for m in mats] if rows is None else rows
    N = sum(len(r) for r in rows)
    cols = np.arange(mats[0].shape[1]) if cols is None else np.asarray(cols)
    chunk, G = max(1, mem_bytes // (8 * N)), np.zeros((N, N))
    for i in range(0, len(cols), chunk):
        c = cols[i:i + chunk]
        Xc = np.concatenate([np.asarray(m[np.ix_(r, c)], dtype=np.float64)
                             for m, r in zip(mats, rows)])
        G += Xc @ Xc.T
    return G


def pca_from_gram(G, k=4, groups=None):
    """Centred PCA from a Gram matrix (G_c = J G J): (scores U sqrt(L) (N, k), explained-variance
    ratios), signs such that the last row's scores are >= 0. With `groups` (a label per row, e.g.
    the run) each group is centred on its own mean, so that several seeds share one basis of their
    development rather than of their differences."""
    g = np.zeros(len(G)) if groups is None else np.asarray(groups)
    Gc = np.array(G, dtype=np.float64)
    # J G J in O(N^2): subtract each group's mean row, then its mean column
    for lab in np.unique(g):
        i = g == lab
        Gc[i] -= Gc[i].mean(0)
        Gc[:, i] -= Gc[:, i].mean(1, keepdims=True)
    lam, U = np.linalg.eigh(Gc)
    lam, U = lam[::-1].clip(0), U[:, ::-1]
    scores = U[:, :k] * np.sqrt(lam[:k])
    scores *= np.where(scores[-1] < 0, -1.0, 1.0)
    return scores, lam[:k] / (lam.sum() or 1.0)


def smooth_variable_sigma(y, sigmas, truncate=4.0):
    """Gaussian smoothing along axis 0 with a width per output point: output i is the centre value
    of a reflect-mode Gaussian filter of width sigmas[i] on the window i ± int(truncate*sigma+0.5)
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
        # reflect about the window edges: d c b a | a b c d | d c b a
        idx = (i - lo + k) % (2 * (hi - lo))
        idx = np.where(idx >= hi - lo, 2 * (hi - lo) - 1 - idx, idx)
        out[i] = np.tensordot(w / w.sum(), y[lo + idx], axes=1)
    return out


def osculating_circles(c):
    """Centres and radii of the osculating circles of a 2-D curve c (N, 2) at t = 1..N-2 (central
    differences). The centres trace the evolute; its cusps mark turns of the trajectory."""
    d1, d2 = (c[2:] - c[:-2]) / 2, c[2:] - 2 * c[1:-1] + c[:-2]
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    speed = np.linalg.norm(d1, axis=1) + 1e-300
    radius = 1.0 / (np.abs(cross) / speed ** 3 + 1e-12)
    tangent = d1 / speed[:, None]
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) * np.where(cross >= 0, 1.0, -1.0)[:, None]
    return c[1:-1] + radius[:, None] * normal, radius


def cusp_candidates(curve, skip=8, top=3):
    """Rows of a 2-D curve (N, 2) at the sharpest evolute cusps (among every `skip`-th osculating
    centre, the smallest centre displacement per unit displacement of the curve, so a trajectory
    that has not started moving does not count as a cusp) and at its sharpest points (the smallest
    radii)."""
    centres, radii = osculating_circles(curve)
    idx = np.arange(0, len(centres), skip)
    moved = np.linalg.norm(np.diff(curve[1:-1][idx], axis=0), axis=1)
    ratio = np.linalg.norm(np.diff(centres[idx], axis=0), axis=1) / np.maximum(moved, 1e-300)
    return dict(cusps=[int(idx[i]) + 1 for i in np.argsort(ratio)[:top]],
                sharp=[int(i) + 1 for i in np.argsort(radii)[:top]])


def essential_dynamics(runs, mats, steps, sigma_max, ycols=None, k=4):
    """Joint PCA of all runs' output trajectories (rows: their ed_row at the common `steps`; mats:
    their outputs), the variant on the feature columns `ycols` only (None: no variant), smoothing,
    and the evolutes of the first run's smoothed PC pairs with their cusps (as steps)."""
    keep = set(steps)
    sel = [np.array([r["ed_row"] for r in rows if r["step"] in keep]) for rows in runs]
    groups = np.repeat(np.arange(len(sel)), [len(s) for s in sel])
    k = min(k, len(groups))
    scores, evr = pca_from_gram(gram(mats, sel), k, groups)
    n, cuts = len(steps), np.cumsum([len(s) for s in sel])[:-1]
    scores_y, evr_y = None, np.zeros(0)
    if ycols is not None:
        scores_y, evr_y = pca_from_gram(gram(mats, sel, cols=ycols), k, groups)
    smax = sigma_max if sigma_max >= 0 else 300 * n / 5000
    smoothed = [smooth_variable_sigma(s, np.linspace(0.1, max(0.1, smax), n))
                for s in np.split(scores, cuts)]
    skip = 8 if n >= 80 else max(1, n // 10)
    cusps, evolutes = {}, {}
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        if max(i, j) < scores.shape[1] and n >= 3:
            pair = f"PC{i + 1}-PC{j + 1}"
            evolutes[pair] = osculating_circles(smoothed[0][:, [i, j]])[0]
            if n >= 3 + skip:
                c = cusp_candidates(smoothed[0][:, [i, j]], skip=skip)
                cusps[pair] = {key: [steps[t] for t in v] for key, v in c.items()}
    return dict(scores=np.split(scores, cuts), smoothed=smoothed, evr=evr, evr_y=evr_y, cusps=cusps,
                evolutes=evolutes, scores_y=None if scores_y is None else np.split(scores_y, cuts),
                steps=np.array(steps))


# ------------------------------------------------------------------------------- clustering of
# curves
def normalise_curves(Y, floor_frac=1e-2):
    """Rows of Y (curves over training) as standardised log-curves: log max(y, floor_frac x the
    row's largest y) (non-positive or tiny estimates sit on that floor), minus the row's mean over
    its std; NaN -> 0 (the mean)."""
    Y = np.asarray(Y, float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        top = np.nan_to_num(np.nanmax(Y, 1, keepdims=True))
        Z = np.log(np.maximum(Y, np.where(top > 0, floor_frac * top, 1.0)))
        mu, sd = np.nanmean(Z, 1, keepdims=True), np.nanstd(Z, 1, keepdims=True)
    return np.nan_to_num((Z - mu) / np.where(sd > 0, sd, 1.0))


def kmeans(X, k, seed=0, restarts=10, iters=100):
    """Lloyd's k-means with k-means++ starts (the best of `restarts`, seeded): (labels, inertia);
    labels numbered in order of first appearance in X."""
    X, rng, best = np.asarray(X, float), np.random.default_rng(seed), (None, math.inf)
    for _ in range(restarts):
        C = X[[rng.integers(len(X))]]
        while len(C) < k:
            d2 = ((X[:, None] - C[None]) ** 2).sum(-1).min(1)
            pick = rng.choice(len(X), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(X))
            C = np.vstack([C, X[pick]])
        for _ in range(iters):
            lab = ((X[:, None] - C[None]) ** 2).sum(-1).argmin(1)
            C2 = np.stack([X[lab == j].mean(0) if (lab == j).any() else C[j] for j in range(k)])
            if np.allclose(C2, C):
                break
            C = C2
        inertia = float(((X - C[lab]) ** 2).sum())
        if inertia < best[1] - 1e-12:
            best = (lab, inertia)
    first = {v: i for i, v in enumerate(dict.fromkeys(best[0].tolist()))}
    return np.array([first[v] for v in best[0].tolist()]), best[1]


def silhouette(X, labels):
    """Mean silhouette (b - a) / max(a, b) of the points of X (a: mean distance to the own cluster,
    b: to the nearest other); 0 for a point alone in its cluster, and for all points when k-means
    put them in one cluster (identical points)."""
    X, labels = np.asarray(X, float), np.asarray(labels)
    D, s = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1)), np.zeros(len(X))
    for i, li in enumerate(labels):
        own = (labels == li) & (np.arange(len(X)) != i)
        if own.any() and len(set(labels.tolist())) > 1:
            a = D[i, own].mean()
            b = min(D[i, labels == lj].mean() for lj in set(labels.tolist()) - {li})
            s[i] = (b - a) / max(a, b, 1e-300)
    return float(s.mean())


def cluster_curves(Y, k=0, k_max=6, seed=0):
    """k-means on normalise_curves(Y): (labels, k, {k: silhouette}). k = 0: the k in 2..min(k_max,
    n-1) with the largest silhouette (k = 1 for fewer than 3 curves); else k, at most n."""
    Z = normalise_curves(Y)
    if k > 0 or len(Z) < 3:
        k = min(max(k, 1), len(Z))
        return kmeans(Z, k, seed)[0], k, {}
    fits = {j: kmeans(Z, j, seed)[0] for j in range(2, min(k_max, len(Z) - 1) + 1)}
    sil = {j: silhouette(Z, lab) for j, lab in fits.items()}
    k = max(sil, key=lambda j: (sil[j], -j))
    return fits[k], k, sil


def refined_summary(curves, metrics, head_clusters=0, rule=None, prefix="S"):
    """summary["refined"] of the refined-LLC curves (tables.refined_curves): the head clusters
    (k-means; k by silhouette when head_clusters is 0) against the LM's head scores at the last
    checkpoint, and with a stage rule each curve's stage boundaries. Fills in the heads' labels
    and normalised curves for the figures."""
    summ = {"curves": {g: c["names"] for g, c in curves.items()}} if curves else {}
    if "heads" in curves:
        c = curves["heads"]
        c["labels"], k, sil = cluster_curves(c["llc"], head_clusters)
        c["z"], clusters = np.where(np.isnan(c["llc"]), np.nan,
                                    normalise_curves(c["llc"])), []
        for j in range(k):
            cl = dict(cluster=j, heads=[n for n, lab in zip(c["names"], c["labels"]) if lab == j])
            for score in ("prev_token", "prefix"):
                v = [np.nanmean(metrics[f"{score}/{h}"][:, -1]) for h in cl["heads"]
                     if f"{score}/{h}" in metrics]
                if v and np.isfinite(v).any():
                    cl[score] = float(np.nanmean(v))
            clusters.append(cl)
        summ["head_clusters"] = dict(
            k=k, chosen_by="option" if head_clusters > 0 else "silhouette",
            silhouette={str(j): v for j, v in sil.items()}, clusters=clusters)
    if rule is not None and curves:
        summ["stages"] = {}
        for g, c in curves.items():
            dets = [detect_stages(c["steps"], y, se, prefix=prefix, **rule)
                    for y, se in zip(c["llc"], c["se"])]
            summ["stages"][g] = {n: dict(boundaries=d["boundaries"],
                                         types=[s["type"] for s in d["stages"]])
                                 for n, d in zip(c["names"], dets)}
    return summ
