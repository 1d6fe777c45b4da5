"""What the scripts share, nothing project-specific: the command line, atomic files, JSON lines,
checkpoint files (<run>/checkpoints/step_{step:07d}.safetensors, .state.pt for resuming), progress
lines with ETA. Its one project import is sgld, which defines the helpers the estimator needs too
(seeds, parameter globs, progress lines), so that sgld.py can be copied alone."""
import ast
import contextlib
import difflib
import errno
import fcntl
import functools
import io
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

# defined once, in sgld.py (which must stay copyable alone)
from sgld import Progress, derive_seed, fmt_time, select_params  # noqa: F401


class ConfigError(ValueError):
    """A bad config file, key or value: raised before any work starts."""


class CheckpointError(RuntimeError):
    """A missing, truncated or corrupt checkpoint file."""


class RunError(RuntimeError):
    """A run that cannot go on until its user acts (it diverged, another process writes its
    folder): one line and exit code 2, like a usage error, but found after work started."""


# ------------------------------------------------------------------------------- the command line
def configure(defaults: dict, argv, choices=None, positional=False):
    """nanoGPT-style `[config.py ...] [--key=value | --key value | --flag ...]`, later sources win:
    keys must exist in `defaults`, values keep the default's type (an int is taken for a float),
    `choices` lists allowed values; a bare argument not ending in .py is a positional (returned with
    the config) if `positional`, else an error."""
    cfg, args, rest, i = dict(defaults), list(argv), [], 0
    while i < len(args):
        arg, i = args[i], i + 1
        if not arg.startswith("--"):
            if arg.endswith(".py"):
                for key, val in read_config_file(arg).items():
                    _set(cfg, defaults, key, val, f"config file {arg}")
            elif positional:
                rest.append(arg)
            else:
                raise ConfigError(f"unexpected argument {arg!r} (config files end in .py; options "
                                  "are --key=value)")
            continue
        key, sep, raw = arg[2:].partition("=")
        if key not in defaults:
            # an unknown option: raises, naming the closest ones
            _set(cfg, defaults, key, None, f"argument {arg}")
        if not sep:
            if isinstance(defaults.get(key), bool):
                raw = "True"
            elif i < len(args) and not args[i].startswith("--"):
                raw, i = args[i], i + 1
            else:
                raise ConfigError(f"expected --key=value or --key value, got {arg!r}")
        try:
            val = raw if isinstance(defaults.get(key), str) else ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            val = raw  # reported as a type error by _set
        _set(cfg, defaults, key, val, f"argument {arg}")
    for key, allowed in (choices or {}).items():
        if cfg[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got "
                              f"{cfg[key]!r}")
    return (cfg, rest) if positional else cfg


