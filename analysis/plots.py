"""The figures and the report of analyze.py: a figure set per task (data.kind(cfg).figures names
it), each figure a function of metric tables {key: array (runs, steps[, width])} (several runs: mean
± std), stages.detect_stages' and stages.essential_dynamics' results; one file written atomically.
matplotlib (headless Agg) is imported here only."""
import io
import math
from pathlib import Path

import matplotlib
import numpy as np

import common

matplotlib.use("Agg")  # figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

class PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (0.6, 3, 2000), on the ticks matplotlib's LogFormatter
    labels."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


STAGE_COLORS = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#dd8452",
                "#937860"]
FIGURES = ("1_loss_llc.png", "2_essential_dynamics.png", "3_behaviour.png", "4_structure.png",
           "5_llc_diagnostics.png")


def regression_figures(fig_dir, steps, M, llc_steps, L, llc_rows, diverged, det, ed, cfg, ref=None):
    """The regression run's figures into fig_dir; returns their paths. llc_rows: the first run's
    llc.jsonl rows (for the traces), diverged: its steps without an estimate, ref: the paper's
    curves or None."""
    paths = [Path(fig_dir) / f for f in FIGURES]
    loss_llc(paths[0], steps, M, llc_steps, L, det, cfg["D"] + cfg["sigma2"], ref)
    essential_dynamics(paths[1], ed, det, "all outputs (B×2K×(D+1))", "y-predictions only (B×K)")
    behaviour(paths[2], steps, M, det, cfg["K"])
    structure(paths[3], steps, M, det)
    llc_diagnostics(paths[4], llc_steps, L, llc_rows, diverged, det)
    return paths


# ------------------------------------------------------------------------------------------ shared
# look
def _axes(rows, cols, title, w=4.6, h=3.3):
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    fig.suptitle(title, fontsize=11)
    return fig, axes.ravel()


def _time_axis(ax, stages, ylabel, names=False, logy=False):
    """Shared look of every panel over training time: symlog steps, stages shaded, boundaries
    dashed."""
    for j, s in enumerate(stages):
        ax.axvspan(s["start"], s["end"], color=STAGE_COLORS[j % len(STAGE_COLORS)], alpha=0.12,
                   lw=0)
        if j:
            ax.axvline(s["start"], color="k", ls="--", lw=0.7)
        if names:
            ax.text(math.sqrt((s["start"] + 1) * (s["end"] + 1)), 1.01,
                    f"{s['name']} ({s['type']})", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xscale("symlog", linthresh=1, linscale=0.25)
    ax.set_xlim(left=0)
    ax.set_xlabel("training step (symlog)")
    ax.set_ylabel(ylabel)
    if logy:
        _log_y(ax)


def _log_y(ax, scale="log"):
    """Log y with plain tick numbers (3, 0.6, not 3×10⁰); minor ticks labelled on ranges under a
    decade."""
    ax.set_yscale(scale)
    if scale == "log":
        ax.yaxis.set_major_formatter(PlainLogFormatter())
        minor = PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4))
        ax.yaxis.set_minor_formatter(minor)


def _band(ax, steps, Y, label=None, **kw):
    """Mean over runs (axis 0), with a ±1 std band when there are several runs."""
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



