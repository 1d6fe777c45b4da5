"""Train the paper's in-context linear regression transformer.

    python train.py                                   # the CPU demo (configs/tiny.py)
    python train.py configs/L2H4.py --seed=3          # the paper's run (regression.md §5)
    python train.py configs/L2H4.py --stop_at=40292   # its first 40k steps, schedule unchanged
    torchrun --nproc_per_node=2 train.py configs/tiny.py   # DDP; the global batch is split across ranks

Re-running the same command resumes from the last complete checkpoint, bit-identically on CPU: the data
of step t are drawn from a generator seeded by (seed, rank, t), so only the weights and Adam's moments
need saving. Outputs: see common.py.
"""
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

import common
from data import Task, regression_metrics, to_tokens
from model import build_model

# ----------------------------------------------------------------------------- defaults (the paper)
out_dir = "out/L2H4-s0"
seed = 0                # model init (torch.manual_seed) and the training data stream
# task
D = 4
K = 8
sigma2 = 0.125          # noise variance (std = sqrt(sigma2))
num_tasks = 0           # size M of the task prior; 0 = infinite (a fresh task per sequence)
task_seed = 0           # draws the M tasks of a finite prior
# model
n_layer = 2
n_head = 4
d_model = 64
d_mlp = 64
# optimisation: Adam(0.9, 0.999, 1e-8), no weight decay, one-cycle triangle peaking at max_steps/2 - 1
lr = 3e-3
batch_size = 256
max_steps = 500_000
stop_at = -1            # stop after this step (>= 0) while the schedule keeps its full length
# checkpoints at int(logspace(0, log10 N, n_log)) U int(linspace(0, N, n_lin)), N = max_steps
n_log = 100
n_lin = 100
# logging and evaluation
log_interval = 100
eval_batch_size = 1024
eval_seed = 0
# system
device = "auto"         # auto | cpu | cuda | xla
compile = False
tf32 = False
# ---------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
RESUME_MAY_CHANGE = {"stop_at", "device", "compile", "tf32", "log_interval"}


def lr_at(step, peak, total):
    """torch's OneCycleLR(pct_start=0.5, linear, div = final_div = total/2 - 1): a triangle from peak/div up to
    peak at step total/2 - 1, then down to peak/div^2 at step total - 1 (regression.md §5)."""
    div = total / 2 - 1
    lo, top = peak / div, total / 2 - 1
    if step <= top:
        return lo + (peak - lo) * step / top
    return peak + (lo / div - peak) * (step - top) / (total - 1 - top)


def checkpoint_steps(total, n_log=100, n_lin=100):
    """The reference's checkpoint set: int-truncated log- and linear-spaced steps below `total`."""
    s = {int(v) for v in np.logspace(0, np.log10(total), n_log)} | {int(v) for v in np.linspace(0, total, n_lin)}
    return sorted(v for v in s if v < total)


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "xla":
        import torch_xla.core.xla_model as xm  # optional dependency, imported only when asked for
        return xm.xla_device()
    return torch.device(name)


