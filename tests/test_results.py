"""The committed reproduction (results/L2H4-s0-40k: our seed-0 run's first 40,292 steps, LLC from
configs/llc_cpu.py at all 80 checkpoints) against the paper's stored seed-mean curve: the claims the
README makes, checked on the committed files."""
import json
import math

import numpy as np
import pytest

import common
import llc
from analyze import STAGE_RULE
from conftest import ROOT
from analysis.stages import detect_stages

RESULTS = ROOT / "results" / "L2H4-s0-40k"


def load():
    rows = [json.loads(line) for line in (RESULTS / "llc.jsonl").read_text().splitlines()
            if line.strip()]
    ref = np.genfromtxt(ROOT / "reference" / "paper_v1_seedmean.csv", delimiter=",", names=True)
    return rows, {int(r["step"]): r for r in ref}


def test_the_curve_lies_in_the_papers_seed_band_at_nine_in_ten_checkpoints():
    """Inside: |ours - seed mean| <= 2 seed std + 2 of our standard errors (the README's band)."""
    rows, ref = load()
    # all of them
    assert (len({r["step"] for r in rows}) == len(rows) == 80
            and max(r["step"] for r in rows) == 40292)
    assert all(r["step"] in ref and r["llc_mean"] is not None for r in rows)
    inside = [abs(r["llc_mean"] - ref[r["step"]]["llc_mean"])
              <= 2 * ref[r["step"]]["llc_std"] + 2 * r["llc_se"]
              for r in rows]
    assert np.mean(inside) >= 0.9, [r["step"] for r, ok in zip(rows, inside) if not ok]


def test_the_committed_rows_are_the_presets():
    """Every committed row was made with configs/llc_cpu.py as it stands (the settings a resumed
    sweep checks)."""
    rows, _ = load()
    cfg = common.configure(llc.DEFAULTS, [str(ROOT / "configs" / "llc_cpu.py")])
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert all({k: r[k] for k in llc.RUN_KEYS} == {k: cfg[k] for k in llc.RUN_KEYS} for r in rows)


def test_the_first_transition_and_the_peak_region():
    """The committed stages.json is a record of the rule it was made with (summary.json's detector
    params: slope_frac 0.1, independent errors), which the current rule (analyze.STAGE_RULE: errors
    shared between checkpoints, slope_frac 0.2) replaced. Its claims: LR1 -> LR2 within a factor 1.5
    of 1k, a last boundary at or after 20k. Under the current rule the curve still has a significant
    dip of the slope within a factor 1.5 of 1k; it is not a boundary here because the rise to it is
    under min_change_frac of this 40k curve's range (the 500k run's range decides)."""
    rows, _ = load()
    stages = json.loads((RESULTS / "stages.json").read_text())
    summary = json.loads((RESULTS / "summary.json").read_text())
    assert summary["detector"]["params"]["slope_frac"] == 0.1 and stages["signal"] == "llc"
    assert summary["boundaries"] == stages["boundaries"]
    assert (1000 / 1.5 <= stages["boundaries"][0] <= 1000 * 1.5
            and stages["stages"][0]["type"] == "A")
    assert len(stages["boundaries"]) == 2 and stages["boundaries"][-1] >= 20_000
    det = detect_stages([r["step"] for r in rows], [r["llc_mean"] for r in rows],
                        [r["llc_se"] for r in rows], **STAGE_RULE)
    dips = [t["step"] for t in det["tests"] if t["significant"]]
    assert any(1000 / 1.5 <= s <= 1000 * 1.5 for s in dips), det["tests"]
    llc = np.array([r["llc_mean"] for r in rows])
    assert llc[-1] >= 0.97 * llc.max() and rows[int(np.argmax(llc))]["step"] >= 30_000


def test_the_preset_at_initialisation_matches_the_papers_five_seeds():
    """Our models at step 0 are the paper's (same init, seeds 0-4), so the preset's five step-0
    estimates should have the paper's seed mean and std up to our estimator's errors. The five share
    the sampler's random numbers, so their errors are correlated: the mean's error has sd at most
    the mean se (any correlation), and the std of five values moves by at most |errors| / 2 <=
    sqrt(sum se^2) / 2 at 1 sd; both asserted at 2 sd."""
    _, ref = load()
    rows = [json.loads(line) for line in (RESULTS / "init_seeds.jsonl").read_text().splitlines()
            if line.strip()]
    assert [r["model_seed"] for r in rows] == [0, 1, 2, 3, 4] and all(r["step"] == 0 for r in rows)
    v, se = np.array([r["llc_mean"] for r in rows]), np.array([r["llc_se"] for r in rows])
    assert abs(v.mean() - ref[0]["llc_mean"]) <= 2 * se.mean()
    assert abs(v.std(ddof=1) - ref[0]["llc_std"]) <= math.sqrt((se ** 2).sum())