# ------------------------------------------------------------------------------------------------
# figures
def loss_llc(path, steps, M, llc_steps, L, det, zero_loss, ref=None, loss_label="test loss (MSE)",
             zero_label="zero predictor D+σ²"):
    """The paper's first figure: test loss and LLC over log-steps, stages shaded, the GP fit the
    stages were detected on (±2 posterior sd); the paper's seed-mean curves overlaid when given
    (`ref`, a structured array with step, loss_mean and llc_mean)."""
    fig, (a, b) = _axes(2, 1, "Test loss and local learning coefficient", w=8, h=3.2)
    _band(a, steps, M["loss"], label="test loss (eval set)")
    a.axhline(zero_loss, color="grey", ls=":", lw=1, label=zero_label)
    if len(llc_steps):
        _band(b, llc_steps, L["llc_mean"], label="LLC λ̂", color="C3")
        if len(L["llc_mean"]) == 1:
            mean, se = L["llc_mean"][0], L["llc_se"][0]
            b.fill_between(llc_steps, mean - 2 * se, mean + 2 * se, color="C3", alpha=0.2, lw=0,
                           label="±2 s.e.")
    else:
        b.text(0.5, 0.5, "no llc.jsonl: stages detected on the test loss", transform=b.transAxes,
               ha="center")
    fit = a if det["signal"] == "loss" else b
    m, sd = np.array(det["smoothed"]), np.array(det["smoothed_sd"])
    fit.plot(det["steps"], m, "k", lw=0.8, label="GP fit (stages)")
    fit.fill_between(det["steps"], m - 2 * sd, m + 2 * sd, color="k", alpha=0.12, lw=0)
    # up to this run's last step (a run stopped early is not squeezed against 500k steps)
    if ref is not None:
        ref = ref[ref["step"] <= max(steps)]
        a.plot(ref["step"], ref["loss_mean"], color="grey", ls="--", lw=1,
               label="paper v1 (seed mean)")
        b.plot(ref["step"], ref["llc_mean"], color="grey", ls="--", lw=1,
               label="paper v1 (seed mean)")
        lo = ref["llc_mean"] - 2 * ref["llc_std"]
        hi = ref["llc_mean"] + 2 * ref["llc_std"]
        b.fill_between(ref["step"], lo, hi, color="grey", alpha=0.25, lw=0,
                       label="paper: seed mean ± 2 std")
    _time_axis(a, det["stages"], loss_label, names=True)
    _time_axis(b, det["stages"], "LLC λ̂")
    _save(fig, path)


def _trajectory(ax, runs_scores, steps, stages, i, j, evr, label=False):
    """PC_i vs PC_j of every run, each stage in its colour (the first run drawn thicker; dark grey:
    checkpoints outside the detected stages, e.g. beyond the last LLC estimate)."""
    for r, sc in enumerate(runs_scores):
        ax.plot(sc[:, i], sc[:, j], color="0.3", lw=0.8)
        for s_i, s in enumerate(stages):
            sel = (steps >= s["start"]) & (steps <= s["end"])
            ax.plot(sc[sel, i], sc[sel, j], color=STAGE_COLORS[s_i % len(STAGE_COLORS)],
                    lw=1.6 if r == 0 else 0.8,
                    label=f"{s['name']} ({s['type']})" if label and r == 0 else None)
    ax.set_xlabel(f"PC{i + 1} ({100 * evr[i]:.1f}%)")
    ax.set_ylabel(f"PC{j + 1} ({100 * evr[j]:.1f}%)")


