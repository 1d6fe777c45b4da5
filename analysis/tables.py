"""A run's rows as arrays: llc.jsonl and the refined llc_*.jsonl read into tables over steps
(several runs: a row each; their mean where curves are combined)."""
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

