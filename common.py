"""What several scripts share: the config parser, atomic file writes, JSON lines, checkpoint I/O.

Each piece lives here once so train.py, llc.py and analyze.py agree on the on-disk formats:
  <out_dir>/config.json                                  the run's resolved config (flat dict)
  <out_dir>/log.jsonl, llc.jsonl, ...                    one flat JSON object per line, "step" first
  <out_dir>/checkpoints/step_{step:07d}.safetensors      model parameters only, named_parameters() names
  <out_dir>/checkpoints/step_{step:07d}.state.pt         optimiser state, for resuming training only
"""
import ast
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from data import Task
from model import ICLConfig, LMConfig, make_model


class ConfigError(ValueError):
    """A bad config file, key or value: raised before any work starts."""


class CheckpointError(RuntimeError):
    """A missing, truncated or corrupt checkpoint file."""


# ----------------------------------------------------------------------------------------- config
def configure(defaults: dict, argv) -> dict:
    """nanoGPT-style configuration: `script.py [config.py ...] [--key=value | --key value | --flag ...]`.

    A config file is plain Python assignments; later sources win. Every key must already exist in
    `defaults`, and values keep the default's type (an int is accepted where a float is expected). A bare
    `--flag` sets a boolean key to True; the value of a string key is taken verbatim (`--steps=5` stays "5").
    """
    cfg, args, i = dict(defaults), list(argv), 0
    while i < len(args):
        arg, i = args[i], i + 1
        if not arg.startswith("--"):
            for key, val in _read_config_file(arg).items():
                _set(cfg, defaults, key, val, f"config file {arg}")
            continue
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if isinstance(defaults.get(key), bool):
                raw = "True"
            elif i < len(args) and not args[i].startswith("--"):
                raw, i = args[i], i + 1
            else:
                raise ConfigError(f"expected --key=value or --key value, got {arg!r}")
        if isinstance(defaults.get(key), str):
            val = raw
        else:
            try:
                val = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                val = raw  # reported as a type error by _set
        _set(cfg, defaults, key, val, f"argument {arg}")
    return cfg


def _read_config_file(arg) -> dict:
    path = Path(arg)
    if not path.is_file():
        raise ConfigError(f"config file not found: {arg}")
    ns = {}
    try:
        exec(compile(path.read_text(), str(path), "exec"), ns)
    except Exception as e:
        raise ConfigError(f"config file {arg} failed to run: {e!r}") from e
    return {k: v for k, v in ns.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def _set(cfg, defaults, key, val, where):
    if key not in defaults:
        close = [k for k in defaults if k.startswith(key[:3])]
        raise ConfigError(f"unknown config key {key!r} in {where}" + (f" (did you mean {close}?)" if close else "")
                          + f"; valid keys: {sorted(defaults)}")
    want = type(defaults[key])
    if want is float and type(val) is int:
        val = float(val)
    if type(val) is not want:
        raise ConfigError(f"{key} must be {want.__name__}, got {type(val).__name__} {val!r} in {where}")
    cfg[key] = val


def derive_seed(*keys: int) -> int:
    """An independent 63-bit seed for a named random stream, e.g. (seed, rank, step): no overlap between streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ------------------------------------------------------------------------------------------ files
def atomic_write(path, data) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite(x):
    """NaN/inf -> None (also inside lists), so that rows are strict JSON."""
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not np.isfinite(x) else x


def append_jsonl(path, row: dict) -> None:
    """Append one JSON object as one line, fsynced. A torn last line (a kill mid-write) is cut off first."""
    path = Path(path)
    line = json.dumps(row, allow_nan=True) + "\n"
    with open(path, "ab+") as f:
        size = f.tell()
        if size > 0:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # rare: only then read the file to find the last complete line
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
                warnings.warn(f"{path}: dropped an incomplete last line")
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list:
    """All complete rows; a line that does not parse (a torn write) is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{i + 1}: skipping an incomplete line")
    return rows


# ------------------------------------------------------------------------------------ checkpoints
def ckpt_path(out_dir, step: int, state: bool = False) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}.{'state.pt' if state else 'safetensors'}"


