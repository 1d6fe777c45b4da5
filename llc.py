"""Estimate the local learning coefficient (LLC) at every checkpoint of a run, one row per
checkpoint appended to <run>/llc.jsonl, resumable; under torchrun the checkpoints are shared out
across ranks. The estimator itself is sgld.estimate_llc (re-exported here)."""
import contextlib
import math
import os
import sys
import time

# before torch loads OpenMP: spinning threads crawl under load
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch

import common
import data
from analysis import calibration, susceptibility
from analysis.restrictions import restriction_set
from fast.memory import release_memory, tune_malloc
from sgld import (CHAIN_MODES, AllChainsDivergedError, Settings, estimate_llc,  # noqa: F401
                  make_generators, pick_chain_mode, select_params)

USAGE = """

    python llc.py out/tiny                        # quick CPU settings, every checkpoint
    python llc.py configs/llc_v1.py out/L2H4-s0 --steps=984,9375
        # the paper's sampler at two checkpoints
    python llc.py out/tiny --include='blocks.0.**' --out=llc_block0.jsonl   # restricted LLC
    python llc.py out/tiny --restrictions=heads   # one LLC per attention head -> llc_heads.jsonl
    python llc.py out/tiny --data_refine=ood_inputs/3  # inputs x3 -> llc_data-ood_inputs-3.jsonl
    python llc.py out/tiny --calibrate            # epsilon x nbeta x gamma grid + trace figures
    python llc.py configs/llc_cpu.py out/L2H4-s0 --follow=3600
        # beside train.py: each checkpoint as it appears
    torchrun --standalone --nproc_per_node=4 llc.py configs/llc_v2.py out/L2H4-s0
        # checkpoints across ranks
"""
# the quick CPU setting for the demo runs; configs/llc_v1.py and llc_v2.py hold the paper's
DEFAULTS = dict(
    ckpt="",                # the run directory (or give it positionally)
    steps="",               # comma-separated checkpoint steps (default: every checkpoint)
    out="",                 # output file in the run directory ("": llc.jsonl,
                            # llc_<restrictions>.jsonl, llc_data-<name>.jsonl)
    epsilon=3e-4,           # SGLD step size
    gamma=6.0,              # localisation strength
    nbeta=60.0,             # n * inverse temperature
    num_chains=4,           # chains per checkpoint
    num_draws=100,          # recorded draws per chain
    num_burnin=50,          # steps discarded before the draws
    se_target=0.0,          # > 0: stop a checkpoint once its llc_se is at most this (checked every
                            # 100 draws; num_draws caps)
    batch_size=32,          # rows per chain and step
    n=4096,                 # stream: rows for L(w*); fixed: the size of the fixed set
    data_mode="stream",     # stream (fresh rows every step) | fixed (one set of n rows, shuffled
                            # per chain)
    seed=0,                 # seeds data order, noise and the L(w*) set
    paired=False,    # L(w*) on each draw's own minibatch (removes the L(w*) set's sampling error)
    horizon=0,       # > num_draws (no burn-in): the mean over this many steps from w*, extrapolated
    per_token=False,        # also estimate one LLC per context position
    include="",      # restricted LLC: glob patterns of the sampled parameters ('blocks.0.**')
    exclude="",             # ... minus these (the rest stays at w*)
    restrictions="",        # a named set, one row per (checkpoint, restriction): heads | layers |
                            # paper (regression)
    published=False,        # LM: also llc_*_published, the paper's online-estimator convention
                            # (needs num_burnin=0)
    data_refine="",         # data-refined LLC on another distribution: ood_inputs/<g>, tasks/<M> |
                            # code, prose (LM)
    probes="",              # susceptibilities to these distributions (as data_refine, and
                            # positions: each context position); row columns susceptibility(_se)
    probe_rows=512,         # rows of each fixed probe set
    bif_rows=0,             # > 0: per-sample losses of this many training rows and as many
                            # queries -> <out>_observed/step_*.npz (loss kernel, BIF)
    token_rows=0,           # > 0 (instead): per-token susceptibilities of this many probe rows
                            # -> <out>_observed/step_*.npz
    observe_every=20,       # probes evaluated at every k-th draw
    device="",              # default: cuda (LOCAL_RANK under torchrun) if available, else cpu
    update_backend="auto",  # auto | torch | triton | xla
    chain_mode="autograd",  # autograd (vmap, or loop on a CPU if large) | auto (hand-derived once
                            # checked) | see sgld
    cuda_graph=False,       # capture the SGLD step in a CUDA graph (CUDA, native mode)
    tf32=False,             # allow TF32 matmuls on CUDA
    threads=0,              # CPU threads / chain workers (0: this process's share of the cores)
    grad_chunk=256,         # native_loop on CPU: rows per gradient pass (0: the whole batch)
    ckpt_batch=1,           # checkpoints estimated together in one batched computation (GPU)
    follow=0,               # > 0: then wait for new checkpoints (a run still training) up to this
                            # many seconds each
    trace_points=100,       # bins of the per-chain loss trace stored in each row
    calibrate=False,        # run the epsilon x nbeta x gamma grid instead (llc_calibration.json +
                            # figures)
    calib_steps="",         # calibration checkpoints (default: three spread over the run)
    calib_epsilon="3e-4,1e-3,3e-3",  # calibration grid: step sizes
    calib_nbeta="20,60,200",         # calibration grid: nbeta values
    calib_gamma="6,60",              # calibration grid: localisation strengths (one figure each)
)
CHOICES = {"data_mode": ("stream", "fixed"), "chain_mode": ("autograd", *CHAIN_MODES),
           "update_backend": ("auto", "torch", "triton", "xla")}