def read_config_file(path) -> dict:
    """The assignments of a plain-Python config file (names starting with _ , functions and modules
    left out)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    ns = {"__file__": str(path)}
    try:
        exec(compile(path.read_text(), str(path), "exec"), ns)
    except Exception as e:
        raise ConfigError(f"config file {path} failed to run: {e!r}") from e
    return {k: v for k, v in ns.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def _set(cfg, defaults, key, val, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see --help"
        raise ConfigError(f"unknown option {key!r} in {where}{hint}")
    want = type(defaults[key])
    if want is float and type(val) is int:
        val = float(val)
    if type(val) is not want:
        raise ConfigError(f"{key} must be {want.__name__}, got {type(val).__name__} {val!r} in "
                          f"{where}")
    cfg[key] = val


def option_help(defaults: dict, *sources) -> str:
    """One line per option: --key=default and the comment written beside its default in the source
    files."""
    notes = {}
    for src in sources:
        key, col = None, -1  # a comment line whose # is under the option's # continues its note
        for line in Path(src).read_text().splitlines():
            m = re.match(r"\s*(\w+)\s*=.*?(#)\s*(.+)$", line)
            more = re.match(r"(\s*)#\s*(.+)$", line)
            if more and len(more[1]) == col and key in notes:
                notes[key] += " " + more[2].strip()
                continue
            key, col = None, -1
            if m and m[1] in defaults and m[1] not in notes:
                key, col, notes[m[1]] = m[1], m.start(2), m[3].strip()
    width = max(len(f"--{k}={v!r}") for k, v in defaults.items())
    lines = (f"  {f'--{k}={v!r}':<{width}}  {notes.get(k, '')}".rstrip()
             for k, v in defaults.items())
    return "\n".join(lines)


def parse_args(prog, doc, defaults, argv, *, sources=(), choices=None, positional=False):
    """configure() for a script's main: --help prints the docstring and every option; a bad option
    is one line on stderr and exit code 2, before anything is written."""
    argv = list(argv)
    if {"-h", "--help"} & set(argv):
        print(f"{doc.strip()}\n\nOptions (config files: plain Python assignments of these names):\n"
              f"{option_help(defaults, *sources)}")
        raise SystemExit(0)
    try:
        return configure(defaults, argv, choices, positional)
    except ConfigError as e:
        fail(prog, e)


def fail(prog, msg):
    """A usage error: one line on stderr, exit code 2."""
    print(f"{prog}: {str(msg).splitlines()[0] if str(msg) else msg}", file=sys.stderr)
    raise SystemExit(2)


_OS_FIXES = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota)",
             errno.EFBIG: "the file-size limit (ulimit -f) was reached",
             errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
             errno.EROFS: "the file system is read-only"}


def os_message(e: OSError) -> str:
    """An OSError as one line that names the file and what to do about it."""
    what = f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    return f"{what} ({_OS_FIXES[e.errno]})" if e.errno in _OS_FIXES else what


def one_line_errors(prog, usage=(), environment=(), after=""):
    """Decorate a script's main so that every expected failure ends in one line on stderr, never a
    traceback: exit 2 for usage and input (ConfigError, CheckpointError, RunError, `usage`), 1 for
    the environment (OSError, `environment`), 130 for Ctrl-C. `after` says what then helps, e.g.
    that the same command resumes. Other exceptions are bugs and keep their traceback; with DEBUG=1
    in the environment every exception keeps it."""
    tail = f"; {after}" if after else ""

    def wrap(main):
        @functools.wraps(main)
        def guarded(*args, **kw):
            if os.environ.get("DEBUG", "") not in ("", "0"):
                return main(*args, **kw)
            try:
                return main(*args, **kw)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted (Ctrl-C){tail}", file=sys.stderr)
                raise SystemExit(130) from None
            except (ConfigError, CheckpointError, RunError, *usage) as e:
                fail(prog, e)
            except (OSError, *environment) as e:
                msg = os_message(e) if isinstance(e, OSError) else str(e).splitlines()[0]
                print(f"{prog}: {msg}{tail}", file=sys.stderr)
                raise SystemExit(1) from None
        return guarded
    return wrap


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ files
@contextlib.contextmanager
def naming(path):
    """OSErrors inside name `path`: a failed write has no file name, and a temp file's name is not
    the one to report."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def _umask() -> int:
    """The process's umask, read where Linux shows it: os.umask reads it only by setting it, which
    races with other threads that create files."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, data) -> None:
    """Write a temp file in the same folder, fsync, rename: readers see the old or the new file,
    never half. It gets the usual permissions (0666 less the umask), not mkstemp's 0600: a group can
    read a shared run."""
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_umask())
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def finite(x):
    """NaN/inf -> None (also inside lists and dicts), so that rows are strict JSON."""
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    return None if isinstance(x, float) and not np.isfinite(x) else x


def append_jsonl(path, row: dict) -> None:
    """Append one JSON object as one line, fsynced. A torn last line (a kill mid-write) is cut off
    first; a line that fails to be written (disk full) is taken back: the file stays as it was."""
    path = Path(path)
    line = (json.dumps(row, allow_nan=True) + "\n").encode()
    with naming(path), open(path, "ab+", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)
        if size > 0:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # rare: only then read the file to find the last complete line
                f.seek(0)
                size = f.readall().rfind(b"\n") + 1
                f.truncate(size)
                warnings.warn(f"{path}: dropped an incomplete last line")
        try:
            view = memoryview(line)
            while view:
                view = view[f.write(view):]
            os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                f.truncate(size)
            raise


def check_writable(path) -> None:
    """An output that cannot be appended to fails now, before hours of compute go into it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not an output file", str(path))
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise PermissionError(errno.EACCES, "cannot be written", str(path))


def lock_dir(folder, name):
    """Hold the lock file folder/.{name}.lock (flock: the kernel drops it when the process ends,
    kill -9 included), so that a second process writing the same folder, under any spelling of its
    path, is refused instead of interleaving its files. Returns the open lock file; closing it
    releases the lock."""
    path = Path(folder) / f".{name}.lock"
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"{folder} is being written by {holder} (lock {path}): wait for it to end "
                       "or stop it; two writers would interleave their files") from None
    except BaseException:
        f.close()
        raise
    f.truncate(0)
    f.write(f"{Path(sys.argv[0]).name} pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f


def read_jsonl(path) -> list:
    """All complete rows; a line that does not parse (a torn write) is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{i + 1}: skipping an incomplete line")
    return rows


# ------------------------------------------------------------------------------------ checkpoints
def ckpt_path(out_dir, step: int, state: bool = False) -> Path:
    ext = "state.pt" if state else "safetensors"
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}.{ext}"


def save_checkpoint(out_dir, step: int, model, state: dict | None = None) -> None:
    """Parameters as safetensors (exactly named_parameters); the resume state beside it, written
    first."""
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
        params = st_load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({e}); delete it to fall "
                              "back to the previous one") from e
    if bad := [k for k, v in params.items() if v.is_floating_point() and not v.isfinite().all()]:
        raise CheckpointError(f"checkpoint {path} has non-finite values in {bad[0]}: it cannot be "
                              "a training state to resume or estimate at")
    return params


def check_params(params, model, where):
    """The checkpoint's tensors must be the model's, name for name and shape for shape:
    load_state_dict(strict=False) would keep a missing one's initial value and go on silently."""
    want = {k: tuple(p.shape) for k, p in model.named_parameters()}
    got = {k: tuple(v.shape) for k, v in params.items()}
    if got != want:
        wrong = {"missing": sorted(want.keys() - got.keys()),
                 "unexpected": sorted(got.keys() - want.keys()),
                 "of another shape": sorted(k for k in want.keys() & got.keys()
                                            if want[k] != got[k])}
        raise CheckpointError(
            f"{where} does not hold the model's parameters ("
            + "; ".join(f"{what}: {', '.join(ks)}" for what, ks in wrong.items() if ks)
            + "): restore it from a copy, or delete it (and its .state.pt)")
    return params


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
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is torn or not JSON ({e}): restore it from a copy") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} holds a {type(cfg).__name__}, not a run's config")
    return cfg