def save_checkpoint(out_dir, step: int, model, state: dict | None = None) -> None:
    """Parameters as safetensors (exactly named_parameters); the resume state beside it, written first."""
    if state is not None:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(ckpt_path(out_dir, step, state=True), buf.getvalue())
    params = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}
    atomic_write(ckpt_path(out_dir, step), st_save(params, metadata={"step": str(step)}))


def list_checkpoints(out_dir) -> list:
    """Sorted steps that have a parameter file."""
    d = Path(out_dir) / "checkpoints"
    return sorted(int(p.name[5:12]) for p in d.glob("step_*.safetensors")) if d.is_dir() else []


def load_params(out_dir, step: int) -> dict:
    path = ckpt_path(out_dir, step)
    if not path.exists():
        raise CheckpointError(f"no checkpoint for step {step}: {path} does not exist")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({e}); delete it to fall back "
                              "to the previous one") from e


def load_state(out_dir, step: int) -> dict:
    path = ckpt_path(out_dir, step, state=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"resume state {path} is missing, truncated or corrupt ({e})") from e


def load_run(out_dir) -> dict:
    path = Path(out_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} is not a training run: {path} is missing")
    return json.loads(path.read_text())


def model_config(cfg: dict):
    """ICLConfig for a regression run, LMConfig for a language-model run (cfg["task"] == "lm")."""
    kind = LMConfig if cfg.get("task", "regression") == "lm" else ICLConfig
    return kind(**{k: cfg[k] for k in kind.__dataclass_fields__ if k in cfg})


def run_task(cfg):
    """The data distribution a run was trained on (cfg: a config dict or a run directory): a data.Task, or for
    task = "lm" an lm_data.LMTask (same interface: sample, model_input, loss, eval_data, metrics)."""
    cfg = cfg if isinstance(cfg, dict) else load_run(cfg)
    if cfg.get("task", "regression") == "lm":
        import lm_data  # imports this module: imported here, not at the top
        return lm_data.LMTask(lm_data.data_dir_for(cfg), cfg["n_ctx"], cfg["vocab_size"])
    return Task(cfg["D"], cfg["K"], cfg["sigma2"], cfg["num_tasks"], cfg["task_seed"])


def load_model(out_dir, step: int):
    """The run's model with the parameters of checkpoint `step`, on CPU, in eval mode."""
    model = make_model(model_config(load_run(out_dir)))
    params = load_params(out_dir, step)
    missing = set(dict(model.named_parameters())) ^ set(params)
    if missing:
        raise CheckpointError(f"{ckpt_path(out_dir, step)} does not match the run's model: {sorted(missing)}")
    model.load_state_dict(params, strict=False)  # strict=False only because buffers are not saved
    return model.eval()


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tune_malloc():
    """glibc only: keep freed blocks of up to 32 MB in the heap instead of unmapping them at every free, so large
    CPU tensors are not page-faulted in again at every step (measured ~7% faster SGLD on CPU at batch 1024). Peak
    memory is unchanged; memory is returned to the OS at exit. Called by the command line, not by the library.
    Returns the equivalent environment variables (for subprocesses)."""
    env = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
           "MALLOC_TOP_PAD_": str(64 << 20)}
    libc = _libc()
    if libc is not None:
        for opt, key in ((-3, "MALLOC_MMAP_THRESHOLD_"), (-1, "MALLOC_TRIM_THRESHOLD_"), (-2, "MALLOC_TOP_PAD_")):
            libc.mallopt(opt, int(env[key]))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
    return env


def _libc():
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_memory():
    """Give the heap's free memory back to the OS (glibc malloc_trim): called between checkpoints, so that with
    tune_malloc's settings a long sweep's memory does not creep up through fragmentation."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