RUN_KEYS = (  # a resumed file must agree on all of these
    "epsilon", "gamma", "nbeta", "num_chains", "num_draws", "num_burnin", "batch_size", "seed", "n",
    "data_mode", "per_token", "include", "exclude")
WHEN_SET = {  # row columns
    "restrictions": "restriction_set", "data_refine": "data_refine", "se_target": "se_target",
    "paired": "paired", "horizon": "horizon", "probes": "probes", "bif_rows": "bif_rows",
    "token_rows": "token_rows"}


def llc_row(step, res, trace_points):
    """One flat llc.jsonl row: the estimate, its diagnostics, binned loss and per-draw LLC traces (a
    chain's mean over its first k bins is the estimate a shorter run would give) and the
    settings."""
    T = res["loss_trace"].shape[1]
    edges = np.linspace(0, T, min(trace_points, T) + 1).astype(int)
    binned = lambda tr: [  # noqa: E731
        [float(r[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])] for r in tr.numpy()]
    row = {"step": step, **{k: v for k, v in res.items()
                            if k not in ("loss_trace", "llc_trace", "observed")}}
    row.update(loss_trace=binned(res["loss_trace"]), llc_trace=binned(res["llc_trace"]),
               trace_draws=edges[1:].tolist())
    return {k: common.finite(v) for k, v in row.items()}


