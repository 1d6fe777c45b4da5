"""Stage detection on the paper's own curves, through `analyze.py --curve`: the paper's four
regression boundaries (about 1k, 40k, 126k, 320k) on each of its five per-seed v1 LLC curves, and
bad curve files."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

import analyze
from conftest import ROOT

PAPER = (1_000, 40_000, 126_000, 320_000)  # the LR1/LR2, LR2/LR3, LR3/LR4, LR4/LR5 boundaries
FACTOR = 1.6  # the acceptance band: each boundary within a factor 1.6 of the paper's


def paper_seed_curve(seed, path):
    """The paper's per-seed v1 curve (reference/paper_v1_perseed.csv) as a --curve file with the
    paper's own column name."""
    with open(ROOT / "reference" / "paper_v1_perseed.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["model_seed"]) == seed]
    path.write_text("step,llc/mean/mean\n"
                    + "".join(f"{r['step']},{r['llc/mean/mean']}\n" for r in rows))
    return len(rows)


def run_curve(capsys, path):
    analyze.main([f"--curve={path}"])
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1  # one JSON object, nothing else on stdout
    return json.loads(out)


@pytest.mark.parametrize("seed", range(5))
def test_the_papers_four_boundaries_on_each_of_its_seed_curves(seed, tmp_path, capsys):
    """All 190 checkpoints of the paper's seed; four boundaries, each within FACTOR of the paper's,
    stages typed A (LR1, LR2 rise) then B (LR3, LR4 fall)."""
    path = tmp_path / f"seed{seed}.csv"
    assert paper_seed_curve(seed, path) == 190
    got = run_curve(capsys, path)
    found = got["boundaries"]
    assert len(found) == 4, found
    assert all(t / FACTOR <= b <= t * FACTOR for b, t in zip(found, PAPER)), found
    assert [s["type"] for s in got["stages"][:4]] == ["A", "A", "B", "B"], got["stages"]
    assert [s["name"] for s in got["stages"]] == ["LR1", "LR2", "LR3", "LR4", "LR5"]


def test_a_curve_with_standard_errors(tmp_path, capsys):
    """A devinterp-style file (step, llc_mean, llc_se): the seed mean with its se; same four stages.
    """
    ref = np.genfromtxt(ROOT / "reference" / "paper_v1_seedmean.csv", delimiter=",", names=True)
    path = tmp_path / "mean.csv"
    path.write_text("step,llc_mean,llc_se\n" + "".join(
        f"{int(s)},{m},{sd / 5 ** 0.5}\n" for s, m, sd in zip(ref["step"], ref["llc_mean"],
                                                              ref["llc_std"])))
    found = run_curve(capsys, path)["boundaries"]
    assert len(found) == 4 and all(t / FACTOR <= b <= t * FACTOR for b, t in zip(found, PAPER))


@pytest.mark.parametrize("text, says", [
    ("step,loss\n0,1\n1,2\n", "no column 'llc_mean'"),
    ("step,llc_mean\n0,1\n0,2\n", "distinct"),
    ("step,llc_mean\n0,1\n1,abc\n", "not a number"),
    ("step,llc_mean\n0,1\n", "at least two rows"),
])
def test_a_bad_curve_file_is_one_line_and_exit_2(tmp_path, text, says):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    r = subprocess.run([sys.executable, str(ROOT / "analyze.py"), f"--curve={path}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r
    assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]  # nothing written
