"""Stage detection on a developmental curve (llc-and-ed.md §4): a GP smoother in log-time, its slope and
the significance rule of `detect_stages`. Pure numpy/torch functions, no I/O; used by analyze.py."""
import math
from statistics import NormalDist

import numpy as np
import torch


def gp_fit(t, y, se=None, starts=(0.3, 1.0, 3.0)):
    """GP regression of a curve y over training steps t, returning the posterior (mean, covariance, hp) at t.

    Kernel amp² exp(-(u - u')² / 2 ls²) on u = log(t + t0): t0 = 1 is log(t+1); a larger t0 compresses the early
    steps (one stationary lengthscale cannot fit both a flat start and sharp transitions). Noise variance of
    point i: (c·se_i)² + floor² (floor² alone without `se`); c rescales the reported standard errors, which are
    estimates themselves (with common random numbers across checkpoints they overstate the scatter). ls, amp,
    floor, c and t0 ∈ [1, max t] by maximum marginal likelihood on y standardised (torch L-BFGS, float64, one
    start per lengthscale in `starts`)."""
    f64 = dict(dtype=torch.float64)
    t, y = torch.as_tensor(np.asarray(t, float), **f64), np.asarray(y, float)
    mu, sd = y.mean(), y.std() or 1.0
    z = torch.as_tensor((y - mu) / sd, **f64)
    s2 = None if se is None else torch.as_tensor((np.asarray(se, float) / sd) ** 2, **f64)
    # bounds of log ls, amp, floor, c (sd units): ls 0.05-10, amp 0.05-20, floor 1e-4-2, c 1e-3-1e3; t0 1 - max t
    lo = torch.tensor([-3.0, -3.0, -9.2] + [-6.9] * (s2 is not None) + [0.0], **f64)
    hi = torch.tensor([2.3, 3.0, 0.7] + [6.9] * (s2 is not None) + [math.log(max(float(t.max()), 2.0))], **f64)

    def parts(phi):
        th = (lo + (hi - lo) * torch.sigmoid(phi)).exp()
        u = torch.log(t + th[-1])
        K = th[1] ** 2 * torch.exp(-0.5 * ((u[:, None] - u[None]) / th[0]) ** 2)
        noise = th[2] ** 2 + (0.0 if s2 is None else th[3] ** 2 * s2) + 1e-10
        return K, K + torch.diag(torch.broadcast_to(noise, t.shape)), th

    def nll(phi):
        L = torch.linalg.cholesky(parts(phi)[1])
        return 0.5 * z @ torch.cholesky_solve(z[:, None], L)[:, 0] + L.diagonal().log().sum()

    best = (math.inf, None)
    for ls0 in starts:
        th0 = torch.tensor([math.log(ls0), 0.0, -3.0] + [0.0] * (s2 is not None) + [math.log(10.0)], **f64)
        phi = torch.logit((th0 - lo) / (hi - lo)).requires_grad_(True)
        opt = torch.optim.LBFGS([phi], max_iter=200, line_search_fn="strong_wolfe", tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            v = nll(phi)
            v.backward()
            return v
        try:
            opt.step(closure)
        except torch.linalg.LinAlgError:  # not positive definite on the way: try the next start
            continue
        with torch.no_grad():
            v = float(nll(phi))
        if v < best[0]:
            best = (v, phi.detach())
    with torch.no_grad():
        K, Ky, th = parts(best[1])
        A = torch.linalg.solve(Ky, torch.cat([z[:, None], K], 1))
        mean, cov = mu + sd * (K @ A[:, 0]), sd ** 2 * (K - K @ A[:, 1:])
    th = th.tolist()
    hp = dict(lengthscale=th[0], amplitude=th[1] * sd, noise_floor=th[2] * sd, t0=th[-1], nll=best[0],
              se_scale=th[3] if s2 is not None else None)
    return mean.numpy(), cov.numpy(), hp


def slope_matrix(x):
    """The paper's d_dt as a matrix S (S @ f = df/dx): mean of forward and backward differences, one-sided at
    the ends."""
    i, h = np.arange(len(x) - 1), np.diff(x)
    F = np.zeros((len(x) - 1, len(x)))
    F[i, i], F[i, i + 1] = -1 / h, 1 / h
    return np.vstack([F[:1], 0.5 * (F[1:] + F[:-1]), F[-1:]])


def flank_peaks(a, i):
    """The highest a between i and the nearest point lower than a[i] on each side, as (index, edge): edge is
    True where the side runs into the end of the curve without such a point."""
    lo, hi = np.nonzero(a[:i] < a[i])[0], np.nonzero(a[i + 1:] < a[i])[0]
    l0, r1 = (lo[-1] if len(lo) else 0), (i + 1 + hi[0] if len(hi) else len(a))
    return [(l0 + int(np.argmax(a[l0:i + 1])), not len(lo)), (i + int(np.argmax(a[i:r1])), not len(hi))]


def detect_stages(steps, values, se=None, alpha=0.05, slope_frac=0.1, min_change_frac=0.05, min_log_len=0.25,
                  flat_frac=0.05, max_fit=400):
    """Stage boundaries from a curve over training steps (llc-and-ed.md §4), automatically.

    1. Smooth with `gp_fit` (standard errors `se`, e.g. llc_se, as heteroscedastic noise; at most `max_fit`
       checkpoints, evenly in x = log(t+1)); slope s = dm/dx at the checkpoints and its posterior covariance.
    2. Candidates: interior local minima of |s| below slope_frac * max|s| (plateaus and critical points in
       log-time; the paper: |s| < 8 ~ 0.065 max).
    3. Significance at level alpha, two-sided, Bonferroni over the candidates: z = Phi^-1(1 - alpha/(2 n_cand)).
       A candidate stays if on each flank (`flank_peaks`) the peak |s| exceeds |s| at the candidate by more
       than z posterior standard deviations of their difference (a dip in the slope, not a wiggle of noise).
       A flank running into an end of the curve is exempt where the curve is flat at the candidate (|s| within
       z sd of 0); if it stays flat to the end, the boundary moves back to where it became flat. So a curve
       that stops moving has a boundary where it stops (the paper's LR4/LR5, a saturated loss), one that keeps
       moving, however slowly, has none (a sigmoid still rising at the end).
    4. Stages must differ: from the start to the first boundary and between consecutive boundaries the smoothed
       curve must change by more than max(min_change_frac * range, z * posterior sd of the change), over at
       least min_log_len in x; otherwise the first boundary (against the start), or the one of the pair with
       the larger |s|, is dropped, and the check repeats. The last stage may be flat (the paper's LR5).
    5. Types from the smoothed change over each stage: A rising, B falling by more than flat_frac * range and
       z posterior sd, else Other.
    """
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    se = np.full(len(steps), np.nan) if se is None else np.asarray(se, float)
    keep = np.flatnonzero(np.isfinite(values))
    if len(keep) > max_fit:
        x = np.log1p(steps[keep])
        keep = keep[np.unique(np.searchsorted(x, np.linspace(x[0], x[-1], max_fit)).clip(0, len(x) - 1))]
    steps, values, se = steps[keep], values[keep], se[keep]
    known = np.isfinite(se) & (se >= 0)  # a missing standard error: the median of the others
    se = np.where(known, se, np.median(se[known])) if known.any() else None
    x = np.log1p(steps)
    m, sd_m, hp, minima, cand, z = values, np.zeros(len(x)), {}, [], [], float("nan")
    if len(x) >= 5 and np.ptp(values) > 0:
        m, C, hp = gp_fit(steps, values, se)
        S = slope_matrix(x)
        a, Cs, sd_m = np.abs(S @ m), S @ C @ S.T, np.sqrt(np.diag(C).clip(0))
        minima = [i for i in range(1, len(x) - 1)
                  if a[i] <= a[i - 1] and a[i] < a[i + 1] and a[i] < slope_frac * a.max()]
        z = NormalDist().inv_cdf(1 - alpha / (2 * max(len(minima), 1)))

        def sd(M, i, j):
            return math.sqrt(max(M[i, i] + M[j, j] - 2 * M[i, j], 0.0))

        def same(i, j):
            return abs(m[j] - m[i]) <= max(min_change_frac * np.ptp(m), z * sd(C, i, j)) or x[j] - x[i] < min_log_len
        flat = a <= z * np.sqrt(np.diag(Cs).clip(0))  # slope within z sd of 0
        cand = []
        for i in minima:
            fl = flank_peaks(a, i)
            if all(a[p] - a[i] > z * sd(Cs, i, p) for p, edge in fl if not (edge and flat[i])):
                (p0, _), (_, e1) = fl
                if e1 and flat[i:].all():  # flat from here to the end: the boundary is where it became flat
                    while i - 1 > p0 and flat[i - 1]:
                        i -= 1
                cand.append(i)
        cand = sorted(set(cand))
        while True:
            pts = [0, *cand]
            bad = [k for k in range(len(cand)) if same(pts[k], pts[k + 1])]
            if not bad:
                break
            k = bad[0]
            cand.pop(k - 1 if k and a[pts[k]] > a[pts[k + 1]] else k)
        hp["z"] = z
    edges, stages = [0, *cand, len(x) - 1], []
    for j, (i0, i1) in enumerate(zip(edges[:-1], edges[1:])):
        dv, thr = float(m[i1] - m[i0]), max(flat_frac * np.ptp(m), z * sd(C, i0, i1) if hp else 0.0)
        kind = "A" if dv > thr else "B" if dv < -thr else "Other"
        stages.append(dict(name=f"LR{j + 1}", start=int(steps[i0]), end=int(steps[i1]), type=kind, change=dv))
    return dict(boundaries=[int(steps[i]) for i in cand], stages=stages, candidates=[int(steps[i]) for i in minima],
                smoothed=np.asarray(m).tolist(), smoothed_sd=sd_m.tolist(), steps=steps.astype(int).tolist(), gp=hp,
                params=dict(alpha=alpha, slope_frac=slope_frac, min_change_frac=min_change_frac,
                            min_log_len=min_log_len, flat_frac=flat_frac, heteroscedastic=se is not None))