class Run:
    """A run folder as the estimator sees it: its task, its L(w*)/minibatch data and its
    checkpoints' parameters."""

    def __init__(self, out_dir, cfg, device):
        self.dir, self.cfg, self.device = out_dir, cfg, device
        self.task, run_cfg = data.task_for(out_dir), common.load_run(out_dir)
        self.published_llc = data.kind(run_cfg).published_llc  # "" unless the task has one (the LM)
        if cfg["data_refine"]:  # another data distribution; the model and its loss stay the run's
            self.task = self.task.refined(cfg["data_refine"])
        self.restrictions = {None: {}}  # None: the plain LLC (include / exclude as given)
        model = data.build_model(run_cfg, 0)
        if cfg["restrictions"]:
            self.restrictions = restriction_set(cfg["restrictions"], model,
                                                data.kind(run_cfg).paper_restrictions)
        try:  # the patterns match the run's parameters, before any checkpoint is loaded
            select_params([k for k, _ in model.named_parameters()], cfg["include"] or None,
                          cfg["exclude"] or None)
        except ValueError as e:
            raise common.ConfigError(f"--include/--exclude: {e}") from None
        self.probes = None
        if cfg["probes"] or cfg["bif_rows"] or cfg["token_rows"]:  # observed during sampling
            self.probes = susceptibility.Probes(self.task, cfg["probes"], cfg["probe_rows"],
                                                cfg["seed"], device, cfg["bif_rows"],
                                                cfg["token_rows"])
        self.data = self.task.sample  # a stream: sample(generator, m), on the generator's device
        # one fixed set for every checkpoint (common random numbers)
        if cfg["data_mode"] == "fixed":
            (_, _, _, g_set), _ = make_generators(cfg["seed"], device)
            self.data = self.task.sample(g_set, cfg["n"])

    def estimate(self, steps, restriction=None, models=None, **over):
        """estimate_llc at a list of checkpoints, batched into one computation; `over` replaces
        settings."""
        models = models or [data.load_model(self.dir, s).to(self.device) for s in steps]
        s = {**self.cfg, **over}
        settings = {k: s[k] for k in Settings.__dataclass_fields__
                    if k in s and k not in ("device", "workers")}
        settings.update(include=s["include"] or None, exclude=s["exclude"] or None,
                        device=self.device, n=s["n"] if s["data_mode"] == "stream" else None,
                        progress=over.get("progress", f"llc step(s) {steps}"
                                          f"{' ' + restriction if restriction else ''}"))
        # a named restriction: its include or element masks
        settings.update(self.restrictions[restriction])
        if self.probes is not None:  # the probes' losses at every observe_every-th draw
            settings.update(self.probes.settings(models[0]))
        # the default: plain torch.func gradients, auto's choice among them
        if settings["chain_mode"] == "autograd":
            settings["chain_mode"] = pick_chain_mode(None, self.device, s["batch_size"],
                                                     sum(p.numel() for p in models[0].parameters()))
        return estimate_llc(data.RunLoss(models[0], self.task, s["per_token"]),
                            [{k: v.detach() for k, v in m.named_parameters()} for m in models],
                            self.data, **settings)

    def published(self, res):
        """With --published: the estimate restated as the paper's LM curves computed it (the task's
        published_llc names the function: lm.eval's, imported only for an LM run)."""
        on = self.cfg["published"]
        return common.finite(data.resolve(self.published_llc)(res)) if on else {}

    def susceptibilities(self, res, step, restriction):
        """With --probes or --bif_rows: the row's columns (analysis/susceptibility.py)."""
        if self.probes is None:
            return {}
        files = os.path.splitext(os.path.join(self.dir, self.cfg["out"]))[0] + "_observed"
        return common.finite(self.probes.columns(res["observed"], files, step, restriction))

    def rows(self, steps, done=frozenset()):
        """The rows of a group of checkpoints, for each restriction the steps not `done` (step,
        restriction). If every chain of one diverged, each is redone alone: the others keep their
        estimates; the failure is recorded."""
        # each checkpoint loaded, and its L(w*) computed, once for all restrictions
        out, models, init = [], {}, {}
        for r in self.restrictions:
            todo = [s for s in steps if (s, r) not in done]
            models.update({s: data.load_model(self.dir, s).to(self.device)
                           for s in todo if s not in models})
            base = {k: self.cfg[k] for k in RUN_KEYS}
            base.update({col: self.cfg[k] for k, col in WHEN_SET.items() if self.cfg[k]},
                        **{"restriction": r} if r else {})
            try:
                known = ({"init_loss": [init[s] for s in todo]} if all(s in init for s in todo)
                         else {})
                res = self.estimate(todo, r, [models[s] for s in todo], **known) if todo else []
            except AllChainsDivergedError as err:
                if len(todo) > 1:
                    out += [row for s in todo for row in self.rows(
                        [s], {(s, q) for q in self.restrictions if q != r})]
                    continue
                print(f"llc.py: step {todo[0]}{' ' + r if r else ''}: {err}", file=sys.stderr)
                out.append({"step": todo[0], **base, "llc_mean": None,
                            "nan_chains": list(range(self.cfg["num_chains"])), "error": str(err)})
                continue
            out += [{"step": s, **base, **llc_row(s, x, self.cfg["trace_points"]),
                     **self.published(x), **self.susceptibilities(x, s, r)}
                    for s, x in zip(todo, res)]
            init.update({s: x.get("init_loss_per_token", x["init_loss"])
                         for s, x in zip(todo, res)})
        return out


