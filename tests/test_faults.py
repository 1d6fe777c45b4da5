"""Red-team cases: bad input, corrupt or mismatched files, two writers, OS errors and Ctrl-C each
end in one line on stderr (exit 2 for usage and input, 1 for the environment, 130 for Ctrl-C), no
traceback, and every file that existed before is byte-identical afterwards."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--max_steps=20", "--n_log=3", "--n_lin=3", "--log_interval=5", "--device=cpu"]
QUICK = ["--num_chains=2", "--num_draws=4", "--num_burnin=0", "--batch_size=8", "--n=64",
         "--device=cpu"]


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=ENV, timeout=600)


def snapshot(folder):
    """{relative path: sha256} of every file under folder (lock files aside: they hold a pid)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def one_line(r, code, *words):
    """Exit `code`, no traceback, and a last stderr line that names the script and the words."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(Path(r.args[1]).name + ":"), last
    for w in words:
        assert w in last, (w, last)
    return last


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 20-step run stopped after step 10 (checkpoints 0, 1, 4, 10) with optimizer states: the
    same command without --stop_at resumes it."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert run("train.py", *TINY, "--stop_at=10", f"--out_dir={out}").returncode == 0
    return out


@pytest.fixture
def copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


# ------------------------------------------------------------------------------------- train.py
@pytest.mark.parametrize("opt", ["--lr=-1e-3", "--batch_size=0", "--batch_size=-5",
                                 "--max_steps=0", "--log_interval=0", "--n_head=3", "--K=0",
                                 "--device=gpu", "--no_such_option=1", "--lr=fast"])
def test_train_bad_values_write_nothing(copy, opt):
    before = snapshot(copy)
    one_line(run("train.py", *TINY, opt, f"--out_dir={copy}"), 2, opt.split("=")[0])
    assert snapshot(copy) == before
    fresh = copy.parent / "fresh"
    one_line(run("train.py", *TINY, opt, f"--out_dir={fresh}"), 2)
    assert not fresh.exists()


def test_train_after_a_bad_value_the_corrected_command_runs(tmp_path):
    one_line(run("train.py", *TINY, "--stop_at=1", "--lr=-1", f"--out_dir={tmp_path}/r"), 2, "--lr")
    r = run("train.py", *TINY, "--stop_at=1", f"--out_dir={tmp_path}/r")
    assert r.returncode == 0, r.stderr[-2000:]


def test_train_a_diverging_lr_stops_with_strict_json_logs(tmp_path):
    one_line(run("train.py", *TINY, "--lr=1e6", f"--out_dir={tmp_path}/nan"), 2, "diverged")
    for line in (tmp_path / "nan" / "log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c} in log.jsonl"))


def test_train_stop_at_off_the_grid_is_saved(tmp_path):
    assert run("train.py", *TINY, "--stop_at=7", f"--out_dir={tmp_path}/r").returncode == 0
    assert (tmp_path / "r" / "checkpoints" / "step_0000007.safetensors").exists()


def test_train_a_run_copied_without_optimizer_states_is_not_started_over(copy):
    for p in copy.glob("checkpoints/*.state.pt"):
        p.unlink()
    before = snapshot(copy)
    r = run("train.py", *TINY, f"--out_dir={copy}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert snapshot(copy) == before


def test_train_a_checkpoint_missing_a_tensor_is_refused(copy):
    _drop_tensor(copy / "checkpoints" / "step_0000010.safetensors")
    before = snapshot(copy)
    one_line(run("train.py", *TINY, f"--out_dir={copy}"), 2, "step_0000010")
    assert snapshot(copy) == before


def test_train_resume_recognises_the_run_under_another_spelling(tmp_path):
    out = tmp_path / "r"
    assert run("train.py", *TINY, "--stop_at=4", f"--out_dir={out}").returncode == 0
    r = run("train.py", *TINY, "--out_dir=./r/", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr and (out / "checkpoints" / "step_0000019.safetensors").exists()


def test_train_files_are_readable_by_the_group(trained):
    for p in [trained / "config.json", trained / "log.jsonl",
              *trained.glob("checkpoints/*.safetensors")]:
        assert p.stat().st_mode & 0o044 == 0o044, (p, oct(p.stat().st_mode))


def test_train_an_os_error_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    one_line(run("train.py", *TINY, f"--out_dir={tmp_path}/file/run"), 1, "Not a directory")


def _start(script, *args):
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not Path(path).exists():
        assert proc.poll() is None and time.time() - t0 < timeout, proc.communicate()
        time.sleep(0.1)


def test_train_a_second_writer_is_refused_and_ctrl_c_is_one_line(tmp_path):
    out = tmp_path / "r"
    first = _start("train.py", "--max_steps=100000", "--n_log=3", "--n_lin=3", "--device=cpu",
                   f"--out_dir={out}")
    try:
        _wait_for(out / "checkpoints" / "step_0000001.safetensors", first)
        one_line(run("train.py", "--max_steps=100000", "--n_log=3", "--n_lin=3", "--device=cpu",
                     f"--out_dir={out}"), 2, "being written")
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    rows = (out / "log.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in rows)


# --------------------------------------------------------------------------------------- llc.py
@pytest.mark.parametrize("opt", ["--num_chains=0", "--num_draws=-5", "--epsilon=-1e-3",
                                 "--threads=-1", "--include=nomatch.**", "--n=0",
                                 "--ckpt_batch=0", "--trace_points=0", "--follow=-1",
                                 "--steps=3", "--steps=ten"])
def test_llc_bad_values_are_one_line_before_anything_is_written(copy, opt):
    before = snapshot(copy)
    one_line(run("llc.py", copy, *QUICK, opt), 2, opt.split("=")[0].split(".")[0])
    assert snapshot(copy) == before


def test_llc_a_fixed_batch_larger_than_the_fixed_set_is_a_usage_error(copy):
    before = snapshot(copy)
    one_line(run("llc.py", copy, *QUICK, "--data_mode=fixed", "--batch_size=100"), 2, "batch_size")
    assert snapshot(copy) == before


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _nan_weights(path):
    tensors = load_file(path)
    name = next(iter(tensors))
    save_file({**tensors, name: torch.full_like(tensors[name], float("nan"))}, path)


def _drop_tensor(path):
    tensors = load_file(path)
    save_file(dict(list(tensors.items())[1:]), path)


def test_debug_keeps_the_traceback(copy):
    _truncate(copy / "checkpoints" / "step_0000010.safetensors")
    r = subprocess.run([sys.executable, str(ROOT / "llc.py"), str(copy), *QUICK, "--steps=10"],
                       cwd=ROOT, capture_output=True, text=True, env={**ENV, "DEBUG": "1"},
                       timeout=600)
    assert r.returncode == 1 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


@pytest.mark.parametrize("spoil", [_truncate, _nan_weights, _drop_tensor])
def test_llc_a_bad_checkpoint_is_one_line_naming_it(copy, spoil):
    spoil(copy / "checkpoints" / "step_0000010.safetensors")
    before = snapshot(copy)
    one_line(run("llc.py", copy, *QUICK, "--steps=10"), 2, "step_0000010")
    assert snapshot(copy) == before


@pytest.mark.parametrize("text", ['{"seed": 0, "task": "regr', "[1, 2]"])
def test_llc_a_torn_or_foreign_config_json_is_one_line(copy, text):
    (copy / "config.json").write_text(text)
    before = snapshot(copy)
    one_line(run("llc.py", copy, *QUICK, "--steps=10"), 2, "config.json")
    assert snapshot(copy) == before


@pytest.mark.parametrize("row", ["null", '{"llc_mean": 3.0}', "[1]"])
def test_llc_rows_without_a_step_are_one_line_naming_the_file(copy, row):
    (copy / "llc.jsonl").write_text(row + "\n")
    before = snapshot(copy)
    one_line(run("llc.py", copy, *QUICK, "--steps=10"), 2, "llc.jsonl")
    assert snapshot(copy) == before


def test_llc_repeated_steps_are_estimated_once_and_n_is_recorded(copy):
    r = run("llc.py", copy, *QUICK, "--steps=10,10")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (copy / "llc.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [10] and rows[0]["n"] == 64


def test_llc_a_second_writer_of_the_same_file_is_refused(copy):
    sys.path.insert(0, str(ROOT))
    import common
    lock = common.lock_dir(copy, "llc.jsonl")
    try:
        before = snapshot(copy)
        one_line(run("llc.py", copy, *QUICK, "--steps=10"), 2, "being written")
        assert snapshot(copy) == before
        r = run("llc.py", copy, *QUICK, "--steps=10", "--out=other.jsonl")
        assert r.returncode == 0, r.stderr[-2000:]  # another output file of the same run: allowed
    finally:
        lock.close()


def test_llc_an_unwritable_output_fails_before_any_estimate(copy):
    (copy / "llc.jsonl").mkdir()
    last = one_line(run("llc.py", copy, *QUICK, "--steps=10"), 1, "llc.jsonl")
    assert "directory" in last.lower()


# ----------------------------------------------------------------------------------- analyze.py
@pytest.mark.parametrize("opt", ["--alpha=2", "--alpha=0", "--slope_frac=-1", "--eval_size=0",
                                 "--threads=-1", "--head_clusters=1"])
def test_analyze_bad_values_are_one_line_before_anything_is_written(copy, opt):
    before = snapshot(copy)
    one_line(run("analyze.py", copy, opt), 2, opt.split("=")[0])
    assert snapshot(copy) == before


# ------------------------------------------------------------------------------------------ lm/hub
from test_lm import _put, hub  # noqa: E402,F401  the loopback hub and its CDN
from lm import hub as lm_hub  # noqa: E402


def _outside(root, cache, before):
    return [p for p in set(root.rglob("*")) - before if p != cache and cache not in p.parents]


def test_a_hostile_commit_header_writes_nothing_outside_the_cache(hub, tmp_path, monkeypatch):
    H, url, cache = hub
    _put(H, "o/L2", "losses.txt", b"1 2 3\n")
    monkeypatch.setattr(H, "commit", "../../../escaped")
    before = set(tmp_path.rglob("*"))
    with pytest.raises(lm_hub.HubError, match="X-Repo-Commit"):
        lm_hub.hub_download("o/L2", "losses.txt", base_url=url, cache_dir=cache, retries=0)
    assert not _outside(tmp_path, cache, before)


def test_a_hostile_etag_names_a_blob_inside_the_cache(hub, tmp_path, monkeypatch):
    H, url, cache = hub
    _put(H, "o/L2", "losses.txt", b"1 2 3\n")
    send = H.send_header
    monkeypatch.setattr(H, "send_header", lambda self, k, v: send(
        self, k, '"../../../evil"' if k in ("X-Linked-Etag", "ETag") else v))
    before = set(tmp_path.rglob("*"))
    got = lm_hub.hub_download("o/L2", "losses.txt", base_url=url, cache_dir=cache, retries=0)
    assert got.read_bytes() == b"1 2 3\n" and cache in got.parents
    assert not _outside(tmp_path, cache, before)
    assert all(cache in p.resolve().parents for p in cache.rglob("*"))


# ------------------------------------------------------------------------- a full disk, all three
def _file_size_limit(nbytes):
    """A child whose writes past nbytes fail with EFBIG, as on a full disk (Python ignores
    SIGXFSZ)."""
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


@pytest.mark.parametrize("script,args", [("train.py", TINY), ("llc.py", [*QUICK, "--steps=10"]),
                                         ("analyze.py", ["--hessian_probes=0", "--lanczos_iters=0",
                                                         "--eval_size=64", "--ed_batch=64"])])
def test_a_failed_write_is_one_line_and_keeps_every_file(copy, script, args):
    before = snapshot(copy)
    argv = [f"--out_dir={copy}"] if script == "train.py" else [copy]
    r = subprocess.run([sys.executable, str(ROOT / script), *argv, *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, env=ENV, timeout=600,
                       preexec_fn=_file_size_limit(512))
    one_line(r, 1, "file-size limit")
    after = snapshot(copy)
    assert {k: after[k] for k in before if k != "log.jsonl"} == {k: v for k, v in before.items()
                                                                 if k != "log.jsonl"}
    rows = [json.loads(line) for p in copy.glob("*.jsonl") for line in p.read_text().splitlines()]
    assert all(isinstance(row, dict) for row in rows)  # strict JSON rows, no torn line


def test_importing_a_corrupt_checkpoint_names_it(tmp_path):
    from lm import data as lm_data
    src = tmp_path / "src" / "checkpoints"
    src.mkdir(parents=True)
    (src / "checkpoint_0000000.pth").write_bytes(b"\x80\x04not a pickle at all")
    cfg = dict(task="lm", vocab_size=50, n_ctx=8, n_layer=1, n_head=2, d_model=8)
    sys.path.insert(0, str(ROOT))
    import common
    with pytest.raises(common.CheckpointError, match="checkpoint_0000000.pth is not a readable"):
        lm_data.import_checkpoints(str(tmp_path / "src"), [0], tmp_path / "run", cfg)
    assert not common.list_checkpoints(tmp_path / "run")
