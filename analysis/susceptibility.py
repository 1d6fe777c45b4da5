"""Susceptibilities from the SGLD draws (llc.py --probes): how a component's loss responds to a
shift of the data distribution, chi = -Cov[phi, L_q' - L_q] over the local posterior (Baker et al.
2025). phi is the loss on the run's own distribution q at the chains' points; with --restrictions
only the component's weights are sampled, so phi is that component's observable; and
d E[phi] / dh = nbeta * chi for the mixture (1 - h) q + h q'. Each probe distribution q' is a
fixed, seeded set of rows (the task's refined distributions: ood_inputs/<g>, tasks/<M>; the LM's
code, prose), and "positions" gives one q' per context position: the loss at that position alone."""
import io
from pathlib import Path

import numpy as np
import torch
from torch.func import vmap

import common
import data
from analysis import stages


class Probes:
    """Fixed probe sets and the observable vector the sampler records at every k-th draw: the loss
    on q at each context position (their mean is phi), the loss on each probe set, then (samples >
    0) the per-sample losses of 2 x samples rows of q: `samples` training rows and as many queries,
    for the loss kernel and the Bayesian influence function."""

    def __init__(self, task, names, rows, seed, device, samples=0):
        self.task, self.names, self.positions, self.samples = task, [], False, samples
        self.sets = {}
        for i, name in enumerate(p.strip() for p in names.split(",") if p.strip()):
            if name == "positions":
                self.positions = True
                continue
            gen = torch.Generator().manual_seed(common.derive_seed(seed, 0x5CE, i + 1))
            try:
                shifted = task.refined(name)
            except common.ConfigError as e:
                raise common.ConfigError(f"--probes: {e} (or positions)") from None
            self.sets[name] = self._draw(shifted, gen, rows, device)
            self.names.append(name)
        gen = torch.Generator().manual_seed(common.derive_seed(seed, 0x5CE, 0))
        self.base = self._draw(task, gen, rows, device)

    @staticmethod
    def _draw(task, gen, rows, device):
        return tuple(x.to(device) for x in task.sample(gen, rows, device="cpu"))

    def observe(self, model):
        """observe(params) -> the observable vector at a chain's point (vmappable)."""
        per_token, mean = data.RunLoss(model, self.task, True), data.RunLoss(model, self.task)
        shifted = {n: data.RunLoss(model, self.task.refined(n)) for n in self.names}
        rows = tuple(x[:2 * self.samples] for x in self.base)
        one = vmap(lambda p, *row: mean(p, tuple(x[None] for x in row)),  # a row's own loss
                   in_dims=(None,) + (0,) * len(rows))

        def observe(params):
            losses = [shifted[n](params, self.sets[n]).reshape(1) for n in self.names]
            per_sample = [one(params, *rows)] if self.samples else []
            return torch.cat([per_token(params, self.base).reshape(-1), *losses, *per_sample])
        return observe

    def columns(self, observed, kernels, step, restriction=None):
        """The row's susceptibility and susceptibility_se {probe: value}: the mean over the finite
        chains of each chain's own estimate, and its standard error sd / sqrt(chains). With
        per-sample losses, their covariance is written to the folder `kernels` and named in column
        loss_kernel (relative to the rows' file, which sits beside that folder)."""
        cov = observed["cov"][:, :self.width(observed), :self.width(observed)]  # (chains, m, m)
        m, P = cov.shape[1], len(self.names)
        K = m - P
        u = np.r_[np.full(K, 1 / K), np.zeros(P)]  # phi: the mean of the per-position losses
        targets = {n: K + j for j, n in enumerate(self.names)}
        if self.positions:
            targets.update({f"position/{k + 1}": k for k in range(K)})
        chi, se = {}, {}
        for name, j in targets.items():
            per_chain = -(cov @ (np.eye(m)[j] - u)) @ u  # -Cov[phi, L_j - phi], each chain's
            ok = per_chain[np.isfinite(per_chain)]
            chi[name] = float(ok.mean()) if len(ok) else None
            se[name] = float(ok.std(ddof=1) / np.sqrt(len(ok))) if len(ok) > 1 else None
        out = dict(susceptibility=chi, susceptibility_se=se, susceptibility_draws=observed["draws"])
        if self.samples:
            path = Path(kernels) / f"step_{step:07d}{'_' + restriction if restriction else ''}.npz"
            common.atomic_write(path, self.kernel(observed))
            out["loss_kernel"] = str(Path(path.parent.name) / path.name)
        return out

    def width(self, observed):
        """The observable vector's length before the per-sample losses."""
        return observed["cov"].shape[1] - 2 * self.samples

    def kernel(self, observed):
        """The per-sample block as an .npz file's bytes: cov (the chains' mean covariance of the 2 x
        samples per-sample losses, training rows first), mean, and the chains' count."""
        w, ok = self.width(observed), np.isfinite(observed["cov"]).all((1, 2))
        buf = io.BytesIO()
        np.savez(buf, cov=observed["cov"][ok, w:, w:].mean(0),
                 mean=observed["mean"][ok, w:].mean(0), chains=ok.sum(), samples=self.samples)
        return buf.getvalue()