def plan(cfg, path, restrictions):
    """(all requested steps, those still to do); a usage error when a checkpoint is missing or the
    output file holds rows made with other settings."""
    have = common.list_checkpoints(cfg["ckpt"])
    steps = [int(s) for s in cfg["steps"].split(",")] if cfg["steps"] else have
    missing = sorted(set(steps) - set(have))
    if not steps or missing:
        which = f"--steps={cfg['steps']}: " if cfg["steps"] else ""
        common.fail("llc.py", f"{which}no checkpoint for step(s) {missing or 'any'} in "
                    f"{cfg['ckpt']}/checkpoints (available: {have[:5]}"
                    f"{'...' if len(have) > 5 else ''})")
    rows = common.read_jsonl(path)
    if bad := [i for i, r in enumerate(rows, 1) if not isinstance(r, dict)
               or not isinstance(r.get("step"), int)]:
        common.fail("llc.py", f"{path}: row {bad[0]} is not an llc row (no step): move the file "
                    "away or give --out=<another file>")
    common.check_writable(path)
    # a WHEN_SET column: absent = the default
    for key, col in [(k, k) for k in RUN_KEYS] + list(WHEN_SET.items()):
        old = {r.get(col, DEFAULTS[key] if key in WHEN_SET else None) for r in rows} - {cfg[key]}
        if old:
            common.fail("llc.py", f"{path} holds rows with {col}={old.pop()!r}, but this run has "
                        f"{col}={cfg[key]!r}; use --out=<other file> or the same settings")
    done = {(r["step"], r.get("restriction")) for r in rows}
    todo = [s for s in steps if any((s, r) not in done for r in restrictions)]
    print(f"llc.py: {len(todo)} checkpoint(s) to do, {len(steps) - len(todo)} already in {path}",
          file=sys.stderr)
    return steps, todo, done


def sweep(run, todo, finished, path, dist, rank, world):
    """Groups of ckpt_batch checkpoints, dealt round-robin to the ranks; after each round the rows
    are gathered and rank 0 alone appends them in step order, so the file reads as a single
    process's would."""
    kb = max(1, run.cfg["ckpt_batch"])
    groups = [todo[i:i + kb] for i in range(0, len(todo), kb)]
    t0, failed, mine = time.time(), 0, groups[rank::world]
    for i in range(math.ceil(len(groups) / world)):
        payload = None
        if i < len(mine):
            try:
                payload = run.rows(mine[i], finished)
            except Exception as err:  # noqa: BLE001  tell the other ranks, then fail
                if dist is None:
                    raise
                payload = [{"fatal": f"rank {rank}, step(s) {mine[i]}: "
                                     f"{type(err).__name__}: {err}"}]
            release_memory()
        got = [payload]
        if dist is not None:
            got = [None] * world
            dist.all_gather_object(got, payload)
        got = [r for p in got if p is not None for r in p]
        rows = sorted((r for r in got if "fatal" not in r), key=lambda r: r["step"])
        if rank == 0:
            for row in rows:
                common.append_jsonl(path, row)
                failed += row.get("llc_mean") is None
        fatal = [r["fatal"] for r in got if "fatal" in r]
        if fatal:
            raise SystemExit("llc.py: " + "; ".join(fatal))
        el, done = time.time() - t0, sum(len(g) for g in groups[:(i + 1) * world])
        if rank == 0:
            llcs = [round(r["llc_mean"], 2) if r.get("llc_mean") is not None else None
                    for r in rows]
            used = f" draws={[r.get('draws_used') for r in rows]}" if run.cfg["se_target"] else ""
            print(f"llc.py: step(s) {sorted({r['step'] for r in rows})} [{done}/{len(todo)}] "
                  f"llc={llcs}{used} {el / done:.1f}s/ckpt, "
                  f"ETA {common.fmt_time(el / done * (len(todo) - done))}", file=sys.stderr)
    if failed:
        raise SystemExit(f"llc.py: all chains diverged at {failed} checkpoint(s); "
                         "rows written with llc_mean=null")


