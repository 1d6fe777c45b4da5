"""Train the paper's in-context linear regression transformer (L2H4) or its attention-only language
model (L2W256): config -> training loop -> safetensors checkpoints + log.jsonl. The run's task
(data.TASKS) supplies data, loss and checkpoint metrics; rerunning a command resumes it,
bit-identically on CPU."""
import copy
import importlib.util
import json
import math
import os
import sys
import time
import warnings

# before torch loads OpenMP: busy-waiting threads crawl under load
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch

import common
import data
import fast
from fast.memory import tune_malloc

# --------------------------------------------------------- defaults: the CPU demo (configs/tiny.py)
out_dir = "out/tiny"    # run folder: config.json, log.jsonl, checkpoints/
seed = 0                # model init (torch.manual_seed) and the training data stream
task = "regression"     # a key of data.TASKS: regression | lm (the language model)
n_layer = 2             # transformer layers
n_head = 4              # attention heads per layer
d_model = 64            # residual stream width
optimizer = "adam"      # adam | adamw (decoupled weight decay, the language model's); betas
                        # 0.9/0.999, eps 1e-8
weight_decay = 0.0      # weight decay (adamw)
lr_schedule = "onecycle"  # onecycle (triangle peaking at max_steps/2 - 1, the regression recipe) |
                          # constant
lr = 3e-3               # peak learning rate
batch_size = 256        # sequences per step (all ranks together)
micro_batch = 0         # sequences per forward/backward (gradients accumulated; bounds CPU memory);
                        # 0 = the batch
max_steps = 2000        # schedule length (the paper: 500,000)
stop_at = -1            # stop after (and save) this step (>= 0); the schedule keeps its length
n_log = 50              # checkpoints: int(logspace(0, log10 max_steps, n_log)) ...
n_lin = 20              # ... U int(linspace(0, max_steps, n_lin)) ...
ckpt_every = 0          # ... U every ckpt_every-th step (0: none), plus the last step
log_interval = 50       # steps between training-loss rows in log.jsonl
eval_batch_size = 1024  # sequences (rows) of the fixed eval set, evaluated at every checkpoint
eval_seed = 0           # seeds the eval set
device = "auto"         # auto | cpu | cuda | xla
compile = False         # torch.compile the model
fast_grad = "False"     # False (autograd) | True | auto (CPU only): hand-derived gradient
                        # (regression; L2H4.py)
tf32 = False            # allow TF32 matmuls on CUDA
fresh_optimizer = False  # resume checkpoints without .state.pt with a new optimizer (inexact)
# --------------------------------------------------------------------------------------------------
COMMON = {k: v for k, v in globals().items()
          if not k.startswith("_") and isinstance(v, (int, float, str, bool))}


def defaults_for(task):
    """Every option of a run of `task`: the common ones above and the task's own keys (data.py: D,
    K, ...; lm/data.py: corpus, vocab_size, ...; the LM's are imported only for task = "lm")."""
    return {**COMMON, **data.kind({"task": task}).defaults}


def task_in(argv):
    """The task a command line asks for, before it is parsed: the last --task or config file setting
    one (the default: regression), so that the parse knows the task's keys."""
    task, args = COMMON["task"], list(argv)
    for i, arg in enumerate(args):
        if arg.endswith(".py") and not arg.startswith("--"):
            task = common.read_config_file(arg).get("task", task)
        elif arg.startswith("--task="):
            task = arg.partition("=")[2]
        elif arg == "--task" and i + 1 < len(args):
            task = args[i + 1]
    return task


