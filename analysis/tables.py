"""A run's rows as arrays: llc.jsonl and the refined llc_*.jsonl read into tables over steps
(several runs: a row each; their mean where curves are combined) and the curve the stages are
detected on; the metrics at each stage's ends; a curve CSV (analyze.py --curve)."""
import csv
import math
import warnings
from pathlib import Path

import numpy as np

import common


def read_llc(out_dir):
    """(llc.jsonl rows with a finite llc_mean, the last per step, sorted; the steps whose chains all
    diverged, llc_mean null, and that have no finite row). ([], []) when the file is absent."""
    rows, diverged = {}, set()
    for r in common.read_jsonl(Path(out_dir) / "llc.jsonl"):
        v = r.get("llc_mean")
        if isinstance(v, (int, float)) and math.isfinite(v):
            rows[r["step"]] = r
        else:
            diverged.add(r["step"])
    return [rows[s] for s in sorted(rows)], sorted(diverged - set(rows))


def table(runs, key, steps):
    """(runs, steps[, width]) float array of one metric over the given steps; NaN where a run lacks
    it or has null (also inside a list; shorter lists are padded)."""
    vals = [[by.get(s) for s in steps]
            for by in ({r["step"]: r.get(key) for r in rows} for rows in runs)]
    width = max((len(v) for row in vals for v in row if isinstance(v, list)), default=None)
    if width is None:
        return np.array([[np.nan if v is None else v for v in row] for row in vals], dtype=float)
    return np.array([[(v or []) + [None] * (width - len(v or [])) for v in row] for row in vals],
                    dtype=float)


def tables(runs, steps, keys=None):
    """{key: table(runs, key, steps)} for `keys` (default: every key of the rows but step
    and ed_row)."""
    keys = keys or dict.fromkeys(k for rows in runs for r in rows for k in r
                                 if k not in ("step", "ed_row"))
    return {k: table(runs, k, steps) for k in keys}


def read_refined(out_dir):
    """A run's refined-LLC rows (every llc_*.jsonl) as {group: {name: {step: row}}}: group is the
    restriction_set (paper, heads, layers) or "data" (names: data_refine); a step's last row wins;
    other rows are ignored."""
    groups = {}
    for path in sorted(Path(out_dir).glob("llc_*.jsonl")):
        for r in common.read_jsonl(path):
            g, name = ((r["restriction_set"], r.get("restriction")) if r.get("restriction_set")
                       else ("data", r.get("data_refine")))
            # both refinements: a group of its own
            if r.get("restriction_set") and r.get("data_refine"):
                g = f"{g} on {r['data_refine']}"
            if name:
                groups.setdefault(g, {}).setdefault(str(name), {})[r["step"]] = r
    return groups


def refined_curves(run_dirs):
    """{group: dict(names, steps, llc, se)}: each refined LLC (null -> NaN) as a row of llc (names,
    steps), the mean over runs on the union of their steps (se combined as for llc.jsonl); heads and
    layers in numeric order."""
    per_run, out = [read_refined(d) for d in run_dirs], {}
    for g in dict.fromkeys(g for pr in per_run for g in pr):
        names = list(dict.fromkeys(n for pr in per_run for n in pr.get(g, {})))
        if g in ("heads", "layers"):
            names.sort(key=lambda n: [int(x) for x in
                                      "".join(c if c.isdigit() else " " for c in n).split()])
        steps = sorted({s for pr in per_run for n in names for s in pr.get(g, {}).get(n, {})})
        tabs = [[table([list(pr.get(g, {}).get(n, {}).values()) for pr in per_run], key, steps)
                 for n in names]
                for key in ("llc_mean", "llc_se")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps that no run has for a name
            llc = np.array([np.nanmean(t, 0) for t in tabs[0]])
            se = np.array([np.sqrt(np.nansum(t ** 2, 0)) / np.isfinite(t).sum(0) for t in tabs[1]])
        out[g] = dict(names=names, steps=steps, llc=llc, se=np.where(np.isfinite(llc), se, np.nan))
    return out


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
