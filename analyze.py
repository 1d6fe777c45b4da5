"""Analyse training runs: evaluate every checkpoint (cached), detect the developmental stages on the
LLC (or the test loss), compute the essential dynamics, and write stages.json, summary.json,
report.md and figures/. What is measured and drawn comes from the run's task: data.kind(cfg) names
an evaluator here and a figure set in plots."""
import csv, json, math, os, sys, warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import common
import data
from analysis import plots, stages, susceptibility
from analysis.metrics import Chunked, hutchinson_trace, lanczos_top, make_hvp, structure_stats
from analysis.tables import read_llc, refined_curves, table, tables

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
REFERENCE = Path(__file__).resolve().parent / "reference" / "paper_v1_seedmean.csv"

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
    """The run's Evaluator, from the function its task names: one of this file's, or
    'module:function' of another (the LM's, imported only for an LM run), which may return the
    Evaluator's fields as a dict."""
    cfg = common.load_run(out_dir)
    dev = torch.device(opt["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = data.kind(cfg).evaluator
    ev = (data.resolve(name) if ":" in name else globals()[name])(out_dir, cfg, opt, dev)
    return ev if isinstance(ev, Evaluator) else Evaluator(**ev)


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


def regression_evaluator(out_dir, cfg, opt, dev):
    """Behavioural metrics on the eval set, structure statistics, Hessian trace / top eigenvalues;
    the ED features are the full outputs on the fixed ED batch (its variant: the y-predictions
    only)."""
    hb = opt["hessian_batch"] if opt["hessian_batch"] > 0 else 1024 if dev.type == "cuda" else 256
    chunk = opt["chunk"] if opt["chunk"] >= 0 else 0 if dev.type == "cuda" else 256
    meta = {k: opt[k] for k in ("eval_size", "eval_seed", "ed_batch", "hessian_probes",
                                "lanczos_iters", "top_eigs")}
    B, T, C = opt["ed_batch"], 2 * cfg["K"], cfg["D"] + 1
    meta.update(hessian_batch=min(hb, B), width=B * T * C)

    def setup():
        task = data.task_for(cfg)
        batch = {k: v.to(dev)
                 for k, v in task.eval_batch(opt["eval_seed"], opt["eval_size"]).items()}
        # model-independent: once per run
        base = data.regression_baselines(batch, task.sigma2, task.tasks)
        ed = {k: v.to(dev) for k, v in task.eval_batch(opt["eval_seed"] + 1, B).items()}
        tokens, hb = data.to_tokens(ed["xs"], ed["ys"]), meta["hessian_batch"]

        def evaluate(model):
            model = model.to(dev)
            params = {k: v.detach().cpu() for k, v in model.named_parameters()}
            row = {**data.regression_metrics(Chunked(model, chunk), batch, task.sigma2, task.tasks,
                                             baselines=base),
                   **structure_stats(params, cfg["n_layer"])}
            if opt["hessian_probes"] > 0 or opt["lanczos_iters"] > 0:
                hvp, n = make_hvp(model, lambda o: task.loss(o, ed["ys"][:hb]), tokens[:hb])
                gen = torch.Generator().manual_seed(opt["eval_seed"])
                if opt["hessian_probes"] > 0:
                    tr, probes = hutchinson_trace(hvp, n, opt["hessian_probes"], gen)
                    row.update(hessian_trace=tr, hessian_trace_probes=probes)
                if opt["lanczos_iters"] > 0:
                    row["hessian_eigs"] = lanczos_top(hvp, n, opt["lanczos_iters"],
                                                      opt["top_eigs"], gen)
                del hvp  # frees the retained graph
            with torch.no_grad():
                return row, Chunked(model, chunk)(tokens).float().cpu().numpy()
        return evaluate
    h = max(cfg["K"] // 2, 1)
    # the step axes agree with the reference's
    paper = cfg["K"] == 8 and cfg.get("max_steps") == 500_000
    return Evaluator(meta, setup, ("loss", "delta_ridge", "pred_norm", f"icl_1_{h}", "weight_norm",
                                   "ln_collapse/unembed", "hessian_trace"),
                     ed_cols=np.arange(B * T * C).reshape(B, T, C)[:, 0::2, 0].ravel(),
                     reference=(np.genfromtxt(REFERENCE, delimiter=",", names=True) if paper
                                else None))


def refined(run_dirs, opt, metrics, prefix):
    """(curves for plots.refined_figures, summary["refined"]): the head clusters against the LM's
    head scores at the last checkpoint, and with --refined_stages each curve's stage boundaries.
    ({}, {}) without llc_*.jsonl."""
    curves = refined_curves(run_dirs)
    summ = {"curves": {g: c["names"] for g, c in curves.items()}} if curves else {}
    if "heads" in curves:
        c = curves["heads"]
        c["labels"], k, sil = stages.cluster_curves(c["llc"], opt["head_clusters"])
        c["z"], clusters = np.where(np.isnan(c["llc"]), np.nan,
                                    stages.normalise_curves(c["llc"])), []
        for j in range(k):
            cl = dict(cluster=j, heads=[n for n, lab in zip(c["names"], c["labels"]) if lab == j])
            for score in ("prev_token", "prefix"):
                v = [np.nanmean(metrics[f"{score}/{h}"][:, -1]) for h in cl["heads"]
                     if f"{score}/{h}" in metrics]
                if v and np.isfinite(v).any():
                    cl[score] = float(np.nanmean(v))
            clusters.append(cl)
        summ["head_clusters"] = dict(
            k=k, chosen_by="option" if opt["head_clusters"] > 0 else "silhouette",
            silhouette={str(j): v for j, v in sil.items()}, clusters=clusters)
    if opt["refined_stages"] and curves:
        rule, summ["stages"] = {k: opt[k] for k in STAGE_RULE}, {}
        for g, c in curves.items():
            dets = [stages.detect_stages(c["steps"], y, se, prefix=prefix, **rule)
                    for y, se in zip(c["llc"], c["se"])]
            summ["stages"][g] = {n: dict(boundaries=d["boundaries"],
                                         types=[s["type"] for s in d["stages"]])
                                 for n, d in zip(c["names"], dets)}
    return curves, summ


def susceptibilities(run_dirs, fig_dir, det):
    """(figures, summary["susceptibility"]) from the rows of llc.py --probes / --bif_rows /
    --token_rows: the matrix over training beside the LLC's boundaries, the loss kernel, the
    per-token susceptibilities by token class; ([], {}) without any."""
    c = susceptibility.curves(run_dirs)
    if c is None:
        return [], {}
    dev, kernel, tokens, summary = susceptibility.summary(c, det["boundaries"],
                                                         data.task_for(run_dirs[0]))
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
    return figs, summary


# --------------------------------------------------------------------------------- summary and main
def stage_changes(det, steps, metrics, llc_steps, L, keys):
    """For each stage, the seed-mean value of each metric (`keys`) at its first and last
    checkpoint."""
    series = [(k, steps, metrics) for k in keys] + [("llc_mean", llc_steps, L)]
    out = []
    for s in det["stages"]:
        ch = {}
        for key, st, T in series:
            if len(st) and key in T:
                v = np.nanmean(T[key], 0)
                i0, i1 = (int(np.argmin(np.abs(np.log1p(st) - np.log1p(t))))
                          for t in (s["start"], s["end"]))
                ch["llc" if key == "llc_mean" else key] = dict(start=float(v[i0]), end=float(v[i1]),
                                                               delta=float(v[i1] - v[i0]))
        out.append({**s, "metrics": ch})
    return out


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


CURVE_COLUMNS = dict(step=("step",), llc=("llc_mean", "llc/mean/mean"), se=("llc_se",))


def read_curve(path):
    """(steps, values, standard errors or None) of a curve CSV (see USAGE), sorted by step. A
    missing file or column, a non-number, a repeated or negative step: one line on stderr and exit
    code 2."""
    def bad(msg):
        common.fail("analyze.py", f"--curve={path}: {msg}")
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        bad(getattr(e, "strerror", None) or e)
    head = [c.strip() for c in rows[0]] if rows else []
    col = {k: next((head.index(n) for n in names if n in head), None)
           for k, names in CURVE_COLUMNS.items()}
    for k in ("step", "llc"):
        if col[k] is None:
            bad(f"no column {' or '.join(map(repr, CURVE_COLUMNS[k]))} in the header row {head}")
    cols = [c for c in col.values() if c is not None]
    try:
        table = np.array([[float(r[c]) if c < len(r) and r[c].strip() else math.nan for c in cols]
                          for r in rows[1:]]).reshape(-1, len(cols))
    except ValueError as e:
        bad(f"not a number: {e}")
    t = table[:, 0]
    if not np.isfinite(t).all() or (t < 0).any() or len(set(t)) < len(t):
        bad("steps must be given, distinct and >= 0")
    if np.isfinite(table[:, 1]).sum() < 2:
        bad("needs at least two rows with a finite llc value")
    table = table[np.argsort(t)]
    return table[:, 0], table[:, 1], table[:, 2] if col["se"] is not None else None


def curve_stages(opt):
    """--curve: the stages of one curve under the options' stage rule, printed as JSON
    (nothing written)."""
    steps, values, se = read_curve(opt["curve"])
    det = stages.detect_stages(steps, values, se, **{k: opt[k] for k in STAGE_RULE})
    out = {k: det[k] for k in ("boundaries", "stages")}
    print(json.dumps(out))
    return out


def stage_signal(run_dirs, runs, steps, warn):
    """The LLC tables of the runs and the curve the stages are detected on: (llc rows, diverged
    steps, llc_steps, llc tables, (signal steps, seed-mean signal, its standard error or None)).
    Without 5 common LLC estimates the signal is the test loss (a warning in `warn`)."""
    llcs, diverged = zip(*[read_llc(d) for d in run_dirs])
    for d, bad in zip(run_dirs, diverged):
        if bad:
            warn.append(f"{d}/llc.jsonl: all chains diverged (llc_mean null) at step(s) {bad}: "
                        "left out of the stage detection and the LLC curves")
    llc_steps = sorted(set.intersection(*[{r["step"] for r in rows} for rows in llcs]))
    llc = tables(llcs, llc_steps, ("llc_mean", "llc_std", "llc_se", "rhat", "llc_per_chain"))
    if len(llc_steps) >= 5:
        n = np.isfinite(llc["llc_mean"]).sum(0)
        se = np.sqrt(np.nansum(llc["llc_se"] ** 2, 0)) / n
        se = np.where(np.isnan(llc["llc_se"]).all(0), np.nan, se)
        return llcs, diverged, llc_steps, llc, (llc_steps, np.nanmean(llc["llc_mean"], 0), se)
    warn.append(f"no usable llc.jsonl (fewer than 5 common LLC estimates in {run_dirs}): stages "
                "are detected on the test loss instead")
    return llcs, diverged, [], llc, (steps, np.nanmean(table(runs, "loss", steps), 0), None)


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
    llcs, diverged, llc_steps, L, signal = stage_signal(run_dirs, runs, steps, warn)
    for w in warn:
        warnings.warn(w)
    det = stages.detect_stages(*signal, prefix=kind.stage_prefix, **{k: opt[k] for k in STAGE_RULE})
    det["signal"] = "llc" if llc_steps else "loss"
    common.atomic_write(out / "stages.json", json.dumps(det, indent=1))
    ed = stages.essential_dynamics(runs, mats, steps, opt["ed_sigma_max"], ev.ed_cols)
    metrics = tables(runs, steps)
    with warnings.catch_warnings():
        # nanmean of all-NaN columns (missing metrics)
        warnings.simplefilter("ignore", RuntimeWarning)
        figs = figure_set(kind)(out / "figures", steps, metrics, llc_steps, L, llcs[0], diverged[0],
                                det, ed, cfg, ev.reference)
        changes = stage_changes(det, steps, metrics, llc_steps, L, ev.summary_keys)
        curves, refined_summary = refined(run_dirs, opt, metrics, kind.stage_prefix)
        figs += plots.refined_figures(out / "figures", curves, llc_steps, L, det)
        sus_figs, sus_summary = susceptibilities(run_dirs, out / "figures", det)
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
    if refined_summary:
        summary["refined"] = refined_summary
        if "head_clusters" in refined_summary:
            print("\n".join(plots.cluster_table(refined_summary["head_clusters"])))
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