DEFAULTS = defaults_for("regression")  # the regression run's options (defaults_for("lm"): the LM's)
USAGE = """

    python train.py                                # the CPU demo (these defaults = configs/tiny.py)
    python train.py configs/L2H4.py --seed=3          # the paper's run: 500k steps
    python train.py configs/L2H4.py --stop_at=40292   # its first 40k steps, schedule unchanged
    torchrun --nproc_per_node=2 train.py configs/tiny.py
        # DDP; the global batch is split across ranks
    python train.py configs/lm_tiny.py                # the language-model CPU demo (task = "lm")

Below: every task's options; a run takes the common ones and its own task's (--task or a config
file sets the task: the regression's D, K, ...; the language model's corpus, vocab_size, ...).
"""
RESUME_MAY_CHANGE = {"stop_at", "device", "compile", "tf32", "log_interval", "micro_batch",
                     "fast_grad", "fresh_optimizer",
                     "out_dir"}  # the same run, however its path is spelt, or after a move
CHOICES = {"task": tuple(data.TASKS), "optimizer": ("adam", "adamw"),
           "lr_schedule": ("onecycle", "constant"), "fast_grad": ("auto", "True", "False")}
AT_LEAST = {  # the smallest allowed value of each numeric option (every float must be finite too)
    **dict.fromkeys(("batch_size", "max_steps", "log_interval", "eval_batch_size", "n_layer",
                     "n_head", "d_model", "d_mlp", "D", "K", "vocab_size"), 1),
    **dict.fromkeys(("seed", "eval_seed", "task_seed", "micro_batch", "n_log", "n_lin",
                     "ckpt_every", "num_tasks", "weight_decay", "sigma2"), 0),
    "n_ctx": 2, "stop_at": -1}
BETWEEN = {"lr": (0, math.inf), "test_frac": (0, 1)}  # open intervals


def validate(cfg):
    """Refuse a bad config before anything is written, so that a refused command leaves no
    config.json behind that would refuse the corrected one. Checks types, choices, ranges, the
    device and stop_at."""
    for key, default in defaults_for(cfg["task"]).items():
        val, want = cfg.get(key), type(default)
        if not (type(val) is want or (want is float and type(val) is int)
                or (key == "fast_grad" and type(val) is bool)):  # a bool in runs made before "auto"
            raise common.ConfigError(f"--{key} must be {want.__name__}, "
                                     f"got {type(val).__name__} {val!r}")
        if isinstance(val, float) and not math.isfinite(val):
            raise common.ConfigError(f"--{key}={val}: must be a finite number")
    for key, allowed in CHOICES.items():
        if str(cfg[key]) not in allowed:
            raise common.ConfigError(f"--{key} must be one of {', '.join(allowed)}; "
                                     f"got {cfg[key]!r}")
    for key, lo in AT_LEAST.items():
        if key in cfg and cfg[key] < lo:
            raise common.ConfigError(f"--{key}={cfg[key]!r}: must be at least {lo}")
    for key, (lo, hi) in BETWEEN.items():
        if key in cfg and not lo < cfg[key] < hi:
            raise common.ConfigError(f"--{key}={cfg[key]!r}: must be above {lo}"
                                     + (f" and below {hi}" if hi < math.inf else ""))
    if cfg["d_model"] % cfg["n_head"]:
        raise common.ConfigError(f"--n_head={cfg['n_head']}: must divide d_model={cfg['d_model']} "
                                 "(each head gets d_model / n_head channels)")
    if cfg["lr_schedule"] == "onecycle" and cfg["max_steps"] < 3:
        raise common.ConfigError(f"--max_steps={cfg['max_steps']}: the onecycle schedule needs at "
                                 "least 3 steps; use more or --lr_schedule=constant")
    _check_device(cfg["device"])


def _check_device(name):
    """--device names a device this machine has: a typo (gpu) or a missing CUDA is a usage error."""
    if name == "auto":
        return
    if name == "xla":
        if importlib.util.find_spec("torch_xla") is None:
            raise common.ConfigError("--device=xla needs torch_xla installed; or use --device=auto")
        return
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise common.ConfigError(f"--device={name}: must be auto, cpu, cuda, cuda:<index> or xla")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise common.ConfigError(f"--device={name}: this machine has {torch.cuda.device_count()} "
                                 "CUDA device(s); use --device=cpu or --device=auto")


