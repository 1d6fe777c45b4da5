"""The figures of a language-model run (data.TASKS["lm"].figures names `figures`), drawn with
plots.py's shared panels. `metrics`: analyze.py's tables, {metric: (runs, checkpoints) array}."""
import math
from pathlib import Path

from analysis import plots
from analysis.plots import _axes, _band, _save, _time_axis, plt

FIGURES = ("1_loss_llc.png", "2_essential_dynamics.png", "3_lm_behaviour.png", "4_head_scores.png",
           "5_llc_diagnostics.png")


def figures(fig_dir, steps, metrics, llc_steps, L, llc_rows, diverged, det, ed, cfg, ref=None):
    """plots.regression_figures for a language-model run: the behaviour and head-score panels
    differ."""
    paths = [Path(fig_dir) / f for f in FIGURES]
    plots.loss_llc(paths[0], steps, metrics, llc_steps, L, det, math.log(cfg["vocab_size"]),
                   loss_label="test loss (nats)", zero_label="uniform ln V")
    plots.essential_dynamics(paths[1], ed, det, "true-token logits")
    behaviour(paths[2], steps, metrics, det)
    head_scores(paths[3], steps, metrics, det)
    plots.llc_diagnostics(paths[4], llc_steps, L, llc_rows, diverged, det)
    return paths


def behaviour(path, steps, metrics, det):
    """Per-position loss, ICL, bigram and n-gram scores, the position-ablation cost and the weight
    norm."""
    fig, ax = _axes(2, 3, "Language model: behaviour on held-out text")
    st = det["stages"]
    ks = sorted(int(k.split("/")[1]) for k in metrics if k.startswith("loss/"))
    for k in ks:
        color = plt.cm.viridis(ks.index(k) / max(len(ks) - 1, 1))
        _band(ax[0], steps, metrics[f"loss/{k}"], label=f"k={k}", color=color)
    _time_axis(ax[0], st, "per-token loss ℓ_k (nats)", names=True)
    ax[0].legend(fontsize=5, ncol=2)
    _band(ax[1], steps, metrics["icl"], label="ICL score (late − early)")
    _time_axis(ax[1], st, "ICL score (lower = more ICL)")
    _band(ax[2], steps, metrics["bigram"], label="bigram score")
    _band(ax[2], steps, metrics["bigram_entropy"], label="bigram entropy (floor)", ls=":",
          color="grey")
    _time_axis(ax[2], st, "H(B[c], model) (nats)")
    for n in (2, 3, 4):
        if f"ngram/{n}" in metrics:
            _band(ax[3], steps, metrics[f"ngram/{n}"], label=f"{n}-gram")
    _time_axis(ax[3], st, "n-gram score (test loss / n-gram loss)")
    _band(ax[4], steps, metrics["loss_pos_ablated"] - metrics["loss"], label="ablated − loss")
    _time_axis(ax[4], st, "position-ablation loss increase")
    _band(ax[5], steps, metrics["weight_norm"], label="‖w‖")
    _time_axis(ax[5], st, "weight norm")
    _save(fig, path)


def head_scores(path, steps, metrics, det):
    """Previous-token and prefix-matching score of every head, and the layer 0 -> 1 K-composition of
    every pair, over training (the paper's Figure 3 ingredients)."""
    fig, ax = _axes(1, 3, "Attention heads over training", w=5.2, h=3.6)
    panels = ((ax[0], "prev_token/", "previous-token score"),
              (ax[1], "prefix/", "prefix-matching score"),
              (ax[2], "kcomp/", "K-composition (L0 head → L1 head)"))
    for a, key, label in panels:
        keys = sorted(k for k in metrics if k.startswith(key))
        for i, k in enumerate(keys):
            ls = "-" if "L0" in k or key == "kcomp/" else "--"
            _band(a, steps, metrics[k], label=k[len(key):], color=plt.cm.tab20(i % 20), ls=ls)
        _time_axis(a, det["stages"], label, names=a is ax[0])
        if keys:
            a.legend(fontsize=5, ncol=2)
    _save(fig, path)
