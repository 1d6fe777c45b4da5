"""Train the paper's in-context linear regression transformer (L2H4) or its attention-only language model
(L2W256): config -> training loop -> safetensors checkpoints + log.jsonl. The run's task (data.TASKS) supplies data,
loss and checkpoint metrics; rerunning a command resumes it, bit-identically on CPU."""
import copy
import json
import os
import sys
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: busy-waiting threads crawl under load
import numpy as np
import torch

import common
import data
import fast

# ------------------------------------------------------------------------- defaults: the CPU demo (configs/tiny.py)
out_dir = "out/tiny"    # run folder: config.json, log.jsonl, checkpoints/
seed = 0                # model init (torch.manual_seed) and the training data stream
task = "regression"     # a key of data.TASKS: regression | lm (the language model)
n_layer = 2             # transformer layers
n_head = 4              # attention heads per layer
d_model = 64            # residual stream width
optimizer = "adam"      # adam | adamw (decoupled weight decay, the language model's); betas 0.9/0.999, eps 1e-8
weight_decay = 0.0      # weight decay (adamw)
lr_schedule = "onecycle"  # onecycle (triangle peaking at max_steps/2 - 1, the regression recipe) | constant
lr = 3e-3               # peak learning rate
batch_size = 256        # sequences per step (all ranks together)
micro_batch = 0         # sequences per forward/backward (gradients accumulated; bounds CPU memory); 0 = the batch
max_steps = 2000        # schedule length (the paper: 500,000)
stop_at = -1            # stop after this step (>= 0) while the schedule keeps its full length
n_log = 50              # checkpoints: int(logspace(0, log10 max_steps, n_log)) ...
n_lin = 20              # ... U int(linspace(0, max_steps, n_lin)) ...
ckpt_every = 0          # ... U every ckpt_every-th step (0: none), plus the last step
log_interval = 50       # steps between training-loss rows in log.jsonl
eval_batch_size = 1024  # sequences (rows) of the fixed eval set, evaluated at every checkpoint
eval_seed = 0           # seeds the eval set
device = "auto"         # auto | cpu | cuda | xla
compile = False         # torch.compile the model
fast_grad = "auto"      # auto | True | False: hand-derived gradient (regression); auto: CPU only
tf32 = False            # allow TF32 matmuls on CUDA
# ---------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
for _kind in data.TASKS.values():  # each task's own keys (data.py: D, K, ...; lm_data.py: corpus, ...)
    DEFAULTS.update(_kind.defaults)
SOURCES = [__file__, *dict.fromkeys(sys.modules[k.task.__module__].__file__ for k in data.TASKS.values())]  # --help
USAGE = """

    python train.py                                   # the CPU demo (these defaults = configs/tiny.py)
    python train.py configs/L2H4.py --seed=3          # the paper's run: 500k steps
    python train.py configs/L2H4.py --stop_at=40292   # its first 40k steps, schedule unchanged
    torchrun --nproc_per_node=2 train.py configs/tiny.py   # DDP; the global batch is split across ranks
    python train.py configs/lm_tiny.py                # the language-model CPU demo (task = "lm")
"""
RESUME_MAY_CHANGE = {"stop_at", "device", "compile", "tf32", "log_interval", "micro_batch", "fast_grad"}
CHOICES = {"task": tuple(data.TASKS), "optimizer": ("adam", "adamw"),
           "lr_schedule": ("onecycle", "constant"), "fast_grad": ("auto", "True", "False")}


def lr_at(step, peak, total):
    """torch's OneCycleLR(pct_start=0.5, linear, div = final_div = total/2 - 1): a triangle from peak/div up to
    peak at step total/2 - 1, then down to peak/div^2 at step total - 1 (regression.md §5)."""
    div = total / 2 - 1
    lo, top = peak / div, total / 2 - 1
    if step <= top:
        return lo + (peak - lo) * step / top
    return peak + (lo / div - peak) * (step - top) / (total - 1 - top)


def lr_for(cfg, step):
    return cfg["lr"] if cfg["lr_schedule"] == "constant" else lr_at(step, cfg["lr"], cfg["max_steps"])


def checkpoint_steps(total, n_log=100, n_lin=100, every=0):
    """The reference's checkpoint set: int-truncated log- and linear-spaced steps below `total`, plus every
    `every`-th step (the language model's: every 100), plus the last step (already there for the paper's
    500k, where int(10**log10(500000)) = 499999; added so that shorter runs always save their final model)."""
    s = {int(v) for v in np.logspace(0, np.log10(total), n_log)} | {int(v) for v in np.linspace(0, total, n_lin)}
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


