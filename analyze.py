"""Analyse training runs: evaluate every checkpoint (cached), detect the developmental stages on the
LLC (or the test loss), compute the essential dynamics, and write stages.json, summary.json,
report.md and figures/. What is measured and drawn comes from the run's task: data.kind(cfg) names
an evaluator here and a figure set in plots."""
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import common
import data
from analysis import plots, stages, susceptibility
from analysis import tables as tab

USAGE = """
    python analyze.py out/tiny                              # outputs in out/tiny
    python analyze.py out/s0 out/s1 out/s2 --out=out/seeds  # seeds: mean ± std, one stage
                                                              detection, one PCA
    python analyze.py out/tiny --eval_size=2048 --hessian_probes=0 --lanczos_iters=0
                                                            # quicker on a CPU
    python analyze.py --curve=llc.csv   # one curve's stages, as
                                          {"boundaries": [...], "stages": [...]} on stdout
Bare arguments are run directories (a .py file is a config file). Cached per run: analysis.jsonl (a
row per checkpoint), ed_outputs.f32 (the ED features) and analysis_meta.json (changed settings
re-evaluate everything). --curve=FILE.csv needs no run directory and writes no file: a header row
naming `step` and `llc_mean` (or the paper's `llc/mean/mean`), optionally `llc_se`, then one row per
checkpoint; the stage rule is the options below."""

STAGE_RULE = dict(  # stages.detect_stages' thresholds
    alpha=0.05,            # significance of a boundary's slope dip
                           # (one-sided, Bonferroni over candidates)
    slope_frac=0.2,        # boundary candidates: local minima of |slope| below this
                           # fraction of its maximum
    min_change_frac=0.05,  # a stage must change the smoothed curve by more than
                           # this fraction of its range
    min_log_len=0.25,      # a stage must last at least this long in log(t+1)
    flat_frac=0.05,        # a stage changing by less than this fraction of the range is typed Other
    corr_len_frac=0.1,     # errors shared by neighbouring checkpoints:
                           # correlation length <= this * ls
)
DEFAULTS = dict(  # the options, --key=value; a value keeps the default's type
    out="",               # output directory (default: the first run directory)
    eval_size=8192,       # eval-set sequences for the metrics
    eval_seed=0,          # seeds the eval set (ED/Hessian batch: seed+1)
    ed_batch=1024,        # sequences in the fixed ED batch
    hessian_batch=-1,     # first sequences of the ED batch used (-1: 1024 on a GPU, 256 on a CPU)
    hessian_probes=2,     # Hutchinson probes (0: no trace)
    lanczos_iters=10,     # Lanczos iterations (0: no eigenvalues)
    top_eigs=3,           # top Hessian eigenvalues reported
    chunk=-1,             # sequences per forward pass (0: the whole batch;
                          # -1: 256 on a CPU, 0 on a GPU)
    ed_sigma_max=-1.0,    # end of the smoothing-σ ramp (-1: 300·N/5000)
    lm_rows=256,          # LM: held-out rows evaluated (the paper: 10,000 x 1,024 tokens)
    lm_ed=256,            # LM: ED features, one true-token logit per row
                          # (at most lm_rows; the paper: 10,000)
    lm_head_seqs=200,     # LM: synthetic sequences per head score (the paper: 10,000)
    lm_bigram_seqs=256,   # LM: positions for the bigram score and entropy
                          # (the paper: 5,000 / 10,000)
    lm_ngrams=1000,       # LM: n-gram sequences per n = 2, 3, 4
    threads=0,            # torch threads (0: torch's default)
    device="",            # evaluation device (default: cuda if available, else cpu)
    head_clusters=0,      # refined LLCs: k of the k-means on the heads' wrLLC curves
                          # (0: by silhouette, 2..6)
    refined_stages=False,  # refined LLCs: also detect the stages of every
                           # restriction's and distribution's curve
    curve="",             # a CSV of one curve (step, llc_mean[, llc_se]):
                          # print its stages as JSON, nothing else
    **STAGE_RULE)
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
CHECKS = {  # option: (test, what a value must be), checked before anything is read or written
    "alpha": (lambda v: 0 < v < 1, "in (0, 1)"), "slope_frac": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_change_frac": _FRACTION, "flat_frac": _FRACTION,
    "min_log_len": (lambda v: v >= 0, "at least 0"),
    "corr_len_frac": (lambda v: v >= 0, "at least 0"),
    **{k: (lambda v: v >= 1, "at least 1") for k in ("eval_size", "ed_batch", "top_eigs", "lm_rows",
                                                     "lm_ed", "lm_head_seqs", "lm_bigram_seqs",
                                                     "lm_ngrams")},
    **{k: (lambda v: v >= 0, "at least 0") for k in ("hessian_probes", "lanczos_iters", "threads")},
    "hessian_batch": (lambda v: v == -1 or v >= 1, "-1 or at least 1"),
    "chunk": (lambda v: v >= -1, "-1, 0 or at least 1"),
    "ed_sigma_max": (lambda v: v == -1 or v > 0, "-1 or above 0"),
    "head_clusters": (lambda v: v == 0 or v >= 2, "0 (by silhouette) or at least 2"),
}