def find_resume_step(out):
    """The newest checkpoint whose files both load; a broken newer one is skipped with a warning."""
    for step in reversed(common.list_checkpoints(out)):
        try:
            common.load_params(out, step)
            return step, common.load_state(out, step)
        except common.CheckpointError as e:
            warnings.warn(f"{e}; falling back to an earlier checkpoint")
    return None, None


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
    master = rank == 0
    out, N = cfg["out_dir"], cfg["max_steps"]
    dev = pick_device(cfg["device"])
    if cfg["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # --- the run's files: a new run writes config.json; a resumed one must match it
    cfg_path = os.path.join(out, "config.json")
    if os.path.exists(cfg_path):
        old = json.load(open(cfg_path))
        diff = {k: (old.get(k), v) for k, v in cfg.items() if k not in RESUME_MAY_CHANGE and old.get(k) != v}
        if diff:
            raise common.ConfigError(f"{out} holds a run with a different config (saved vs now: {diff}); "
                                     "use another out_dir or delete this one")
    elif master:
        common.atomic_write(cfg_path, json.dumps(cfg, indent=1))

    task = Task(cfg["D"], cfg["K"], cfg["sigma2"], cfg["num_tasks"], cfg["task_seed"])
    model = build_model(common.model_config(cfg), cfg["seed"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    start, state = find_resume_step(out)
    if start is not None:
        model.load_state_dict(common.load_params(out, start), strict=False)
        opt.load_state_dict(state["optimizer"])
        if master:  # forget log rows from after the checkpoint: they will be written again
            rows = [r for r in common.read_jsonl(os.path.join(out, "log.jsonl")) if r["step"] <= start]
            common.atomic_write(os.path.join(out, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
            common.progress(f"resuming {out} from step {start}")
        start += 1
    else:
        start = 0
    model.to(dev)
    _move_optimizer_state(opt, dev)
    fwd = torch.compile(model) if cfg["compile"] else model
    if ddp:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd)

    ckpts = set(checkpoint_steps(N, cfg["n_log"], cfg["n_lin"]))
    eval_batch = task.eval_batch(common.derive_seed(cfg["eval_seed"], 1), cfg["eval_batch_size"])
    gen = torch.Generator(device=dev if dev.type in ("cpu", "cuda") else "cpu")
    local_bs = cfg["batch_size"] // world
    last = cfg["stop_at"] if cfg["stop_at"] >= 0 else N - 1
    row, t0, t_last, steps_since = {}, time.time(), time.time(), 0
    for step in range(start, min(last, N - 1) + 1):
        gen.manual_seed(common.derive_seed(cfg["seed"], rank, step))
        xs, ys = task.sample(gen, local_bs, gen.device)
        xs, ys = xs.to(dev), ys.to(dev)
        loss = Task.loss(fwd(to_tokens(xs, ys)), ys)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg["lr"], N)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "xla":
            import torch_xla.core.xla_model as xm
            xm.mark_step()
        steps_since += 1
        if master and step % cfg["log_interval"] == 0:
            common.append_jsonl(os.path.join(out, "log.jsonl"),
                                {"step": step, "kind": "train", "loss": loss.item(), "lr": lr_at(step, cfg["lr"], N)})
        if step in ckpts and master:
            step_time = (time.time() - t_last) / steps_since
            model.eval()
            row = {"step": step, "kind": "eval",
                   **evaluate(model, eval_batch, task), "lr": lr_at(step, cfg["lr"], N), "step_time": step_time}
            model.train()
            common.save_checkpoint(out, step, model, {"optimizer": _cpu(opt.state_dict()), "step": step})
            common.append_jsonl(os.path.join(out, "log.jsonl"), row)
            done, todo = step + 1 - start, last + 1 - start
            eta = (time.time() - t0) / done * (todo - done)
            common.progress(f"step {step:>7d}/{last} | test loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                            f"{1 / step_time:.0f} steps/s | ETA {_fmt(eta)}")
            t_last, steps_since = time.time(), 0
    if ddp:
        torch.distributed.destroy_process_group()
    if master:
        common.progress(f"done: {out} (config.json, log.jsonl, checkpoints/) in {_fmt(time.time() - t0)}")
    return row


def evaluate(model, batch, task):
    """Metrics on the fixed eval batch, computed on CPU (checkpoints are rare; keeps XLA graphs small)."""
    dev = next(model.parameters()).device
    model.cpu()
    try:
        return regression_metrics(model, batch, task.sigma2, task.tasks)
    finally:
        model.to(dev)


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


def _fmt(sec):
    return f"{sec / 3600:.1f}h" if sec > 3600 else f"{sec / 60:.1f}m" if sec > 60 else f"{sec:.0f}s"


def main(argv):
    if not argv:
        argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")]
        common.progress(f"no config given: running the CPU demo {argv[0]}")
    try:
        cfg = common.configure(DEFAULTS, argv)
    except common.ConfigError as e:
        sys.exit(f"config error: {e}")
    if cfg["device"] == "cpu" or (cfg["device"] == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))  # tiny models: 1 thread is fastest
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