def follow(run, cfg, path):
    """--follow: estimate checkpoints as a training run writes them; ends once the run's last step
    has its row, or when no new checkpoint has come for `follow` seconds."""
    # the last step train.py saves (unknown: wait for the timeout)
    rc = common.load_run(cfg["ckpt"])
    last = rc["stop_at"] if rc.get("stop_at", -1) >= 0 else rc.get("max_steps", math.inf) - 1
    have, waited, poll = common.list_checkpoints(cfg["ckpt"]), 0.0, min(10.0, cfg["follow"])
    while not (have and have[-1] >= last):
        if waited >= cfg["follow"]:
            return print(f"llc.py: no new checkpoint in {cfg['ckpt']} for {cfg['follow']:g}s: "
                         f"stopping (rerun to resume)", file=sys.stderr)
        time.sleep(poll)
        waited += poll
        now = common.list_checkpoints(cfg["ckpt"])
        if now != have:
            have, waited = now, 0.0
            _, todo, done = plan(cfg, path, run.restrictions)
            sweep(run, todo, done, path, None, 0, 1)
    print(f"llc.py: the run's last checkpoint ({last}) is done", file=sys.stderr)


def pick_device(cfg, rank, world):
    if cfg["device"]:
        return torch.device(cfg["device"])
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device()
    if local >= torch.cuda.device_count():
        common.fail("llc.py", f"rank {rank} would use cuda:{local}, but there are "
                    f"{torch.cuda.device_count()} CUDA devices: use --nproc_per_node <= that, "
                    "or --device=cpu")
    return torch.device("cuda", local)


@common.one_line_errors("llc.py", usage=(FileNotFoundError,), after="the same command resumes")
def main(argv=None):
    """The command line (see the module docstring). Under torchrun every rank estimates its share of
    the checkpoints on its own device (gloo, Python objects only); the rows equal a single
    process's."""
    cfg = _options(sys.argv[1:] if argv is None else argv)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if cfg["calibrate"] and rank != 0:
        return print(f"llc.py: rank {rank} idle (calibration runs on rank 0)", file=sys.stderr)
    dist, threads = None, torch.get_num_threads()
    if world > 1 and not cfg["calibrate"]:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    try:
        _estimate(cfg, dist, rank, world)
        if dist is not None:  # no rank tears its connections down while another still uses them
            dist.barrier()
    finally:
        if dist is not None:
            dist.destroy_process_group()
        torch.set_num_threads(threads)


