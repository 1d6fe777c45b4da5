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
from torch.func import functional_call, vmap

import common
import data
from analysis import plots, stages


ALIGNED = 1.6  # a peak within this factor of a boundary's step marks the same change (as stages)


class Probes:
    """Fixed probe sets and the observable vector the sampler records at every k-th draw: the loss
    on q at each context position (their mean is phi), the loss on each probe set, then either
    (samples > 0) the per-sample losses of 2 x samples rows of q, `samples` training rows and as
    many queries, for the loss kernel and the Bayesian influence function, or (tokens > 0) the loss
    of every prediction in `tokens` rows of q, for per-token susceptibilities (their covariance
    with the first entries only: sgld's observe_anchors)."""

    def __init__(self, task, names, rows, seed, device, samples=0, tokens=0):
        self.task, self.names, self.positions = task, [], False
        self.samples, self.tokens = samples, tokens
        if tokens and not callable(getattr(task, "loss_elements", None)):
            raise common.ConfigError(f"--token_rows needs the task's loss_elements(out, "
                                     f"targets), the loss of every prediction: "
                                     f"{type(task).__name__} has none")
        self.sets, self.shifted = {}, {}  # name -> probe rows, its task (refined once: the LM's
        # code/prose subsets classify every training row)
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
            self.shifted[name] = shifted
            self.names.append(name)
        gen = torch.Generator().manual_seed(common.derive_seed(seed, 0x5CE, 0))
        self.base = self._draw(task, gen, rows, device)

    @staticmethod
    def _draw(task, gen, rows, device):
        return tuple(x.to(device) for x in task.sample(gen, rows, device="cpu"))

    def settings(self, model):
        """estimate_llc's observe (the observable vector at a chain's point, vmappable) and
        observe_anchors (with per-token losses: their covariance with the first K + P entries,
        positions and probes, only; else 0, the whole matrix)."""
        per_token, mean = data.RunLoss(model, self.task, True), data.RunLoss(model, self.task)
        shifted = {n: data.RunLoss(model, t) for n, t in self.shifted.items()}
        rows = tuple(x[:2 * self.samples] for x in self.base)
        one = vmap(lambda p, *row: mean(p, tuple(x[None] for x in row)),  # a row's own loss
                   in_dims=(None,) + (0,) * len(rows))
        tok = tuple(x[:self.tokens] for x in self.base)

        def observe(params):
            losses = [shifted[n](params, self.sets[n]).reshape(1) for n in self.names]
            extra = [one(params, *rows)] if self.samples else []
            if self.tokens:
                out = functional_call(model, params, (self.task.model_input(*tok),))
                extra.append(self.task.loss_elements(out, tok[1]).reshape(-1))
            return torch.cat([per_token(params, self.base).reshape(-1), *losses, *extra])
        with torch.no_grad():
            K = per_token(dict(model.named_parameters()), self.base).numel()
        return dict(observe=observe, observe_anchors=(K + len(self.names)) * bool(self.tokens))

    def columns(self, observed, files, step, restriction=None):
        """The row's susceptibility and susceptibility_se {probe: value}: the mean over the finite
        chains of each chain's own estimate, and its standard error sd / sqrt(chains). The
        per-sample covariances (loss_kernel) or per-token susceptibilities (token_susceptibility)
        go to an .npz in the folder `files`, named relative to the rows' file beside it."""
        w = self.width(observed)
        cov = observed["cov"][:, :w, :w]  # (chains, m, m)
        K = w - len(self.names)
        u = np.r_[np.full(K, 1 / K), np.zeros(len(self.names))]  # phi: the positions' mean
        targets = {n: K + j for j, n in enumerate(self.names)}
        if self.positions:
            targets.update({f"position/{k + 1}": k for k in range(K)})
        chi, se = {}, {}
        for name, j in targets.items():
            chi[name], se[name] = _mean_se(-(cov @ (np.eye(w)[j] - u)) @ u)  # -Cov[phi, L - phi]
        out = dict(susceptibility=chi, susceptibility_se=se, susceptibility_draws=observed["draws"])
        for col, on, blob in (("loss_kernel", self.samples, self.kernel),
                              ("token_susceptibility", self.tokens, self.per_token)):
            if on:
                name = f"step_{step:07d}{'_' + restriction if restriction else ''}.npz"
                common.atomic_write(Path(files) / name, blob(observed, u))
                out[col] = str(Path(Path(files).name) / name)
        return out

    def width(self, observed):
        """The observable vector's entries before the per-sample or per-token losses."""
        if self.tokens:
            return observed["cov"].shape[2]  # the anchors
        return observed["cov"].shape[1] - 2 * self.samples

    def per_token(self, observed, u):
        """The per-token susceptibilities as an .npz file's bytes: inputs and targets of the token
        rows, chi and se (rows, tokens): -Cov[phi, l_t - phi], each chain's, their mean and sd /
        sqrt(chains)."""
        w, cov = self.width(observed), observed["cov"]
        var = np.einsum("i,cij,j->c", u, cov[:, :w, :w], u)
        each = -(cov[:, w:, :] @ u - var[:, None])  # (chains, tokens)
        ok = np.isfinite(each).all(1)
        n, rows = ok.sum(), tuple(x[:self.tokens].cpu().numpy() for x in self.base)
        se = each[ok].std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(each.shape[1], np.nan)
        buf = io.BytesIO()
        np.savez(buf, inputs=rows[0], targets=rows[1], chi=each[ok].mean(0).reshape(rows[1].shape),
                 se=se.reshape(rows[1].shape))
        return buf.getvalue()

    def kernel(self, observed, u=None):
        """The per-sample block as an .npz file's bytes: cov (the chains' mean covariance of the 2 x
        samples per-sample losses, training rows first), mean, and the chains' count."""
        w, ok = self.width(observed), np.isfinite(observed["cov"]).all((1, 2))
        buf = io.BytesIO()
        np.savez(buf, cov=observed["cov"][ok, w:, w:].mean(0),
                 mean=observed["mean"][ok, w:].mean(0), chains=ok.sum(), samples=self.samples)
        return buf.getvalue()