def test_pairing_l_w_star_with_each_draw_at_step_0_of_the_five_seeds():
    """results/L2H4-s0-500k/step0_pairing.jsonl: configs/llc_cpu.py at step 0 of the paper's seeds
    0-4, L(w*) from its own 65,536-sequence set (as committed in L2H4-s0-40k) and paired with each
    draw's minibatch. Unpaired reproduces the committed values (to 0.01) and sits +1.22 above the
    paper's per-seed values on average; paired, each seed is within 2 se of the paper's and the mean
    difference is within the issue's +-0.6."""
    path = ROOT / "results" / "L2H4-s0-500k" / "step0_pairing.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    paper = np.genfromtxt(ROOT / "reference" / "paper_v1_perseed.csv", delimiter=",", names=True)
    at0 = {int(s): v for s, t, v in zip(paper["model_seed"], paper["step"], paper["llcmeanmean"])
           if t == 0}
    committed = [json.loads(line)["llc_mean"] for line in
                 (RESULTS / "init_seeds.jsonl").read_text().splitlines() if line.strip()]
    by = {(r["model_seed"], r["paired"]): r for r in rows}
    assert sorted(by) == [(s, p) for s in range(5) for p in (False, True)]
    # seeds 0, 2, 4 bit for bit; 1 and 3 to 0.0014 (their step-0 L(w*) differs in the 10th digit:
    # the committed init checkpoints were written by an earlier train.py), far below one se
    assert [by[s, False]["llc_mean"] for s in range(5)] == pytest.approx(committed, abs=0.01)
    diff = {p: np.array([by[s, p]["llc_mean"] - at0[s] for s in range(5)]) for p in (False, True)}
    se = np.array([by[s, True]["llc_se"] for s in range(5)])
    assert diff[False].mean() > 1.0  # the unpaired L(w*) set's error: the audit's +0.7 ... +1.7
    assert (np.abs(diff[True]) <= 2 * se).all(), diff[True] / se
    assert abs(diff[True].mean()) <= 0.6, diff[True]
    assert all(abs(by[s, True]["llc_drift_z"]) < 4 for s in range(5))


def test_the_preset_studys_rows_are_the_papers_sampler_and_near_its_seed_0():
    """results/L2H4-s0-500k/study.jsonl (rows as the study makes them): the paper's sampler (8
    chains x 5,000 steps from w*, no burn-in, paired), 100 trace bins per chain; the se no smaller
    than the chain means' spread; at step 0 within 2 se of the paper's seed-0 value."""
    path = ROOT / "results" / "L2H4-s0-500k" / "study.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    paper = np.genfromtxt(ROOT / "reference" / "paper_v1_perseed.csv", delimiter=",", names=True)
    seed0 = {int(t): v for s, t, v in zip(paper["model_seed"], paper["step"],
                                          paper["llcmeanmean"]) if s == 0}
    assert rows and len({r["step"] for r in rows}) == len(rows)
    for r in rows:
        assert (r["num_chains"], r["num_draws"], r["num_burnin"], r["paired"]) == (8, 5000, 0, True)
        assert (r["epsilon"], r["gamma"], r["nbeta"]) == pytest.approx((3e-4, 20 / 3, 200 / 3))
        assert np.array(r["llc_trace"]).shape == (8, 100) and not r["nan_chains"]
        assert r["llc_mean"] == pytest.approx(np.mean(r["llc_per_chain"]))
        assert r["llc_se"] >= np.std(r["llc_per_chain"], ddof=1) / math.sqrt(8) - 1e-12
    (r0,) = [r for r in rows if r["step"] == 0]
    assert abs(r0["llc_mean"] - seed0[0]) <= 2 * r0["llc_se"], (r0["llc_mean"], seed0[0])


RUN500 = ROOT / "results" / "L2H4-s0-500k"


def run500(name):
    return [json.loads(line) for line in (RUN500 / name).read_text().splitlines() if line.strip()]