def lr_at(step, peak, total):
    """torch's OneCycleLR(pct_start=0.5, linear, div = final_div = total/2 - 1): a triangle from
    peak/div up to peak at step total/2 - 1, then down to peak/div^2 at step total - 1
    (regression.md §5)."""
    div = total / 2 - 1
    lo, top = peak / div, total / 2 - 1
    if step <= top:
        return lo + (peak - lo) * step / top
    return peak + (lo / div - peak) * (step - top) / (total - 1 - top)


def lr_for(cfg, step):
    return (cfg["lr"] if cfg["lr_schedule"] == "constant"
            else lr_at(step, cfg["lr"], cfg["max_steps"]))


def checkpoint_steps(total, n_log=100, n_lin=100, every=0):
    """The reference's checkpoint set: int-truncated log- and linear-spaced steps below `total`,
    plus every `every`-th step (the language model's: every 100), plus the last step (already there
    for the paper's 500k, where int(10**log10(500000)) = 499999; added so that shorter runs always
    save their final model)."""
    s = ({int(v) for v in np.logspace(0, np.log10(total), n_log)}
         | {int(v) for v in np.linspace(0, total, n_lin)})
    s |= set(range(0, total, every)) if every > 0 else set()
    s.add(total - 1)
    return sorted(v for v in s if v < total)


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "xla":
        import torch_xla.core.xla_model as xm  # optional dependency, imported only when asked for
        return xm.xla_device()
    return torch.device(name)


def find_resume_step(out, model, fresh_optimizer=False):
    """(step, params, state) of the newest checkpoint whose files both load, so that the newer ones
    are trained again bit for bit; a broken newer one is skipped with a warning. (None, None, None)
    for a new run. Checkpoints with no optimizer state at all (a copy without its .state.pt files)
    are refused, never trained over from step 0; with fresh_optimizer their newest weights resume
    (state None)."""
    steps, lacking = common.list_checkpoints(out), []
    for step in reversed(steps):
        if not common.ckpt_path(out, step, state=True).exists():
            lacking.append(step)
            continue
        try:
            params, state = common.load_params(out, step), common.load_state(out, step)
        except common.CheckpointError as e:
            warnings.warn(f"{e}; falling back to an earlier checkpoint")
            continue
        if lacking:
            warnings.warn(f"{out}: steps {lacking[-1]}..{lacking[0]} have no .state.pt; resuming "
                          f"from step {step}, which trains them again")
        return step, common.check_params(params, model, common.ckpt_path(out, step)), state
    if not steps:
        return None, None, None
    if not fresh_optimizer:
        raise common.CheckpointError(
            f"{out}: none of its {len(steps)} checkpoints has a usable optimizer state "
            f"({common.ckpt_path(out, steps[-1], state=True).name} ...); starting over would "
            "overwrite them: copy the .state.pt files back, or add --fresh_optimizer=True to go on "
            f"from step {steps[-1]}'s weights with a new optimizer (not bit-identical)")
    params = common.load_params(out, steps[-1])
    return steps[-1], common.check_params(params, model, common.ckpt_path(out, steps[-1])), None


def train(cfg: dict) -> dict:
    """Run (or resume) the training described by a resolved config. Returns the last eval row. The
    config is checked before anything is written; the master holds the run folder's lock."""
    validate(cfg)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        torch.distributed.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if cfg["device"] in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if cfg["batch_size"] % world:
        raise common.ConfigError(f"batch_size {cfg['batch_size']} is not divisible by the "
                                 f"{world} ranks")
    lock = _open_run(cfg) if rank == 0 else None
    try:
        return _train(cfg, ddp, rank, world)
    finally:
        if lock is not None:
            lock.close()