def essential_dynamics(path, ed, det, features, features_y=None):
    """PC pairs coloured by stage with the evolute and cusps of the first run (grey: the unsmoothed
    scores), explained variance, PCs over time, and the variant on a subset of the features
    (`features_y`, if any)."""
    fig, ax = _axes(2, 3, "Essential dynamics of the model outputs (PCA over checkpoints)")
    k, stages, steps = ed["scores"][0].shape[1], det["stages"], ed["steps"]
    for p, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
        pair = f"PC{i + 1}-PC{j + 1}"
        if max(i, j) >= k:
            ax[p].axis("off")
            continue
        for raw in ed["scores"]:
            ax[p].plot(raw[:, i], raw[:, j], color="0.75", lw=0.6)
        _trajectory(ax[p], ed["smoothed"], steps, stages, i, j, ed["evr"], label=p == 0)
        xl, yl = ax[p].get_xlim(), ax[p].get_ylim()
        if pair in ed["evolutes"]:
            c = ed["evolutes"][pair]
            ax[p].scatter(c[:, 0], c[:, 1], c=np.arange(len(c)), cmap="viridis", s=3, alpha=0.6,
                          label="evolute (colour: time)" if p == 0 else None)
        if pair in ed["cusps"]:
            cusp = ed["smoothed"][0][np.searchsorted(steps, ed["cusps"][pair]["cusps"])]
            ax[p].plot(cusp[:, i], cusp[:, j], "kx", ms=7, ls="none",
                       label="evolute cusps" if p == 0 else None)
        # the evolute runs off to infinity on straight stretches
        ax[p].set_xlim(xl), ax[p].set_ylim(yl)
    n = np.arange(1, len(ed["evr"]) + 1)
    y = ed["scores_y"] is not None
    ax[3].bar(n - 0.2 * y, 100 * ed["evr"], 0.8 - 0.4 * y, label=features)
    if y:
        ax[3].bar(n + 0.2, 100 * ed["evr_y"], 0.4, label=features_y)
    ax[3].set_xlabel("principal component"), ax[3].set_ylabel("explained variance (%)")
    ax[3].set_xticks(n)
    for c in range(min(k, 3)):
        ax[4].plot(steps, ed["smoothed"][0][:, c], label=f"PC{c + 1}")
    _time_axis(ax[4], stages, "PC score (smoothed, run 1)", names=True)
    if ed["scores_y"] is None:
        ax[5].axis("off")
    elif ed["scores_y"][0].shape[1] >= 2:
        _trajectory(ax[5], ed["scores_y"], steps, stages, 0, 1, ed["evr_y"])
        ax[5].set_title(f"{features_y}, unsmoothed", fontsize=9)
    _save(fig, path)