def find_resume_step(out):
    """(step, params, state) of the newest checkpoint whose files both load; a broken newer one is skipped with a
    warning. (None, None, None) for a new run."""
    for step in reversed(common.list_checkpoints(out)):
        try:
            return step, common.load_params(out, step), common.load_state(out, step)
        except common.CheckpointError as e:
            warnings.warn(f"{e}; falling back to an earlier checkpoint")
    return None, None, None


def train(cfg: dict) -> dict:
    """Run (or resume) the training described by a resolved config. Returns the last eval row."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if cfg["device"] in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if cfg["batch_size"] % world:
        raise common.ConfigError(f"batch_size {cfg['batch_size']} is not divisible by the {world} ranks")
    master, kind = rank == 0, data.kind(cfg)
    out, N = cfg["out_dir"], cfg["max_steps"]
    dev = pick_device(cfg["device"])
    if cfg["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # --- the run's files: a new run writes config.json; a resumed one must match it
    cfg_path = os.path.join(out, "config.json")
    if os.path.exists(cfg_path):
        old = json.load(open(cfg_path))
        diff = {k: (old.get(k, DEFAULTS.get(k)), v) for k, v in cfg.items()  # keys newer than the run: defaults
                if k not in RESUME_MAY_CHANGE and old.get(k, DEFAULTS.get(k)) != v}
        if diff:
            raise common.ConfigError(f"{out} holds a run with a different config (saved vs now: {diff}); "
                                     "use another out_dir or delete this one")
    if kind.prepare is not None and master:
        kind.prepare(cfg)  # e.g. the language model's tokenizer + packed token files, once per data folder
    if master and not os.path.exists(cfg_path):
        common.atomic_write(cfg_path, json.dumps(cfg, indent=1))
    if ddp:
        torch.distributed.barrier()
    task = data.task_for(cfg)
    model = data.build_model(cfg, cfg["seed"])
    start, params, state = find_resume_step(out)
    if start is not None:
        model.load_state_dict(params, strict=False)
    # on the device before the optimizer is built: CPU -> XLA replaces the Parameter objects (no set_data between
    # those tensor types), and an optimizer built earlier would step the stale CPU copies
    model.to(dev)
    Opt = torch.optim.AdamW if cfg["optimizer"] == "adamw" else torch.optim.Adam
    opt = Opt(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg["weight_decay"])
    if start is not None:
        opt.load_state_dict(state["optimizer"])
        if master:  # forget log rows from after the checkpoint: they will be written again
            rows = [r for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if r["step"] <= start]
            common.atomic_write(os.path.join(out, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
            common.progress(f"resuming {out} from step {start}")
        start += 1
    else:
        start = 0
    _move_optimizer_state(opt, dev)
    fwd = torch.compile(model) if cfg["compile"] else model
    if ddp:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd)

    ckpts = set(checkpoint_steps(N, cfg["n_log"], cfg["n_lin"], cfg["ckpt_every"]))
    eval_data = task.eval_data(common.derive_seed(cfg["eval_seed"], 1), cfg["eval_batch_size"])
    gen = torch.Generator(device=dev if dev.type in ("cpu", "cuda") else "cpu")
    local_bs = cfg["batch_size"] // world
    micro = cfg["micro_batch"] if 0 < cfg["micro_batch"] < local_bs else local_bs
    last = min(cfg["stop_at"] if cfg["stop_at"] >= 0 else N - 1, N - 1)
    bar = common.Progress("train", last + 1 - start, "steps")
    row, t_last, steps_since = {}, time.time(), 0
    step_grads = hand_derived(cfg, model, task, gen, local_bs, dev, ddp)
    for step in range(start, last + 1):
        gen.manual_seed(common.derive_seed(cfg["seed"], rank, step))
        xs, ys = (x.to(dev) for x in task.sample(gen, local_bs))
        for g in opt.param_groups:
            g["lr"] = lr_for(cfg, step)
        opt.zero_grad(set_to_none=True)
        for i in range(0, local_bs, micro):  # gradient accumulation: the same mean-loss gradient as one pass
            x, y = xs[i:i + micro], ys[i:i + micro]
            if step_grads is not None:
                loss_i = step_grads(x, y, len(y) / local_bs)
            else:
                loss_i = task.loss(fwd(task.model_input(x, y)), y) * (len(y) / local_bs)
                loss_i.backward()
            loss = loss_i.detach() if i == 0 else loss + loss_i.detach()
        opt.step()
        if dev.type == "xla":
            import torch_xla.core.xla_model as xm  # optional dependency (TPU)
            xm.mark_step()
        steps_since += 1
        if master and step % cfg["log_interval"] == 0:
            common.append_jsonl(os.path.join(out, "log.jsonl"),
                                {"step": step, "kind": "train", "loss": loss.item(), "lr": lr_for(cfg, step)})
        if step in ckpts and master:
            step_time = (time.time() - t_last) / steps_since
            model.eval()
            row = {"step": step, "kind": "eval",
                   **evaluate(model, eval_data, task), "lr": lr_for(cfg, step), "step_time": step_time}
            model.train()
            # the log row first: a kill between the two leaves a row past the newest checkpoint, which a resume
            # drops and writes again (the other order could lose the row of the checkpoint it resumes from)
            common.append_jsonl(os.path.join(out, "log.jsonl"), row)
            common.save_checkpoint(out, step, model, {"optimizer": _cpu(opt.state_dict()), "step": step})
            bar.update(step + 1 - start, f"step {step}: test loss {row['loss']:.4f}, lr {row['lr']:.2e}", force=True)
            t_last, steps_since = time.time(), 0
        elif master:
            bar.update(step + 1 - start, f"step {step}")
    if ddp:  # the master may still be writing: no rank tears its connections down before all are done
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if master:
        common.progress(f"done: {out} (config.json, log.jsonl, checkpoints/) in {common.fmt_time(time.time() - bar.t0)}")
    return row


def wants_fast_grad(setting, dev):
    """--fast_grad as given (True/False; "True"/"False" from the command line); auto: on CPU only,
    where train.py with the hand-derived gradient ran 1.27x autograd's steps/s; on CUDA 0.68x
    (bench.py on an H200: 155.8 vs 227.6). When on, the match check against autograd still runs."""
    return dev.type == "cpu" if setting == "auto" else setting in (True, "True")


def hand_derived(cfg, model, task, gen, rows, dev, ddp):
    """The task's hand-derived gradient as step_grads(x, y, w) -> w * loss (w * its gradient into .grad), once it
    matched autograd on a batch; None (autograd) when off, unavailable (DDP, compile, XLA) or failing (one warning)."""
    if (not wants_fast_grad(cfg["fast_grad"], dev) or getattr(task, "batched_grad", None) is None
            or ddp or cfg["compile"] or dev.type == "xla"):
        return None
    params = dict(model.named_parameters())
    gen.manual_seed(common.derive_seed(cfg["seed"], 0x7E57))  # a check batch outside the training stream
    batch = tuple(x.to(dev) for x in task.sample(gen, min(rows, 64)))
    bad = fast.batched_grad_mismatch(data.RunLoss(model, task), {k: v.detach() for k, v in params.items()},
                                     list(params), batch)
    if bad:
        warnings.warn(f"train.py: the hand-derived gradient disagrees with autograd ({bad}): has the model's code "
                      "changed? Training with autograd; --fast_grad=False silences this")
        return None

    def step_grads(x, y, w):
        loss, g = task.batched_grad(model.cfg, {k: v.detach()[None] for k, v in params.items()}, x[None], y[None])
        for k, p in params.items():
            p.grad = g[k][0] * w if p.grad is None else p.grad + g[k][0] * w
        return loss[0] * w
    return step_grads


def evaluate(model, batch, task):
    """The task's checkpoint metrics on the fixed eval data, on the model's device (XLA: on a CPU copy, which keeps
    the XLA graphs small; model.cpu() would replace the parameters the optimizer holds)."""
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


def main(argv):
    if not argv:
        common.progress("no config given: running the CPU demo (the defaults, as configs/tiny.py)")
    cfg = common.parse_args("train.py", __doc__ + USAGE, DEFAULTS, argv, sources=SOURCES, choices=CHOICES)
    if cfg["device"] == "cpu" or (cfg["device"] == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))  # tiny models: 1 thread is fastest
    common.tune_malloc()  # without it glibc maps and unmaps every ~1 MB activation: 6x the page faults of autograd
    try:
        train(cfg)
    except (common.ConfigError, FileNotFoundError) as e:
        common.fail("train.py", e)


if __name__ == "__main__":
    main(sys.argv[1:])
