"""The preset study and sweep of results/L2H4-s0-500k (PRESET_RULE.md) in one process: the
candidates at checkpoints in all five stages, the fixed choice rule, step 0 of the paper's five
seeds, repeated sampler seeds for the standard error's coverage, then every checkpoint with the
chosen preset. Rows are appended as they come to <dest>/study.jsonl, init_seeds.jsonl,
coverage.jsonl and llc.jsonl (resumable); a part that would not fit in --budget seconds is skipped.

    python results/L2H4-s0-500k/study.py --run=out/L2H4-s0 --inits=out/init-s \
        --dest=results/L2H4-s0-500k
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import data  # noqa: E402
import llc  # noqa: E402

# the paper's sampler
V1 = dict(epsilon=3e-4, gamma=20 / 3, nbeta=200 / 3, num_burnin=0, num_draws=5000)
BASE = dict(V1, chain_mode="auto", num_chains=8, batch_size=128, data_mode="stream", paired=True,
            seed=0, n=65536, trace_points=100)
BIN = 50  # steps per trace bin (5,000 draws in 100 bins)
CANDIDATES = {f"mean{h}": (h, 0) for h in (500, 1000, 1500, 2500)}  # name: (steps run, horizon)
CANDIDATES.update({f"extrap{h}": (h, 5000) for h in (1000, 1500, 2500)})
STUDY_STEPS = (0, 507, 1124, 3247, 9375, 27072, 59968, 121212, 202020)
TOLERANCE = 1.0  # LLC, beside 2 se of the difference to the full 5,000-step value (PRESET_RULE.md)
PAPER = Path(__file__).resolve().parents[2] / "reference" / "paper_v1_perseed.csv"


def paper_values():
    """{step: the five seeds' stored v1 LLCs (seed order)}."""
    ref = np.genfromtxt(PAPER, delimiter=",", names=True)
    return {int(s): ref["llcmeanmean"][ref["step"] == s][
                np.argsort(ref["model_seed"][ref["step"] == s])]
            for s in np.unique(ref["step"])}


def candidate_values(row, steps, horizon):
    """Each chain's estimate had it run only `steps` steps (the first bins of the same chains),
    extrapolated to `horizon` as sgld.extrapolate does."""
    x = np.array(row["llc_trace"], dtype=float)[:, :steps // BIN]  # (chains, bins)
    plain = x.mean(1)
    if horizon <= steps:
        return plain
    return (steps * plain + (horizon - steps) * x[:, x.shape[1] // 2:].mean(1)) / horizon


def choose(rows):
    """PRESET_RULE.md: the cheapest candidate within 2 se + TOLERANCE of the full 5,000-step value
    of the same chains at all but one study checkpoint, with no diverged chain; else the full 5,000
    steps."""
    score = {}
    for name, (steps, horizon) in CANDIDATES.items():
        diffs = []
        for r in rows:
            d = candidate_values(r, steps, horizon) - candidate_values(r, 5000, 0)
            diffs.append((float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))))
        inside = sum(abs(m) <= 2 * se + TOLERANCE for m, se in diffs)
        ok = inside >= len(rows) - 1 and not any(r["nan_chains"] for r in rows)
        score[name] = dict(passes=bool(ok), inside=int(inside), of=len(rows), cost=steps,
                           diffs=[round(m, 3) for m, _ in diffs],
                           diff_se=[round(se, 3) for _, se in diffs])
    passing = [n for n, s in score.items() if s["passes"]]
    return (min(passing, key=lambda n: score[n]["cost"]) if passing else "full5000"), score


class Study:
    def __init__(self, args):
        # rate: seconds per (step x row x sequence)
        self.args, self.t0, self.rate = args, time.time(), None
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.tf32:  # bench.py on an H200: the same LLC to 0.01 se, 2.1x the chain-steps/s
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def cfg(self, name, **over):
        """llc.py's settings of a candidate ("full5000": the paper's 5,000 steps)."""
        steps, horizon = CANDIDATES.get(name, (5000, 0))
        c = {**llc.DEFAULTS, **BASE, "num_draws": steps, "horizon": horizon, **over}
        if self.args.dry:
            c.update(num_draws=min(c["num_draws"], 200), num_chains=2, n=256,
                     horizon=min(c["horizon"], 400))
        return c

    def fits(self, cfg, k, what):
        """Whether k checkpoints of these settings fit in the budget left (after one measured call).
        """
        need = 0 if self.rate is None else (self.rate * cfg["num_draws"] * k * cfg["num_chains"]
                                            * cfg["batch_size"])
        left = self.args.budget - (time.time() - self.t0)
        if need > left:
            print(f"study: skipping {what}: needs ~{need:.0f}s, {left:.0f}s left", flush=True)
        return need <= left

    def estimate(self, run_dir, cfg, steps, models=None):
        """Rows of `steps` (or of `models`) estimated together (on CUDA: vmap, bench.py's fastest
        mode there)."""
        over = dict(chain_mode="vmap") if self.device.type == "cuda" else {}
        res = llc.Run(run_dir, {**cfg, **over}, self.device).estimate(
            steps, models=models, progress=f"study: step(s) {steps}")
        self.rate = res[0]["sample_time"] / (
            cfg["num_draws"] * len(res) * cfg["num_chains"] * cfg["batch_size"])
        keys = [k for k in llc.RUN_KEYS] + ["paired", "horizon"]
        return [{**{k: cfg[k] for k in keys}, **llc.llc_row(s, r, cfg["trace_points"]),
                 "tf32": bool(self.args.tf32), "ckpt_sha256": None if models else sha(run_dir, s)}
                for s, r in zip(steps, res)]

    def write(self, name, rows, **extra):
        for r in rows:
            common.append_jsonl(os.path.join(self.args.dest, name), {**extra, **r})
            print(f"study: {name} {extra} step {r['step']}: {r['llc_mean']} +- {r['llc_se']} "
                  f"(drift z {r['llc_drift_z']}) [{time.time() - self.t0:.0f}s]", flush=True)


def sha(run_dir, step):
    """The first 16 hex digits of a checkpoint file's SHA-256: training is not bit-identical across
    machines, so rows of the same step from two trainings (two sessions) are told apart."""
    return hashlib.sha256(Path(common.ckpt_path(run_dir, step)).read_bytes()).hexdigest()[:16]


def snap(have, step):
    return min(have, key=lambda h: abs(h - step))


def candidates(st, steps, lr5):
    """Part 1: the paper's 5,000 steps at the study checkpoints (kept if already in study.jsonl);
    every candidate is read off the same chains' traces; the rule picks one."""
    path = os.path.join(st.args.dest, "study.jsonl")
    todo = [s for s in steps if s not in {r["step"] for r in common.read_jsonl(path)}]
    cfg = st.cfg("full5000", **({"num_draws": 400} if st.args.dry else {}))
    for i in range(0, len(todo), st.args.ckpt_batch):  # a row is kept as soon as it is done
        group = todo[i:i + st.args.ckpt_batch]
        if not st.fits(cfg, len(group), f"the study at {group}"):
            break
        st.write("study.jsonl", st.estimate(st.args.run, cfg, group))
    rows = common.read_jsonl(path)
    final = st.args.dry or (lr5 and set(steps) <= {r["step"] for r in rows})
    pick, score = choose(rows) if not st.args.dry else ("mean500", {})
    paper = paper_values()
    band = {r["step"]: [round(float(v), 2) for v in paper[r["step"]]] for r in rows
            if r["step"] in paper}
    if final:  # every study checkpoint, one in LR5, has its row: the rule's choice stands
        common.atomic_write(os.path.join(st.args.dest, "choice.json"),
                            json.dumps(dict(chosen=pick, candidates=score, paper_per_seed=band),
                                       indent=1))
    print(f"study: {'chosen' if final else 'so far'} {pick}: {json.dumps(score)}", flush=True)
    return pick


def seeds_and_coverage(st, pick, have):
    """Parts 2 and 3: step 0 of the paper's five seeds; repeated sampler seeds at two checkpoints.
    """
    cfg, dest = st.cfg(pick), st.args.dest
    done = [r for r in common.read_jsonl(os.path.join(dest, "init_seeds.jsonl"))
            if r["candidate"] == pick]
    if not done and st.fits(cfg, 5, "step 0 of five seeds"):
        models = [data.load_model(f"{st.args.inits}{s}", 0).to(st.device) for s in range(5)]
        for s, r in enumerate(st.estimate(f"{st.args.inits}0", cfg, [0] * 5, models)):
            st.write("init_seeds.jsonl", [r], model_seed=s, candidate=pick)
    steps, path = [snap(have, 1124), snap(have, 59968)], os.path.join(dest, "coverage.jsonl")
    for seed in range(1, st.args.cover_seeds + 1):
        if seed not in {r["seed"] for r in common.read_jsonl(path) if r["candidate"] == pick}:
            if not st.fits(cfg, len(steps), f"coverage seed {seed}"):
                break
            st.write("coverage.jsonl", st.estimate(st.args.run, {**cfg, "seed": seed}, steps),
                     candidate=pick)


def sweep(st, pick, have):
    """Part 4: every checkpoint with the chosen preset, ckpt_batch at a time, in step order."""
    cfg, path = st.cfg(pick), os.path.join(st.args.dest, "llc.jsonl")
    done = {r["step"] for r in common.read_jsonl(path)}
    todo = coarse_first(have, done)[:2 if st.args.dry else None]
    for i in range(0, len(todo), st.args.ckpt_batch):
        group = todo[i:i + st.args.ckpt_batch]
        if not st.fits(cfg, len(group),
                       f"the sweep from step {group[0]} on ({len(todo) - i} left)"):
            return
        st.write("llc.jsonl", st.estimate(st.args.run, cfg, group))


def coarse_first(have, done):
    """The checkpoints not yet done, each next one the farthest (in checkpoint index) from those
    done or ordered before it: a session cut short leaves an even coarse curve, not a prefix."""
    taken = [i for i, s in enumerate(have) if s in done]
    left, order = [i for i, s in enumerate(have) if s not in done], []
    while left:
        far = max(left, key=lambda i: min((abs(i - j) for j in taken), default=len(have) - i))
        left.remove(far)
        taken.append(far)
        order.append(have[far])
    return order


def report(path):
    """--report=FILE: the rule applied to rows of the paper's 5,000 steps in FILE, with each row's
    place in the paper's per-seed range; printed as JSON."""
    rows, paper = [r for r in common.read_jsonl(path) if r.get("llc_trace")], paper_values()
    pick, score = choose(rows)
    band = [dict(step=r["step"], llc=round(r["llc_mean"], 2), se=round(r["llc_se"], 2),
                 paper_seed0=round(float(paper[r["step"]][0]), 2),
                 paper_range=[round(float(paper[r["step"]].min()), 2),
                              round(float(paper[r["step"]].max()), 2)],
                 drift=r["llc_drift"], drift_z=r["llc_drift_z"]) for r in rows]
    print(json.dumps(dict(chosen=pick, candidates=score, rows=band), indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="out/L2H4-s0")
    ap.add_argument("--inits", default="out/init-s",
                    help="run folders <inits>0 ... <inits>4 (step 0 of seeds 0-4)")
    ap.add_argument("--dest", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--device", default="")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for everything")
    ap.add_argument("--ckpt_batch", type=int, default=16)
    ap.add_argument("--cover_seeds", type=int, default=6)
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls on CUDA")
    ap.add_argument("--parts", default="study,seeds,sweep",
                    help="after the study: seeds (step 0, coverage), sweep")
    ap.add_argument("--dry", action="store_true", help="tiny settings: checks the code paths")
    ap.add_argument("--report", default="",
                    help="only apply the rule to the 5,000-step rows in this file")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    os.makedirs(args.dest, exist_ok=True)
    st, have = Study(args), common.list_checkpoints(args.run)
    # not yet trained: later
    near = [snap(have, s) for s in STUDY_STEPS if abs(snap(have, s) - s) <= 0.05 * s]
    steps = sorted(set(near) | ({have[-1]} if have[-1] >= 320_000 else set()))
    print(f"study: {len(have)} checkpoints up to {have[-1]}; study steps {steps}; {st.device}",
          flush=True)
    choice = os.path.join(args.dest, "choice.json")
    if os.path.exists(choice) and not args.dry:  # the rule has chosen: later checkpoints in LR5
        pick, steps = json.load(open(choice))["chosen"], []  # do not reopen the choice
    else:
        pick = candidates(st, steps[:2] if args.dry else steps, have[-1] >= 320_000)
    done = {r["step"] for r in common.read_jsonl(os.path.join(args.dest, "study.jsonl"))}
    if not args.dry and not os.path.exists(choice) and (have[-1] < 320_000
                                                          or not set(steps) <= done):
        return print("study: the study is not complete (it needs a checkpoint in LR5, >= 320,000); "
                     "the rule's choice above is provisional: run again later", flush=True)
    if "seeds" in args.parts:
        seeds_and_coverage(st, pick, have)
    if "sweep" in args.parts:
        sweep(st, pick, have)
    print(f"study: done in {time.time() - st.t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