def loss_kernel(cov, samples, k=0):
    """(the loss kernel: the correlation matrix of the per-sample losses over the posterior, its
    k-means labels (k = 0: 2..6 by silhouette), the BIF of each training row on each query,
    -Cov[l_i, l_j] (samples x samples))."""
    cov = np.asarray(cov, float)
    sd = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
    corr = cov / np.outer(sd, sd)
    ks = [k] if k else range(2, min(6, len(corr) - 1) + 1)
    fits = {j: stages.kmeans(corr, j)[0] for j in ks}
    best = max(fits, key=lambda j: stages.silhouette(corr, fits[j]))
    return corr, fits[best], -cov[:samples, samples:]


def curves(run_dirs):
    """{components, probes, steps, chi (components, probes, steps), se}: every row with a
    susceptibility in a run's llc*.jsonl files (a component: the row's restriction, else "all"),
    the mean over runs (se combined as for the LLC); None when no row has one."""
    vals, kernels = {}, {}  # (component, probe) -> step -> [(chi, se) per run]; the first run's
    for d in run_dirs:
        for path in sorted(Path(d).glob("llc*.jsonl")):
            for r in common.read_jsonl(path):
                comp = r.get("restriction") or "all"
                if r.get("loss_kernel") and d == run_dirs[0]:
                    kernels[(comp, r["step"])] = path.parent / r["loss_kernel"]
                for p, v in (r.get("susceptibility") or {}).items():
                    se = (r.get("susceptibility_se") or {}).get(p)
                    vals.setdefault((comp, p), {}).setdefault(r["step"], []).append((v, se))
    if not vals and not kernels:
        return None
    comps = list(dict.fromkeys(c for c, _ in vals))
    probes = list(dict.fromkeys(p for _, p in vals))
    steps = sorted({s for by in vals.values() for s in by})
    chi, se = (np.full((len(comps), len(probes), len(steps)), np.nan) for _ in range(2))
    for (c, p), by in vals.items():
        for s, xs in by.items():
            v = np.array([[np.nan if a is None else a for a in x] for x in xs], float)
            i, j, k = comps.index(c), probes.index(p), steps.index(s)
            chi[i, j, k] = np.nanmean(v[:, 0])
            se[i, j, k] = np.sqrt(np.nansum(v[:, 1] ** 2)) / max(np.isfinite(v[:, 1]).sum(), 1)
    return dict(components=comps, probes=probes, steps=steps, chi=chi, se=se, kernels=kernels)