def _options(argv):
    """The parsed and checked options: every usage error exits (code 2) before any work starts."""
    cfg, runs = common.parse_args("llc.py", __doc__ + USAGE, DEFAULTS, argv,
                                  sources=[__file__], choices=CHOICES, positional=True)
    if runs and cfg["ckpt"] or len(runs) > 1:
        common.fail("llc.py",
                    f"give one run directory (got {runs + [cfg['ckpt']] * bool(cfg['ckpt'])})")
    cfg["ckpt"] = cfg["ckpt"] or (runs[0] if runs else "")
    if not cfg["ckpt"]:
        common.fail("llc.py", "give the run directory: python llc.py out/<run> [--key=value ...] "
                    "(see --help)")
    if cfg["published"] and cfg["num_burnin"]:
        common.fail("llc.py", "--published restates the paper's estimator, which has no burn-in: "
                    "set --num_burnin=0")
    if cfg["follow"] and (cfg["steps"] or cfg["calibrate"]
                          or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        common.fail("llc.py", "--follow takes every checkpoint as it appears, in one process: "
                    "drop --steps, --calibrate and torchrun")
    if cfg["restrictions"] and (cfg["include"] or cfg["exclude"]):
        common.fail("llc.py", "give --restrictions or --include/--exclude, not both")
    _check_values(cfg)
    cfg["out"] = cfg["out"] or "llc{}{}.jsonl".format(
        *(f"_{p}{v.replace('/', '-')}" if v else ""
          for p, v in (("", cfg["restrictions"]), ("data-", cfg["data_refine"]))))
    try:
        kind = data.kind(cfg["ckpt"])
    except (FileNotFoundError, common.ConfigError) as e:
        common.fail("llc.py", e)
    if cfg["published"] and not kind.published_llc:
        common.fail("llc.py", "--published restates the paper's language-model estimator: "
                    "this run's task has none")
    return cfg


MINIMUM = {"threads": 0, "ckpt_batch": 1, "trace_points": 1, "follow": 0,  # beside Settings's
           "probe_rows": 2}


def _check_values(cfg):
    """The ranges (the sampler's own checks among them), the step list and the fixed set's size,
    before any file is read or written."""
    sampler = {k: cfg[k] for k in Settings.__dataclass_fields__ if k in cfg}
    try:
        Settings(**{**sampler, "include": None, "exclude": None, "device": None})
    except ValueError as e:
        common.fail("llc.py", f"--{e}")
    for k, lo in MINIMUM.items():
        if cfg[k] < lo:
            common.fail("llc.py", f"--{k}={cfg[k]!r} must be at least {lo}")
    if cfg["bif_rows"] and cfg["token_rows"]:
        common.fail("llc.py", "give --bif_rows or --token_rows, not both (the per-token "
                    "covariances are kept against the probes only)")
    if not 0 <= cfg["token_rows"] <= cfg["probe_rows"]:
        common.fail("llc.py", f"--token_rows={cfg['token_rows']} must be in 0 .. probe_rows "
                    f"({cfg['probe_rows']})")
    if cfg["bif_rows"] < 0 or 2 * cfg["bif_rows"] > cfg["probe_rows"]:
        common.fail("llc.py", f"--bif_rows={cfg['bif_rows']} must be in 0 .. probe_rows / 2 "
                    f"({cfg['probe_rows'] // 2}): its training rows and queries are probe rows")
    if cfg["data_mode"] == "fixed" and cfg["batch_size"] > cfg["n"]:
        common.fail("llc.py", f"--batch_size={cfg['batch_size']} must be at most the fixed set's "
                    f"n={cfg['n']} rows")
    try:
        if cfg["steps"]:  # each once, in order
            cfg["steps"] = ",".join(map(str, sorted({int(s) for s in cfg["steps"].split(",")})))
    except ValueError:
        common.fail("llc.py", f"--steps must be comma-separated integers, got {cfg['steps']!r}")


def _estimate(cfg, dist, rank, world):
    """This rank's work on its own device: the sweep (and --follow) or the calibration."""
    device = pick_device(cfg, rank, world if dist else 1)
    # this process's share of the usable cores (chain workers in native_loop)
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"]
                              or max(1, len(os.sched_getaffinity(0)) // (world if dist else 1)))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # Triton launches and CUDA graphs use the current device
    if cfg["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tune_malloc()
    try:  # the restriction set and the data distribution exist, before anything is written
        run = Run(cfg["ckpt"], cfg, device)
    except common.ConfigError as e:
        common.fail("llc.py", e)
    path = os.path.join(cfg["ckpt"], cfg["out"])
    # one writer per output file: the lock is held (rank 0 writes) until the sweep ends
    with common.lock_dir(cfg["ckpt"], cfg["out"]) if rank == 0 else contextlib.nullcontext():
        todo = [plan(cfg, path, run.restrictions) if rank == 0 else None]
        if dist is not None:
            dist.broadcast_object_list(todo, src=0)
        steps, todo, done = todo[0]
        if cfg["calibrate"]:
            return calibration.calibrate(run, steps)
        sweep(run, todo, done, path, dist, rank, world if dist else 1)
        if cfg["follow"]:
            follow(run, cfg, path)


if __name__ == "__main__":
    main()