# -------------------------------------------------------------------------- per-checkpoint analysis
@dataclass
class Evaluator:
    """A task's analysis of one run (made by the function data.kind(cfg).evaluator names): what is
    measured at each checkpoint, and what the summary, the ED variant and the loss/LLC figure take
    from the task."""
    meta: dict           # the cache's settings (changing them re-evaluates every checkpoint);
                         # width: ED features
    setup: Callable      # () -> evaluate(model) -> (metrics, ED features);
                         # called once, only if there is work
    summary_keys: tuple  # the metrics reported at each stage's first and last checkpoint
    ed_cols: np.ndarray | None = None    # the ED variant's feature columns
                                         # (regression: the y-predictions)
    reference: np.ndarray | None = None  # the paper's seed-mean curves,
                                         # overlaid on the loss/LLC figure
    final: bool = False  # summary.json gets "final": each metric's mean at the last checkpoint


def evaluator(out_dir, opt) -> Evaluator:
    """The run's Evaluator, from the 'module:function' its task names (analysis/regression.py's,
    or the LM's, imported only for an LM run), which returns the Evaluator's fields as a dict."""
    cfg = common.load_run(out_dir)
    dev = torch.device(opt["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Evaluator(**data.resolve(data.kind(cfg).evaluator)(out_dir, cfg, opt, dev))


def figure_set(kind):
    """The figure function of a task: analysis/plots.py's, or 'module:function' of another (the
    LM's)."""
    return data.resolve(kind.figures) if ":" in kind.figures else getattr(plots, kind.figures)


def evaluate_run(out_dir, ev):
    """Evaluate every checkpoint not yet in out_dir/analysis.jsonl; returns (rows sorted by
    step, ED memmap)."""
    out_dir, meta = Path(out_dir), ev.meta
    cache, ed_path, meta_path = (out_dir / f for f in ("analysis.jsonl", "ed_outputs.f32",
                                                       "analysis_meta.json"))
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
        evaluate = ev.setup()  # the once-per-run state (eval sets, baselines, n-gram lists)
        progress = common.Progress(f"analyze {out_dir.name}", len(todo), "ckpt")
        for i, step in enumerate(todo, 1):
            try:
                model = data.load_model(out_dir, step)
            except common.CheckpointError as e:
                warnings.warn(f"skipping step {step}: {e}")
            else:
                metrics, feats = evaluate(model)
                row = {"step": step, **metrics, "ed_row": len(rows)}
                with open(ed_path, "ab") as f:
                    f.write(np.asarray(feats, dtype=np.float32).ravel().tobytes())
                    f.flush()
                    os.fsync(f.fileno())
                common.append_jsonl(cache, row)
                rows.append(row)
            progress.update(i, note=f"step {step}")
    X = np.memmap(ed_path, dtype=np.float32, mode="r").reshape(-1, meta["width"]) if rows else None
    return sorted(rows, key=lambda r: r["step"]), X


# --------------------------------------------------------------------------------- summary and main
def parse(argv):
    """(options, run directories) from the command line. A usage error, or an argument that is not a
    run with checkpoints, is one line on stderr and exit code 2, before anything is written."""
    opt, run_dirs = common.parse_args("analyze.py", __doc__ + "\n" + USAGE, DEFAULTS, argv,
                                      sources=[__file__], positional=True)
    for k, (ok, what) in CHECKS.items():
        if not ok(opt[k]):
            common.fail("analyze.py", f"--{k}={opt[k]!r} must be {what}")
    if opt["curve"]:
        if run_dirs:
            common.fail("analyze.py", f"--curve takes no run directories, got {run_dirs}")
        return opt, run_dirs
    if not run_dirs:
        common.fail("analyze.py", "give one or more run directories: "
                                  "python analyze.py out/<run> [--key=value ...]")
    for d in run_dirs:
        try:
            data.kind(common.load_run(d))
        except (OSError, ValueError) as e:  # no or a bad config.json, an unknown task
            common.fail("analyze.py", e)
        if not common.list_checkpoints(d):
            common.fail("analyze.py", f"no checkpoints in {d}/checkpoints")
    return opt, run_dirs


def curve_stages(opt):
    """--curve: the stages of one curve under the options' stage rule, printed as JSON
    (nothing written)."""
    steps, values, se = tab.read_curve(opt["curve"])
    det = stages.detect_stages(steps, values, se, **{k: opt[k] for k in STAGE_RULE})
    out = {k: det[k] for k in ("boundaries", "stages")}
    print(json.dumps(out))
    return out


@common.one_line_errors("analyze.py", usage=(FileNotFoundError,), after="the same command resumes")
def main(argv=None):
    """Analyse the runs named in argv (see USAGE); returns the summary also written to
    <out>/summary.json."""
    opt, run_dirs = parse(sys.argv[1:] if argv is None else argv)
    if opt["threads"] > 0:
        torch.set_num_threads(opt["threads"])
    if opt["curve"]:
        return curve_stages(opt)
    out = Path(opt["out"] or run_dirs[0])
    evs = [evaluator(d, opt) for d in run_dirs]
    runs, mats = zip(*[evaluate_run(d, ev) for d, ev in zip(run_dirs, evs)])
    empty = [d for d, r in zip(run_dirs, runs) if not r]
    if empty:
        common.fail("analyze.py", f"no readable checkpoints in {empty}")
    cfg, ev, warn = common.load_run(run_dirs[0]), evs[0], []
    kind = data.kind(cfg)
    steps = sorted(set.intersection(*[{r["step"] for r in rows} for rows in runs]))
    llcs, diverged, llc_steps, L, signal = tab.stage_signal(run_dirs, runs, steps, warn)
    for w in warn:
        warnings.warn(w)
    det = stages.detect_stages(*signal, prefix=kind.stage_prefix, **{k: opt[k] for k in STAGE_RULE})
    det["signal"] = "llc" if llc_steps else "loss"
    common.atomic_write(out / "stages.json", json.dumps(det, indent=1))
    ed = stages.essential_dynamics(runs, mats, steps, opt["ed_sigma_max"], ev.ed_cols)
    metrics = tab.tables(runs, steps)
    with warnings.catch_warnings():
        # nanmean of all-NaN columns (missing metrics)
        warnings.simplefilter("ignore", RuntimeWarning)
        figs = figure_set(kind)(out / "figures", steps, metrics, llc_steps, L, llcs[0], diverged[0],
                                det, ed, cfg, ev.reference)
        changes = tab.stage_changes(det, steps, metrics, llc_steps, L, ev.summary_keys)
        curves = tab.refined_curves(run_dirs)
        rule = {k: opt[k] for k in STAGE_RULE} if opt["refined_stages"] else None
        refined = stages.refined_summary(curves, metrics, opt["head_clusters"], rule,
                                         kind.stage_prefix)
        figs += plots.refined_figures(out / "figures", curves, llc_steps, L, det)
        sus_figs, sus_summary = susceptibility.figures(run_dirs, out / "figures", det)
    summary = dict(runs=[str(d) for d in run_dirs], signal=det["signal"], warnings=warn,
                   n_checkpoints=len(steps), boundaries=det["boundaries"], stages=changes,
                   detector=dict(params=det["params"], gp=det["gp"]),
                   llc_diverged_steps=list(diverged),
                   essential_dynamics=dict(explained_variance=ed["evr"].tolist(),
                                           explained_variance_y=ed["evr_y"].tolist(),
                                           cusps=ed["cusps"]),
                   figures=[str(f.relative_to(out)) for f in figs + sus_figs])
    if ev.final:
        last = {k: v[:, -1].mean() for k, v in metrics.items() if v.ndim == 2}
        summary["final"] = {k: float(v) for k, v in last.items() if math.isfinite(v)}
    if refined:
        summary["refined"] = refined
        if "head_clusters" in refined:
            print("\n".join(plots.cluster_table(refined["head_clusters"])))
    if sus_summary:
        summary["susceptibility"] = sus_summary
    common.atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    plots.write_report(out / "report.md", summary, figs)
    print(f"analyze.py: {len(det['stages'])} stages on {det['signal']}, boundaries "
          f"{det['boundaries']}; wrote {out}/stages.json, summary.json, report.md, figures/",
          file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