def _mean_se(each):
    """(mean, sd / sqrt(n)) of the finite per-chain values; None where there are too few."""
    ok = each[np.isfinite(each)]
    return (float(ok.mean()) if len(ok) else None,
            float(ok.std(ddof=1) / np.sqrt(len(ok))) if len(ok) > 1 else None)


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
                for col in ("loss_kernel", "token_susceptibility"):
                    if r.get(col) and d == run_dirs[0]:
                        kernels.setdefault(col, {})[(comp, r["step"])] = path.parent / r[col]
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
    that speed, the ratio of the two steps (>= 1) and whether it is within ALIGNED: do the
    susceptibilities change where the LLC's stages do?"""
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
    near = [dict(boundary=b, peak=p, ratio=r, aligned=bool(r <= ALIGNED))
            for b in boundaries if peaks
            for p in [min(peaks, key=lambda q: abs(np.log1p(q) - np.log1p(b)))]
            for r in [max((p + 1) / (b + 1), (b + 1) / (p + 1))]]
    return dict(evr=(S ** 2 / (S ** 2).sum()).tolist(), scores=(U[:, :2] * S[:2]).T.tolist(),
                speed_steps=mid.tolist(), speed=speed.tolist(), peaks=peaks, boundaries=near)


def kernel_summary(c):
    """The loss kernel and BIF at the last checkpoint that has one (the unrestricted row's if any):
    (its arrays for the figure, the summary's entry), or (None, {})."""
    files = c["kernels"].get("loss_kernel")
    if not files:
        return None, {}
    comp, step = max(files, key=lambda k: (k[1], k[0] == "all"))
    path = files[(comp, step)]
    z = _load(path, "bif_rows")
    cov, samples = z["cov"], int(z["samples"])
    corr, labels, bif = loss_kernel(cov, samples)
    same = labels[:, None] == labels[None]
    off = ~np.eye(len(corr), dtype=bool)
    top = np.dstack(np.unravel_index(np.argsort(-np.abs(bif), None)[:5], bif.shape))[0]
    return dict(corr=corr, labels=labels, bif=bif, component=comp, step=step), dict(
        component=comp, step=step, file=str(path), samples=samples, k=int(labels.max()) + 1,
        sizes=np.bincount(labels).tolist(), corr_within=float(corr[same & off].mean()),
        corr_between=float(corr[~same].mean()) if (~same).any() else None,
        bif_top=[dict(train=int(i), query=int(j), bif=float(bif[i, j])) for i, j in top])