def _saved_config_check(cfg):
    """A folder that holds another run's config is refused: its checkpoints would mix two runs. The
    advice is the saved values or another folder, never deleting it (that would destroy a run)."""
    path = os.path.join(cfg["out_dir"], "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except json.JSONDecodeError as e:
        raise common.ConfigError(f"{path} is not JSON ({e}); restore it from a copy") from None
    defaults = defaults_for(cfg["task"])
    saved = {k: old.get(k, defaults.get(k)) for k in cfg}  # keys newer than the run: defaults
    diff = {k: (saved[k], v) for k, v in cfg.items()
            if k not in RESUME_MAY_CHANGE and saved[k] != v}
    if diff:
        raise common.ConfigError(f"{cfg['out_dir']} holds a run with a different config (saved vs "
                                 f"now: {diff}); rerun with its saved values (config.json) or use "
                                 "another out_dir")


def _open_run(cfg):
    """The master's side of the run folder: refuse another run's folder (before anything is
    written), prepare the task's data, lock the folder, write config.json for a new run. Returns the
    held lock."""
    _saved_config_check(cfg)
    kind = data.kind(cfg)
    if kind.prepare is not None:
        kind.prepare(cfg)  # e.g. the LM's tokenizer + packed token files, once per data folder
    lock = common.lock_dir(cfg["out_dir"], "train")
    try:
        _saved_config_check(cfg)  # again under the lock: another writer may have started the folder
        path = os.path.join(cfg["out_dir"], "config.json")
        if not os.path.exists(path):
            common.atomic_write(path, json.dumps(cfg, indent=1))
    except BaseException:
        lock.close()
        raise
    return lock


def _train(cfg, ddp, rank, world):
    """train() once the run folder is open: resume, then the training loop."""
    master, out, N = rank == 0, cfg["out_dir"], cfg["max_steps"]
    dev = pick_device(cfg["device"])
    if cfg["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp:
        torch.distributed.barrier()
    task = data.task_for(cfg)
    model, fwd, opt, start = _model_and_optimizer(cfg, dev, ddp, master)

    last = min(cfg["stop_at"] if cfg["stop_at"] >= 0 else N - 1, N - 1)
    # the grid, the last step (--stop_at off the grid: its steps are saved too) and every step that
    # has a checkpoint already: trained again (resumed from an earlier one), it is written again
    ckpts = {*checkpoint_steps(N, cfg["n_log"], cfg["n_lin"], cfg["ckpt_every"]), last,
             *common.list_checkpoints(out)}
    eval_data = task.eval_data(common.derive_seed(cfg["eval_seed"], 1), cfg["eval_batch_size"])
    gen = torch.Generator(device=dev if dev.type in ("cpu", "cuda") else "cpu")
    local_bs = cfg["batch_size"] // world
    micro = cfg["micro_batch"] if 0 < cfg["micro_batch"] < local_bs else local_bs
    bar = common.Progress("train", last + 1 - start, "steps")
    row, t_last, steps_since = {}, time.time(), 0
    step_grads = hand_derived(cfg, model, task, gen, local_bs, dev, ddp)
    for step in range(start, last + 1):
        gen.manual_seed(common.derive_seed(cfg["seed"], rank, step))
        xs, ys = (x.to(dev) for x in task.sample(gen, local_bs))
        for g in opt.param_groups:
            g["lr"] = lr_for(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss = _accumulate_grads(task, fwd, step_grads, xs, ys, local_bs, micro)
        opt.step()
        if dev.type == "xla":
            import torch_xla.core.xla_model as xm  # optional dependency (TPU)
            xm.mark_step()
        steps_since += 1
        if master and step % cfg["log_interval"] == 0:
            _log_row(cfg, {"step": step, "kind": "train", "loss": loss.item(),
                           "lr": lr_for(cfg, step)})
        if step in ckpts and master:
            step_time = (time.time() - t_last) / steps_since
            row = _write_checkpoint(cfg, step, model, opt, task, eval_data, step_time)
            bar.update(step + 1 - start,
                       f"step {step}: test loss {row['loss']:.4f}, lr {row['lr']:.2e}", force=True)
            t_last, steps_since = time.time(), 0
        elif master:
            bar.update(step + 1 - start, f"step {step}")
    # the master may still be writing: no rank tears its connections down before all are done
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if master:
        common.progress(f"done: {out} (config.json, log.jsonl, checkpoints/) in "
                        f"{common.fmt_time(time.time() - bar.t0)}")
    return row


def _model_and_optimizer(cfg, dev, ddp, master):
    """(model, forward, optimizer, first step), resumed from the newest usable checkpoint if any."""
    out = cfg["out_dir"]
    model = data.build_model(cfg, cfg["seed"])
    start, params, state = find_resume_step(out, model, cfg["fresh_optimizer"])
    if start is not None:
        model.load_state_dict(params, strict=False)  # for the buffers: the parameters match
    # on the device before the optimizer is built: CPU -> XLA replaces the Parameter objects (no
    # set_data between those tensor types), and an optimizer built earlier would step the stale CPU
    # copies
    model.to(dev)
    Opt = torch.optim.AdamW if cfg["optimizer"] == "adamw" else torch.optim.Adam
    opt = Opt(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
              weight_decay=cfg["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    if master:  # forget log rows after the checkpoint (a new run: all): they will be written again
        _trim_log(out, -1 if start is None else start)
        if start is not None:
            common.progress(f"resuming {out} from step {start}" + ("" if state is not None else
                            "'s weights with a new optimizer (--fresh_optimizer: no .state.pt); "
                            "not bit-identical to an unbroken run"))
    start = 0 if start is None else start + 1
    _move_optimizer_state(opt, dev)
    fwd = torch.compile(model) if cfg["compile"] else model
    if ddp:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd)
    return model, fwd, opt, start


def _accumulate_grads(task, fwd, step_grads, xs, ys, local_bs, micro):
    """The batch's mean-loss gradient into .grad, micro-batch by micro-batch; returns its loss."""
    # gradient accumulation: the same mean-loss gradient as one pass
    for i in range(0, local_bs, micro):
        x, y = xs[i:i + micro], ys[i:i + micro]
        if step_grads is not None:
            loss_i = step_grads(x, y, len(y) / local_bs)
        else:
            loss_i = task.loss(fwd(task.model_input(x, y)), y) * (len(y) / local_bs)
            loss_i.backward()
        loss = loss_i.detach() if i == 0 else loss + loss_i.detach()
    return loss


def _write_checkpoint(cfg, step, model, opt, task, eval_data, step_time):
    """The eval row, then the checkpoint files: the order a resume relies on; returns the row."""
    model.eval()
    row = {"step": step, "kind": "eval", **evaluate(model, eval_data, task),
           "lr": lr_for(cfg, step), "step_time": step_time}
    model.train()
    # the log row first: a kill between the two leaves a row past the newest checkpoint, which a
    # resume drops and writes again (the other order could lose the row of the checkpoint it resumes
    # from)
    _log_row(cfg, row)
    common.save_checkpoint(cfg["out_dir"], step, model,
                           {"optimizer": _cpu(opt.state_dict()), "step": step})
    return row


def _log_row(cfg, row):
    """Append a row to log.jsonl. A non-finite loss stops the run first: it diverged, and neither a
    bare NaN (not JSON) nor its checkpoint (saved after the row) is written. Other non-finite values
    are written as null."""
    if not math.isfinite(row["loss"]):
        raise common.RunError(
            f"the {'training' if row['kind'] == 'train' else 'test'} loss is {row['loss']} at step "
            f"{row['step']}: the run diverged (--lr={cfg['lr']:g} too high?); {cfg['out_dir']} "
            "keeps its checkpoints before this step; train with a lower --lr in another out_dir")
    common.append_jsonl(os.path.join(cfg["out_dir"], "log.jsonl"),
                        {k: common.finite(v) for k, v in row.items()})


def _trim_log(out, last):
    """Drop log.jsonl's rows after step `last` (a new run: -1): the run is about to write them
    again, and appending would duplicate them out of order. Rewritten only when there are some."""
    path = os.path.join(out, "log.jsonl")
    rows = common.read_jsonl(path)
    keep = [r for r in rows if r.get("step", -1) <= last]
    if len(keep) < len(rows):
        common.atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


def wants_fast_grad(setting, dev):
    """--fast_grad as given (True/False; "True"/"False" from the command line); auto: on CPU only,
    where train.py with the hand-derived gradient ran 1.27x autograd's steps/s; on CUDA 0.68x
    (bench.py on an H200: 155.8 vs 227.6). When on, the match check against autograd still runs."""
    return dev.type == "cpu" if setting == "auto" else setting in (True, "True")


def hand_derived(cfg, model, task, gen, rows, dev, ddp):
    """The task's hand-derived gradient as step_grads(x, y, w) -> w * loss (w * its gradient into
    .grad), once it matched autograd on a batch; None (autograd) when off, unavailable (DDP,
    compile, XLA) or failing (one warning)."""
    if (not wants_fast_grad(cfg["fast_grad"], dev) or getattr(task, "batched_grad", None) is None
            or ddp or cfg["compile"] or dev.type == "xla"):
        return None
    params = dict(model.named_parameters())
    # a check batch outside the training stream
    gen.manual_seed(common.derive_seed(cfg["seed"], 0x7E57))
    batch = tuple(x.to(dev) for x in task.sample(gen, min(rows, 64)))
    bad = fast.batched_grad_mismatch(data.RunLoss(model, task),
                                     {k: v.detach() for k, v in params.items()},
                                     list(params), batch)
    if bad:
        warnings.warn(f"train.py: the hand-derived gradient disagrees with autograd ({bad}): "
                      "has the model's code changed? Training with autograd; --fast_grad=False "
                      "silences this")
        return None

    def step_grads(x, y, w):
        loss, g = task.batched_grad(model.cfg, {k: v.detach()[None] for k, v in params.items()},
                                    x[None], y[None])
        for k, p in params.items():
            p.grad = g[k][0] * w if p.grad is None else p.grad + g[k][0] * w
        return loss[0] * w
    return step_grads


def evaluate(model, batch, task):
    """The task's checkpoint metrics on the fixed eval data, on the model's device (XLA: on a CPU
    copy, which keeps the XLA graphs small; model.cpu() would replace the parameters the optimizer
    holds)."""
    if next(model.parameters()).device.type == "xla":
        return task.metrics(copy.deepcopy(model).cpu(), batch)
    return task.metrics(model, batch)


def _move_optimizer_state(opt, dev):
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(dev)


def _cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


# the LM's hub errors need no naming: HubNotFound is a ConfigError (exit 2), HubError an OSError (1)
@common.one_line_errors("train.py", usage=(FileNotFoundError,),
                        after="the same command resumes the run")
def main(argv):
    """The command line. Every expected failure is one line on stderr: exit 2 for usage and input,
    1 for the environment (a full disk, a permission, the hub), 130 for Ctrl-C."""
    if not argv:
        common.progress("no config given: running the CPU demo (the defaults, as configs/tiny.py)")
    # a run parses its task's options; --help lists every task's (it alone imports lm/ unasked)
    tasks = list(data.TASKS) if {"-h", "--help"} & set(argv) else [task_in(argv)]
    kinds = [data.kind({"task": t}) for t in tasks]  # an unknown task: a usage error
    defaults = {k: v for t in tasks for k, v in defaults_for(t).items()}
    sources = [__file__, *(sys.modules[k.task.__module__].__file__ for k in kinds)]  # the comments
    cfg = common.parse_args("train.py", __doc__ + USAGE, defaults, argv, sources=sources,
                            choices=CHOICES)
    if cfg["device"] == "cpu" or (cfg["device"] == "auto" and not torch.cuda.is_available()):
        # tiny models: 1 thread is fastest
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    # without it glibc maps and unmaps every ~1 MB activation: 6x the page faults of autograd
    tune_malloc()
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