def behaviour(path, steps, M, det, K):
    fig, ax = _axes(2, 3, "Behaviour on the fixed eval set")
    st, h = det["stages"], max(K // 2, 1)
    for k in range(1, K + 1):
        _band(ax[0], steps, M[f"loss/{k}"], label=f"k={k}", color=plt.cm.viridis(k / K))
    _time_axis(ax[0], st, "per-token loss ℓ_k (MSE)", names=True)
    ax[0].legend(fontsize=6, ncol=2)
    _band(ax[1], steps, M[f"icl_1_{h}"], label=f"ℓ_{h} − ℓ_1")
    _band(ax[1], steps, M[f"icl_{h}_{K}"], label=f"ℓ_{K} − ℓ_{h}")
    _time_axis(ax[1], st, "ICL score (lower = more ICL)")
    _band(ax[2], steps, M["delta_ridge"], label="Δ ridge")
    _band(ax[2], steps, M["delta_dmmse"], label="Δ dMMSE", ls="--")
    _time_axis(ax[2], st, "E[(ŷ − ŷ_baseline)²]", logy=True)
    _band(ax[3], steps, M["pred_norm"], label="E[ŷ²]")
    _time_axis(ax[3], st, "prediction norm E[ŷ²]")
    # the OOD scales
    for g in sorted((k.split("/")[1] for k in M if k.startswith("ood_inputs/")), key=float):
        _band(ax[4], steps, M[f"ood_inputs/{g}"] / float(g) ** 2, label=f"inputs ×{g}")
        _band(ax[5], steps, M[f"ood_tasks/{g}"] / float(g) ** 2, label=f"tasks ×{g}")
    _time_axis(ax[4], st, "OOD loss / g²  (x → g·x)", logy=True)
    _time_axis(ax[5], st, "OOD loss / g²  (w → g·w)", logy=True)
    _save(fig, path)


def structure(path, steps, M, det):
    fig, ax = _axes(2, 3, "Structure of the weights")
    st = det["stages"]
    for key in [k for k in M if k.startswith("ln_collapse/")]:
        _band(ax[0], steps, M[key], label=key.split("/")[1])
    _time_axis(ax[0], st, "LN collapse: fraction |γ| < 0.1", names=True)
    ax[0].set_ylim(-0.03, 1.03)
    for a, key, name in ((ax[1], "tok_spec", "token"), (ax[2], "pos_spec", "positional")):
        spec = np.nanmean(M[key], 0)
        for c in range(min(spec.shape[1], 6)):
            a.plot(steps, spec[:, c], label=f"σ{c + 1}²/Σσ²", color=plt.cm.viridis(c / 6))
        _time_axis(a, st, f"{name} embedding spectrum σ_i²/Σσ²")
    _band(ax[3], steps, M["weight_norm"], label="‖w‖₂")
    _time_axis(ax[3], st, "weight norm ‖w‖₂")
    hess = []
    if "hessian_trace" in M:
        hess = [(M["hessian_trace"][:, :, None], ["trace (Hutchinson mean)"])]
    if "hessian_eigs" in M:
        eig_labels = [f"λ{c + 1} (Lanczos)" for c in range(M["hessian_eigs"].shape[2])]
        hess.append((M["hessian_eigs"], eig_labels))
    for vals, labels in hess:
        for c, lab in enumerate(labels):
            _band(ax[4], steps, vals[:, :, c], label=lab, ls="--" if c else "-")
    _time_axis(ax[4], st, "Hessian trace and top eigenvalues")
    if hess:  # symlog only when an estimate is <= 0 (a non-minimum, or a loose Lanczos Ritz value)
        _log_y(ax[4], "log" if min(np.nanmin(v) for v, _ in hess) > 0 else "symlog")
    ax[5].plot(steps, np.nanmean(M["unembed_w"], 0), color="0.6", lw=0.4)
    _band(ax[5], steps, M["unembed_b"], label="bias W₀·β + b₀", color="C3")
    _time_axis(ax[5], st, "effective unembedding γ_i·W[0,i] (grey)")
    _save(fig, path)


def llc_diagnostics(path, llc_steps, L, rows, diverged, det):
    """λ̂ with the per-chain estimates and the steps where every chain diverged, R̂, and the
    per-chain loss traces of four checkpoints of the first run (rows: its llc.jsonl rows with an
    estimate)."""
    fig, ax = _axes(2, 3, "LLC diagnostics (llc.jsonl)")
    if not len(llc_steps):
        for a in ax:
            a.axis("off")
        msg = "no usable llc.jsonl: run `python llc.py --ckpt=<out_dir>` first"
        note = f"\n(all chains diverged at steps {diverged})" if diverged else ""
        ax[0].text(0, 0.5, msg + note, fontsize=11)
        return _save(fig, path)
    st = det["stages"]
    chains = L["llc_per_chain"] if "llc_per_chain" in L and L["llc_per_chain"].ndim == 3 else None
    if chains is not None:
        for c in range(chains.shape[2]):
            ax[0].plot(llc_steps, chains[0, :, c], ".", color="0.55", ms=2.5,
                       label="per chain (run 1)" if c == 0 else None)
    _band(ax[0], llc_steps, L["llc_mean"], label="λ̂ (mean over chains)", color="C3")
    if diverged:
        ax[0].plot(diverged, np.zeros(len(diverged)), "rx", ms=6,
                   transform=ax[0].get_xaxis_transform(), clip_on=False,
                   label="all chains diverged")
    _time_axis(ax[0], st, "LLC λ̂", names=True)
    _band(ax[1], llc_steps, L["llc_std"], label="std over chains", color="0.4")
    _band(ax[1], llc_steps, L["llc_se"], label="standard error", color="C0")
    _time_axis(ax[1], st, "spread of λ̂")
    _band(ax[2], llc_steps, L["rhat"], label="R̂ across chains")
    ax[2].axhline(1.1, color="r", ls=":", lw=1, label="1.1")
    _time_axis(ax[2], st, "R̂ (Gelman-Rubin)")
    pick = sorted({int(round(v)) for v in np.linspace(0, len(rows) - 1, 3)}) if rows else []
    for a, i in zip(ax[3:], pick):
        r = rows[i]
        for tr in r.get("loss_trace") or []:
            if tr is not None:
                excess = r["nbeta"] * (np.array(tr, dtype=float) - r["init_loss"])
                a.plot(r["trace_draws"][:len(tr)], excess, lw=0.8)
        a.axhline(r["llc_mean"], color="k", ls="--", lw=1, label=f"λ̂ = {r['llc_mean']:.1f}")
        a.set_title(f"step {r['step']}: per-chain traces (run 1)", fontsize=9)
        a.set_xlabel("SGLD draw"), a.set_ylabel("nβ·(L_t − L(w*))")
    for a in ax[3 + len(pick):]:
        a.axis("off")
    _save(fig, path)


# -------------------------------------------------------------------------------------------
# refined LLCs
def refined_figures(fig_dir, curves, llc_steps, L, det):
    """The refined-LLC figures that have data (curves: tables.refined_curves' groups): 6 per-head
    wrLLCs by cluster, 7 the other restriction sets (paper's components, layers), 8 the drLLCs;
    returns their paths."""
    fig_dir, paths = Path(fig_dir), []
    sets = {g: c for g, c in curves.items() if g not in ("heads", "data")}
    if "heads" in curves:
        paths.append(fig_dir / "6_head_llc.png")
        head_llc(paths[-1], curves["heads"], det)
    if sets:
        paths.append(fig_dir / "7_component_llc.png")
        component_llc(paths[-1], sets, det)
    if "data" in curves:
        paths.append(fig_dir / "8_data_refined_llc.png")
        data_refined_llc(paths[-1], curves["data"], llc_steps, L, det)
    return paths


def _positive(Y):
    Y = np.asarray(Y, float)
    return bool(np.isfinite(Y).any() and (Y[np.isfinite(Y)] > 0).all())


def head_llc(path, c, det):
    """A panel per layer with each head's wrLLC coloured by its k-means cluster, and the clusters'
    mean standardised log-curve (what k-means compared)."""
    layers = list(dict.fromkeys(n.partition("H")[0] for n in c["names"]))
    k = int(c["labels"].max()) + 1
    fig, ax = _axes(1, len(layers) + 1, f"Weight-refined LLC of each attention head ({k} clusters)")
    for n, y, lab in zip(c["names"], c["llc"], c["labels"]):
        i = layers.index(n.partition("H")[0])
        ax[i].plot(c["steps"], y, color=plt.cm.tab10(lab % 10), lw=1.2, ls=("-", "--", ":", "-.")[
            len(ax[i].lines) % 4], label=f"{n} (cluster {lab})")
    for i, layer in enumerate(layers):
        _time_axis(ax[i], det["stages"], f"wrLLC, layer {layer}", names=i == 0,
                   logy=_positive(c["llc"]))
    for j in range(k):
        ax[-1].plot(c["steps"], np.nanmean(c["z"][c["labels"] == j], 0),
                    color=plt.cm.tab10(j % 10), lw=1.5,
                    label=f"cluster {j} ({(c['labels'] == j).sum()} heads)")
    _time_axis(ax[-1], det["stages"], "standardised log wrLLC (cluster mean)")
    _save(fig, path)


def component_llc(path, sets, det):
    """A panel per restriction set (the paper's components, the layers): a wrLLC curve per
    restriction."""
    fig, ax = _axes(1, len(sets), "Weight-refined LLC of each component", w=6.5, h=4.2)
    for a, (g, c) in zip(ax, sets.items()):
        for i, (n, y) in enumerate(zip(c["names"], c["llc"])):
            a.plot(c["steps"], y, label=n, color="k" if n == "all" else plt.cm.tab20(i % 20),
                   lw=2 if n == "all" else 1.1, ls=("-", "--", ":")[i // 20 % 3])
        _time_axis(a, det["stages"], f"wrLLC ({g})", names=True, logy=_positive(c["llc"]))
        a.legend(fontsize=5, ncol=2)
    _save(fig, path)


def data_refined_llc(path, c, llc_steps, L, det):
    """The data-refined LLC of each distribution (±2 s.e.) with the unrefined llc.jsonl curve."""
    fig, (a,) = _axes(1, 1, "Data-refined LLC of each distribution", w=8, h=4.2)
    for i, (n, y, se) in enumerate(zip(c["names"], c["llc"], c["se"])):
        a.plot(c["steps"], y, color=plt.cm.tab10(i % 10), lw=1.3, label=n)
        a.fill_between(c["steps"], y - 2 * se, y + 2 * se, color=plt.cm.tab10(i % 10), alpha=0.15,
                       lw=0)
    if len(llc_steps):
        _band(a, llc_steps, L["llc_mean"], label="unrefined (llc.jsonl)", color="k", ls="--")
    _time_axis(a, det["stages"], "drLLC", names=True, logy=_positive(c["llc"]))
    _save(fig, path)


def susceptibility(path, c, dev, det):
    """The susceptibility matrix over training (analysis/susceptibility.py): its first two
    principal components and its speed of change with the LLC's stages, and the matrix (components
    x probes) at the last checkpoint."""
    fig, ax = _axes(1, 3, "Susceptibilities χ = -Cov[φ_C, L_q' - L_q]", w=5.2, h=3.8)
    for i, sc in enumerate(dev["scores"]):
        ax[0].plot(c["steps"], sc, lw=1.3, label=f"PC{i + 1} ({dev['evr'][i]:.0%})")
    _time_axis(ax[0], det["stages"], "PCA score", names=True)
    ax[1].plot(dev["speed_steps"], dev["speed"], color="k", lw=1.2)
    _time_axis(ax[1], det["stages"], "speed of change (per unit log step)")
    M = c["chi"][:, :, -1]
    v = float(np.nanmax(np.abs(M))) if np.isfinite(M).any() else 1.0
    im = ax[2].imshow(M, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    ax[2].set_xticks(range(len(c["probes"])), c["probes"], rotation=90, fontsize=6)
    ax[2].set_yticks(range(len(c["components"])), c["components"], fontsize=6)
    ax[2].set_title(f"χ at step {c['steps'][-1]}", fontsize=8)
    fig.colorbar(im, ax=ax[2])
    _save(fig, path)


def loss_kernel(path, k):
    """The loss kernel (per-sample loss correlations over the posterior, rows and columns sorted by
    k-means cluster) and the BIF of each training row on each query."""
    order = np.argsort(k["labels"], kind="stable")
    fig, ax = _axes(1, 2, f"Loss kernel and BIF at step {k['step']} ({k['component']})", w=5, h=4.2)
    im = ax[0].imshow(k["corr"][np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    ax[0].set_title(f"correlation of per-sample losses ({k['labels'].max() + 1} clusters)",
                    fontsize=8)
    fig.colorbar(im, ax=ax[0])
    v = float(np.abs(k["bif"]).max()) or 1.0
    im = ax[1].imshow(k["bif"], cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    ax[1].set_xlabel("query row")
    ax[1].set_ylabel("training row")
    ax[1].set_title("BIF = -Cov[l_train, l_query]", fontsize=8)
    fig.colorbar(im, ax=ax[1])
    _save(fig, path)


def token_susceptibility(path, t):
    """Per-token susceptibilities at one checkpoint: every token in the plane of the first two
    principal components of its components' chi, coloured by token class; the mean chi of each
    class for each component."""
    fig, ax = _axes(1, 2, f"Per-token susceptibilities at step {t['step']}", w=5.5, h=4.2)
    for j, name in enumerate(t["names"]):
        on = t["labels"] == j
        if on.any():
            ax[0].scatter(*t["scores"][on].T, s=6, alpha=0.6, color=plt.cm.tab10(j % 10),
                          label=f"{name} ({on.sum()})")
    ax[0].set_xlabel(f"PC1 ({t['evr'][0]:.0%})")
    ax[0].set_ylabel(f"PC2 ({t['evr'][1]:.0%})" if len(t["evr"]) > 1 else "PC2")
    present = [j for j in range(len(t["names"])) if (t["labels"] == j).any()]
    M = np.array([[t["chi"][i, t["labels"] == j].mean() for i in range(len(t["chi"]))]
                  for j in present])
    v = float(np.abs(M).max()) or 1.0
    im = ax[1].imshow(M, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    ax[1].set_yticks(range(len(present)), [t["names"][j] for j in present], fontsize=7)
    ax[1].set_xticks(range(len(t["components"])), t["components"], rotation=90, fontsize=6)
    ax[1].set_title("mean \u03c7 per token class", fontsize=8)
    fig.colorbar(im, ax=ax[1])
    _save(fig, path)


def cluster_table(hc):
    """summary["refined"]["head_clusters"] as markdown lines: each cluster's heads and, for the LM,
    their mean previous-token and prefix-matching scores at the last checkpoint."""
    scores = [s for s in ("prev_token", "prefix") if any(s in c for c in hc["clusters"])]
    sil = ", ".join(f"k={j}: {v:.3f}" for j, v in hc["silhouette"].items())
    header = ["cluster", "heads"] + [f"mean {s} score" for s in scores]
    lines = [f"Head clusters of the wrLLC curves: k = {hc['k']} "
             f"({hc['chosen_by']}{'; ' + sil if sil else ''}).",
             "", "| " + " | ".join(header) + " |",
             "|---" * (2 + len(scores)) + "|"]
    for c in hc["clusters"]:
        means = [f"{c[s]:.3f}" if s in c else "–" for s in scores]
        cells = [str(c["cluster"]), ", ".join(c["heads"])] + means
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------
# report
def write_report(path, summary, figures):
    """report.md: the stage table (each metric from the first to the last checkpoint of a stage),
    the warnings, the explained variance and the figures (paths relative to the report's folder)."""
    st, gp = summary["stages"], summary["detector"]["gp"]
    cols = [c for c in ("llc", "loss", "delta_ridge", "pred_norm", "icl", "bigram", "weight_norm")
            if c in st[0]["metrics"]]
    lines = [f"# Developmental stages: {', '.join(summary['runs'])}", "",
             f"{summary['n_checkpoints']} checkpoints, {len(summary['runs'])} run(s); "
             f"stages detected on **{summary['signal']}** (GP fit in log(t+{gp.get('t0', 1):.0f}), "
             "significant minima of |slope| in log(t+1); rule, parameters and GP hyperparameters "
             "in stages.json).", ""]
    lines += [f"> warning: {w}" for w in summary["warnings"]] + [""] * bool(summary["warnings"])
    lines += ["| stage | steps | type | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for s in st:
        cells = [f"{s['metrics'][c]['start']:.4g} → {s['metrics'][c]['end']:.4g}" for c in cols]
        row = f"| {s['name']} | {s['start']:,}–{s['end']:,} | {s['type']} | "
        lines.append(row + " | ".join(cells) + " |")
    ev = summary["essential_dynamics"]["explained_variance"]
    lines += ["", "Types: A = signal rising, B = falling, Other = flat. "
              "Essential dynamics: explained variance "
              + ", ".join(f"PC{i + 1} {100 * v:.1f}%" for i, v in enumerate(ev)) + ".", ""]
    ref = summary.get("refined", {})
    if ref:
        lines += ["## Refined LLCs", "", "Curves: " + "; ".join(f"{g}: {', '.join(n)}" for g, n in
                                                             ref["curves"].items()) + ".", ""]
        lines += cluster_table(ref["head_clusters"]) + [""] if "head_clusters" in ref else []
        lines += [f"- stages of {g} / {n}: boundaries {d['boundaries']}, "
                  f"types {', '.join(d['types'])}"
                  for g, per in ref.get("stages", {}).items() for n, d in per.items()]
        lines += [""] * ("stages" in ref)
    lines += [f"![{Path(f).stem}]({Path(f).relative_to(Path(path).parent)})" for f in figures]
    common.atomic_write(path, "\n".join(lines) + "\n")