def paper_per_seed():
    """{step: {seed: the paper's v1 LLC}} from the stored per-seed curves."""
    paper = np.genfromtxt(ROOT / "reference" / "paper_v1_perseed.csv", delimiter=",", names=True)
    out = {}
    for s, t, v in zip(paper["model_seed"], paper["step"], paper["llcmeanmean"]):
        out.setdefault(int(t), {})[int(s)] = float(v)
    return out


def chosen_preset(rows):
    """The rows are the preset choice.json names (study.py's candidates: draws, horizon) on the
    paper's sampler settings, 8 chains, paired."""
    chosen = json.loads((RUN500 / "choice.json").read_text())["chosen"]
    draws, horizon = (1500, 5000) if chosen == "extrap1500" else (None, None)
    for r in rows:
        assert (r["num_chains"], r["num_draws"], r["horizon"], r["paired"]) == (8, draws, horizon,
                                                                                True)
        assert (r["epsilon"], r["gamma"], r["nbeta"]) == pytest.approx((3e-4, 20 / 3, 200 / 3))
    return chosen


def test_the_500k_sweep_lies_in_the_papers_per_seed_range_with_an_honest_se():
    """results/L2H4-s0-500k/llc.jsonl, the sweep so far: the chosen preset at distinct checkpoints
    of the paper's schedule, each tagged with its checkpoint's SHA-256 prefix; >= 90 % inside the
    paper's five per-seed values' range +- 2 se; on the median row llc_se >= 0.9 x the chain means'
    sd / sqrt(chains)."""
    rows, paper = run500("llc.jsonl"), paper_per_seed()
    assert chosen_preset(rows) == "extrap1500" and len({r["step"] for r in rows}) == len(rows)
    assert all(r["step"] in paper and len(r["ckpt_sha256"]) == 16 for r in rows)
    inside = [min(paper[r["step"]].values()) - 2 * r["llc_se"] <= r["llc_mean"]
              <= max(paper[r["step"]].values()) + 2 * r["llc_se"] for r in rows]
    assert np.mean(inside) >= 0.9, [r["step"] for r, ok in zip(rows, inside) if not ok]
    ratio = [r["llc_se"] / (np.std(r["llc_per_chain"], ddof=1) / math.sqrt(8)) for r in rows]
    assert np.median(ratio) >= 0.9


def test_the_se_of_the_chosen_preset_covers_repeats_with_independent_sampler_seeds():
    """coverage.jsonl: the chosen preset repeated with sampler seeds 1-6 at one checkpoint (the same
    file: same ckpt_sha256). Pooled over the checkpoints, the repeats' variance about their mean is
    no more than the 97.5 % point of chi-square / dof (9 dof: 2.11) times the mean se^2, i.e. the
    stated se is not optimistic."""
    rows = run500("coverage.jsonl")
    chosen_preset(rows)
    groups = {}
    for r in rows:
        groups.setdefault((r["step"], r["ckpt_sha256"]), []).append(r)
    assert all(len({r["seed"] for r in g}) == len(g) >= 2 for g in groups.values())
    ss = sum(((v := np.array([r["llc_mean"] for r in g])) - v.mean()) @ (v - v.mean())
             for g in groups.values())
    dof = sum(len(g) - 1 for g in groups.values())
    se2 = np.mean([r["llc_se"] ** 2 for r in rows])
    assert dof == 9 and ss / dof <= 2.11 * se2, (ss / dof, se2)


def test_the_chosen_preset_at_step_0_of_the_five_seeds_owes_its_excess_to_the_extrapolation():
    """init_seeds.jsonl: the chosen preset (extrap1500) at step 0 of the paper's seeds 0-4 reads
    +0.90 above the paper's per-seed values on average, more than the issue's +-0.6; the preset
    study measured the extrapolation's own excess at step 0 over the same chains' 5,000 steps
    (choice.json, +0.54): without it the mean difference is within +-0.6, and each seed within
    2 se."""
    rows, paper = run500("init_seeds.jsonl"), paper_per_seed()[0]
    assert chosen_preset(rows) == "extrap1500"
    assert [r["model_seed"] for r in rows] == [0, 1, 2, 3, 4] and all(r["step"] == 0 for r in rows)
    diff = np.array([r["llc_mean"] - paper[r["model_seed"]] for r in rows])
    se = np.array([r["llc_se"] for r in rows])
    bias = json.loads((RUN500 / "choice.json").read_text())["candidates"]["extrap1500"]["diffs"][0]
    assert 0.6 < diff.mean() and abs(diff.mean() - bias) <= 0.6, (diff.mean(), bias)
    assert (np.abs(diff - bias) <= 2 * se).all(), (diff - bias) / se