def summary(c, boundaries, task):
    """(development() or None, kernel_summary()'s arrays or None, token_summary()'s or None,
    summary["susceptibility"]): the matrix at the last checkpoint, its PCA and where it changes
    fastest beside the boundaries, the loss kernel's clusters and strongest influences, the
    per-token susceptibilities by token class."""
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
    tokens, out["tokens"] = token_summary(c, task)
    return dev, kernel, tokens, {k: v for k, v in out.items() if v}


def _load(path, option):
    """An .npz written by llc.py, as a dict of arrays; missing or corrupt: one clear error."""
    try:
        with np.load(path) as z:
            return dict(z)
    except (OSError, ValueError) as e:
        raise common.CheckpointError(f"{path} is missing or corrupt ({e}): rerun llc.py "
                                     f"--{option} for that checkpoint") from None


def token_summary(c, task):
    """The per-token susceptibilities at the last checkpoint with them: a (components, tokens)
    matrix, its PCA (tokens as samples, each component standardised), the tokens' classes (the
    task's token_classes, if it has them) and the mean chi per class and component; (None, {})
    without any."""
    files = c["kernels"].get("token_susceptibility")
    if not files:
        return None, {}
    step = max(s for _, s in files)
    comps = [k for k, s in files if s == step]
    zs = {k: _load(files[(k, step)], "token_rows") for k in comps}
    X = np.stack([zs[k]["chi"].ravel() for k in comps])  # (components, tokens)
    first = zs[comps[0]]
    labels, names = (task.token_classes(first["inputs"], first["targets"])
                     if hasattr(task, "token_classes") else (np.zeros(first["chi"].shape), ["all"]))
    labels = np.asarray(labels).ravel()
    Z = (X - X.mean(1, keepdims=True)) / np.where(X.std(1) > 0, X.std(1), 1)[:, None]
    U, S, _ = np.linalg.svd(Z.T - Z.T.mean(0), full_matrices=False)
    means = {n: {k: float(X[i, labels == j].mean()) for i, k in enumerate(comps)}
             for j, n in enumerate(names) if (labels == j).any()}
    arrays = dict(step=step, components=comps, chi=X, labels=labels, names=names,
                  scores=(U[:, :2] * S[:2]), evr=(S ** 2 / (S ** 2).sum())[:2])
    return arrays, dict(step=step, components=comps, tokens=int(X.shape[1]),
                        counts={n: int((labels == j).sum()) for j, n in enumerate(names)},
                        mean_by_class=means, explained_variance=arrays["evr"].tolist())


def figures(run_dirs, fig_dir, det):
    """(figures, summary["susceptibility"]) from the rows of llc.py --probes / --bif_rows /
    --token_rows: the matrix over training beside the LLC's boundaries, the loss kernel, the
    per-token susceptibilities by token class; ([], {}) without any."""
    c = curves(run_dirs)
    if c is None:
        return [], {}
    dev, kernel, tokens, summ = summary(c, det["boundaries"], data.task_for(run_dirs[0]))
    fig_dir, figs = Path(fig_dir), []
    if dev is not None:
        figs.append(fig_dir / "9_susceptibility.png")
        plots.susceptibility(figs[-1], c, dev, det)
    if kernel is not None:
        figs.append(fig_dir / "10_loss_kernel.png")
        plots.loss_kernel(figs[-1], kernel)
    if tokens is not None:
        figs.append(fig_dir / "11_token_susceptibility.png")
        plots.token_susceptibility(figs[-1], tokens)
    return figs, summ