def development(c, boundaries):
    """The matrix over training: PCA of its standardised entries (checkpoints as samples), its
    speed of change per unit log(step + 1), and for each LLC boundary the nearest local peak of
    that speed (and the ratio of the two steps, >= 1): do the susceptibilities change where the
    LLC's stages do?"""
    t = np.asarray(c["steps"], float)
    X = c["chi"].reshape(-1, len(t)).T  # (steps, entries)
    X = X[:, np.isfinite(X).all(0)]
    if X.shape[1] == 0 or len(t) < 3:
        return dict(evr=[], scores=[], speed_steps=[], speed=[], peaks=[], boundaries=[])
    Z = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1)
    U, S, _ = np.linalg.svd(Z, full_matrices=False)
    speed = np.linalg.norm(np.diff(Z, axis=0), axis=1) / np.diff(np.log1p(t))
    mid = np.sqrt((t[1:] + 1) * (t[:-1] + 1)) - 1  # the speed's steps: geometric midpoints
    peaks = [float(mid[i]) for i in range(len(speed))
             if speed[i] >= speed[max(i - 1, 0)] and speed[i] >= speed[min(i + 1, len(speed) - 1)]]
    near = [dict(boundary=b, peak=p, ratio=max((p + 1) / (b + 1), (b + 1) / (p + 1)))
            for b in boundaries
            for p in [min(peaks, key=lambda q: abs(np.log1p(q) - np.log1p(b)))] if peaks]
    return dict(evr=(S ** 2 / (S ** 2).sum()).tolist(), scores=(U[:, :2] * S[:2]).T.tolist(),
                speed_steps=mid.tolist(), speed=speed.tolist(), peaks=peaks, boundaries=near)


def kernel_summary(c):
    """The loss kernel and BIF at the last checkpoint that has one (the unrestricted row's if any):
    (its arrays for the figure, the summary's entry), or (None, {})."""
    if not c["kernels"]:
        return None, {}
    comp, step = max(c["kernels"], key=lambda k: (k[1], k[0] == "all"))
    path = c["kernels"][(comp, step)]
    try:
        with np.load(path) as z:
            cov, samples = z["cov"], int(z["samples"])
    except (OSError, ValueError, KeyError) as e:
        raise common.CheckpointError(f"{path} is missing or corrupt ({e}): rerun llc.py "
                                     "--bif_rows for that checkpoint") from None
    corr, labels, bif = loss_kernel(cov, samples)
    same = labels[:, None] == labels[None]
    off = ~np.eye(len(corr), dtype=bool)
    top = np.dstack(np.unravel_index(np.argsort(-np.abs(bif), None)[:5], bif.shape))[0]
    return dict(corr=corr, labels=labels, bif=bif, component=comp, step=step), dict(
        component=comp, step=step, file=str(path), samples=samples, k=int(labels.max()) + 1,
        sizes=np.bincount(labels).tolist(), corr_within=float(corr[same & off].mean()),
        corr_between=float(corr[~same].mean()) if (~same).any() else None,
        bif_top=[dict(train=int(i), query=int(j), bif=float(bif[i, j])) for i, j in top])


def summary(c, boundaries):
    """(development() or None, kernel_summary()'s arrays or None, summary["susceptibility"]): the
    matrix at the last checkpoint, its PCA and where it changes fastest beside the boundaries, the
    loss kernel's clusters and strongest influences."""
    dev, out = None, {}
    if c["steps"]:
        dev = development(c, boundaries)
        last = {comp: {p: common.finite(float(c["chi"][i, j, -1]))
                       for j, p in enumerate(c["probes"])}
                for i, comp in enumerate(c["components"])}
        out = dict(components=c["components"], probes=c["probes"], steps=len(c["steps"]),
                   last_step=c["steps"][-1], last=last, explained_variance=dev["evr"][:4],
                   change_peaks=dev["peaks"], boundaries=dev["boundaries"])
    kernel, out["loss_kernel"] = kernel_summary(c)
    return dev, kernel, {k: v for k, v in out.items() if v}
