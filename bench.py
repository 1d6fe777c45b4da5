"""Throughput of the LLC sampler (sgld: ours vs a plain loop vs devinterp) and of training (train: train.py vs plain
loops) on this machine, side by side in one run, rounds interleaved so that load changes hit all alike; also peak
(fp32 matmul yardstick) and memory (llc.py sweep RSS). --quick and --device=cuda preset some defaults (QUICK, CUDA)."""
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import common
import data
import sgld
from fast import icl_loss_and_grads
from model import ICLConfig, build_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEVINTERP_PY = os.environ.get("DEVINTERP_PYTHON", "/work/venvs/devinterp/bin/python")
DEFAULTS = dict(
    device="cpu",                       # cpu | cuda (the GPU run: more SGLD/train steps, no memory section)
    sections="peak,train,sgld,memory",  # comma-separated: peak, train, sgld, memory
    quick=False,                        # a smoke run in seconds: tiny sizes, the numbers mean nothing
    ckpt="",                            # run folder of the sgld/memory checkpoint (default: the train section's model)
    step=-1,                            # its checkpoint step (-1: the last)
    threads="1,all",                    # sgld CPU thread counts (ours: chain workers, others: intra-op); rest: first
    chains=8,                           # SGLD chains
    batch=1024,                         # SGLD rows per chain and step
    burnin=20,                          # SGLD burn-in steps per chain
    draws=60,                           # SGLD draws per chain
    rounds=2,                           # interleaved rounds of train and sgld (sgld seeds seed, seed+1, ...)
    n=32768,                            # rows of the fixed data set all SGLD samplers share
    epsilon=1e-3,                       # SGLD step size (v2 hyperparameters)
    gamma=6.0,                          # SGLD localisation strength
    nbeta=60.0,                         # SGLD n * inverse temperature
    seed=0,                             # data set and first round's chains
    modes_steps=4,                      # SGLD steps per chain in the chain-mode line
    train_steps=300,                    # S: train.py's time = (S+1)-step run minus 3-step run, over S-2 steps
    train_batch=256,                    # training batch size
    mem_ckpts=50,                       # checkpoints in the memory section's sweep
    mem_draws=2,                        # SGLD draws per checkpoint in that sweep
    devinterp_python=DEVINTERP_PY,      # python of devinterp's own venv ($DEVINTERP_PYTHON)
    devinterp_path=os.environ.get("DEVINTERP_PATH", ""),  # or: devinterp's source, on this python (.ci/peers)
    cuda_graph=True,                    # ours on CUDA: one SGLD step captured in a CUDA graph
    tf32=False,                         # allow TF32 matmuls
    md="",                              # also write the report to this Markdown file
    json="",                            # and the raw results to this JSON file
)
QUICK = dict(chains=2, batch=64, burnin=2, draws=4, rounds=1, n=512, modes_steps=2, train_steps=200,
             train_batch=32, mem_ckpts=5, mem_draws=1)
CUDA = dict(sections="peak,train,sgld", burnin=100, draws=400, train_steps=1000, modes_steps=20)


def icl_flops(cfg, batch, sliced=False, backward=True):
    """Matrix-product FLOPs of the regression transformer on `batch` sequences, forward (+ backward: twice more, but
    not the embedding's input). sliced: the hand-derived gradient's (last block, unembedding at the K x-rows only)."""
    K, d, H, F, V, L = cfg.K, cfg.d_model, cfg.n_head, cfg.d_mlp, cfg.D + 1, cfg.n_layer
    T, dh = 2 * K, d // H

    def block(tq):  # queries/outputs at tq rows, keys and values at T rows
        return T * d * 2 * d + tq * d * d + 2 * H * tq * T * dh + tq * d * d + 2 * tq * d * F

    emb = T * V * d
    fwd = 2 * (emb + (L - 1) * block(T) + block(K if sliced else T) + (K * d if sliced else T * d * V))
    return (3 * fwd - 2 * emb if backward else fwd) * batch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(on, fn, *args, **kw):
    """(fn's result, its wall time in seconds, the work on device `on` included)."""
    sync(on)
    t = time.perf_counter()
    out = fn(*args, **kw)
    sync(on)
    return out, time.perf_counter() - t


def measure_peak(device, quick=False):
    n = 512 if quick else (8192 if torch.device(device).type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = [timed(device, torch.mm, a, b)[1] for _ in range(7)]  # 2 warm-ups, then the best of 5
    return 2 * n ** 3 / min(times[2:])


def machine_line(device):
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.processor() or platform.machine())
    dev = (torch.cuda.get_device_name() if torch.device(device).type == "cuda"
           else f"CPU with {torch.get_num_threads()} torch thread(s)")
    return (f"{time.strftime('%Y-%m-%d %H:%M')} on {cpu} ({os.cpu_count()} cores visible); {dev}, torch "
            f"{torch.__version__}; load average {os.getloadavg()[0]:.2f}")


# -------------------------------------------------------------------------------------------- training
def bench_train(cfg, device, log):
    """Steps/s of train.py as it runs by default and with its other gradient (subprocesses; an
    (S+1)-step run minus a 3-step run, both with checkpoints and evals at steps 0, 1 and the last,
    leaves S-2 bare steps) and of plain loops at the same model and batch. train.py's default
    (--fast_grad=auto) is the hand-derived gradient on CPU, autograd elsewhere (227.6 vs 155.8
    steps/s on an H200); bench does not import train, so that rule is restated here."""
    S, bs, tmp = cfg["train_steps"], cfg["train_batch"], tempfile.mkdtemp(prefix="bench_train_")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    hand = torch.device(device).type == "cpu"  # the default's gradient: hand-derived on CPU only

    def train_py(total, name, fast):  # n_log = n_lin = 1: checkpoints at steps 0, 1 and total - 1 only
        cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--out_dir={os.path.join(tmp, name)}",
               f"--max_steps={total}", "--stop_at=-1", "--n_log=1", "--n_lin=1", "--eval_batch_size=64",
               "--log_interval=1000000000", f"--batch_size={bs}", f"--device={device}",
               *([] if fast is None else [f"--fast_grad={fast}"])]
        proc, t = timed(device, subprocess.run, cmd, env=env, cwd=HERE, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        return t

    def plain(hand_written):
        mcfg, task = ICLConfig(), data.Task()
        model = build_model(mcfg, 0).to(device)
        opt, params = torch.optim.Adam(model.parameters(), lr=1e-4), dict(model.named_parameters())
        gen = torch.Generator(device=device)

        def step(i):
            gen.manual_seed(i)
            xs, ys = task.sample(gen, bs)
            opt.zero_grad(set_to_none=True)
            if hand_written:  # the hand-derived gradient of the same loss, chain dimension 1
                g = icl_loss_and_grads(mcfg, {k: v.detach()[None] for k, v in params.items()}, xs[None], ys[None])[1]
                for k, v in params.items():
                    v.grad = g[k][0].reshape(v.shape)
            else:
                task.loss(model(task.model_input(xs, ys)), ys).backward()
            opt.step()
        for i in range(3):
            step(i)
        return timed(device, lambda: [step(i) for i in range(S)])[1]

    other = ("train.py --fast_grad=False (autograd)" if hand
             else "train.py --fast_grad=True (hand-derived)")
    names = [f"train.py ({'hand-derived' if hand else 'autograd'}, the default here)", other,
             "plain nn.Module + Adam loop", "plain loop, fast.icl_loss_and_grads gradient"]
    total = dict.fromkeys(names, 0.0)
    for r in range(cfg["rounds"]):
        for i, (k, fast) in enumerate(((names[0], None), (names[1], not hand))):  # None: no flag
            t3, tS = train_py(3, f"r{r}_{i}_short", fast), train_py(S + 1, f"r{r}_{i}_long", fast)
            if tS <= t3:
                raise RuntimeError(f"train.py timing failed: {S + 1} steps took {tS:.2f}s, 3 steps {t3:.2f}s; "
                                   "use more --train_steps")
            total[k] += tS - t3
        total[names[2]] += plain(False)
        total[names[3]] += plain(True)
    rows = {k: cfg["rounds"] * (S if k.startswith("plain") else S - 2) / v for k, v in total.items()}
    log(f"train: {', '.join(f'{k} {v:.1f} steps/s' for k, v in rows.items())}")
    sliced = (names[0] if hand else names[1], names[3])  # the hand-derived gradient's FLOPs
    return dict(steps=S, batch=bs, rounds=cfg["rounds"], steps_per_s=rows, default=names[0],
                flops_per_step={k: icl_flops(ICLConfig(), bs, sliced=k in sliced) for k in rows},
                model_dir=os.path.join(tmp, f"r{cfg['rounds'] - 1}_0_long"))


# ------------------------------------------------------------------------------------------------ SGLD
def plain_chains(model, tokens, ys, L0, *, epsilon, gamma, nbeta, chains, burnin, draws, batch, seed, device):
    """The straightforward sampler: one chain at a time, a copy of the nn.Module, autograd, a per-tensor update,
    minibatches from per-chain shuffles of the fixed set. Returns the chains' LLCs."""
    n, (a, b, c) = len(ys), sgld.sgld_coefficients(epsilon, gamma, nbeta)
    trace = np.zeros((chains, draws))
    for ch in range(chains):
        m = build_model(model.cfg, 0).to(device)
        m.load_state_dict(model.state_dict())
        ps = list(m.parameters())
        w0 = [p.detach().clone() for p in ps]
        gen = torch.Generator(device=device).manual_seed(common.derive_seed(seed, 7, ch))
        perm, pos = None, n
        for t in range(burnin + draws):
            if pos + batch > n:
                perm, pos = torch.randperm(n, generator=gen, device=device), 0
            idx, pos = perm[pos:pos + batch], pos + batch
            loss = torch.nn.functional.mse_loss(m(tokens[idx])[..., 0::2, 0], ys[idx])
            m.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p, p0 in zip(ps, w0):
                    p.add_(-a * p.grad - b * (p - p0) + c * torch.randn(p.shape, generator=gen, device=device))
            if t >= burnin:
                trace[ch, t - burnin] = loss.item()
    return nbeta * (trace.mean(1) - L0)


# Run by `python -c` in devinterp's environment: it imports only torch, devinterp and the project's
# model.py. One call per chain: devinterp's LLCEstimator raises at the first NaN loss, which ends
# the whole estimate, where ours and the plain loop go on and count that chain as diverged. Each
# call gets its chain's seed of the one-call run (seed=[s]): the chains of num_chains=C, seed=seed.
DEVINTERP_WORKER = r'''
import json, re, sys, time, warnings
warnings.filterwarnings("ignore")
from importlib.metadata import version
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from devinterp.optim.sgld import SGLD
from devinterp.slt.sampler import estimate_learning_coeff_with_summary
sys.path.insert(0, sys.argv[3])
from model import ICLConfig, build_model

s = torch.load(sys.argv[1], weights_only=True)
torch.set_num_threads(s["threads"])
dev = torch.device(s["device"])
model = build_model(ICLConfig(**s["model_cfg"]), 0)
model.load_state_dict(s["state_dict"])
model.to(dev)
tokens, ys = s["tokens"].to(dev), s["ys"].to(dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None


class Rows(Dataset):  # whole minibatches at once (__getitems__): the cheapest data path devinterp allows
    def __len__(self):
        return len(ys)

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx, device=dev)
        return tokens[idx], ys[idx]


def chain(seed):
    """(LLC, steps run) of one chain; on a NaN loss devinterp stops: (NaN, steps to that draw)."""
    try:
        res = estimate_learning_coeff_with_summary(
            model, loader, evaluate=lambda m, b: F.mse_loss(m(b[0])[..., 0::2, 0], b[1]),
            sampling_method=SGLD,
            optimizer_kwargs=dict(lr=s["epsilon"], localization=s["gamma"], nbeta=s["nbeta"]),
            num_chains=1, num_draws=s["draws"], num_burnin_steps=s["burnin"],
            init_loss=s["init_loss"], seed=[seed], device=dev, verbose=False)
        return float(res["llc-chain/0"]), s["burnin"] + s["draws"]
    except RuntimeError as e:
        nan = re.fullmatch(r"NaN detected in loss at chain \d+, draw (\d+)", str(e))
        if nan is None:
            raise
        return float("nan"), s["burnin"] + int(nan[1]) + 1


torch.manual_seed(s["seed"])
loader = DataLoader(Rows(), batch_size=s["batch"], shuffle=True, drop_last=True, collate_fn=lambda b: b)
sync()
t = time.perf_counter()
chains = [chain(seed) for seed in s["chain_seeds"]]
sync()
wall = time.perf_counter() - t
with open(sys.argv[2], "w") as f:
    json.dump(dict(wall=wall, steps=sum(n for _, n in chains), version=version("devinterp"),
                   torch=torch.__version__, per_chain=[llc for llc, _ in chains]), f)
'''


def run_devinterp(cfg, device, model, tokens, ys, L0, seed, threads):
    """devinterp's estimate_learning_coeff_with_summary in a separate process: its venv's python, or this python
    with --devinterp_path on its path. Returns (result, None), or (None, why not)."""
    path = cfg["devinterp_path"]
    py = sys.executable if path else cfg["devinterp_python"]
    if not (py and os.path.exists(py)):
        return None, f"devinterp skipped: no python at {py!r} (set --devinterp_python or $DEVINTERP_PYTHON)"
    env = {**os.environ, **common.tune_malloc(), "OMP_NUM_THREADS": str(threads)}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(path), env.get("PYTHONPATH")) if p)
    seeds = np.random.SeedSequence(seed).generate_state(cfg["chains"]).tolist()  # devinterp's own
    with tempfile.TemporaryDirectory(prefix="bench_devinterp_") as tmp:
        spec, out = os.path.join(tmp, "spec.pt"), os.path.join(tmp, "out.json")
        torch.save(dict(state_dict=model.state_dict(), model_cfg=vars(model.cfg), tokens=tokens.cpu(), ys=ys.cpu(),
                        init_loss=L0, seed=seed, threads=threads, device=str(device),
                        chain_seeds=seeds,
                        **{k: cfg[k] for k in ("epsilon", "gamma", "nbeta", "chains", "burnin", "draws", "batch")}),
                   spec)
        proc = subprocess.run([py, "-c", DEVINTERP_WORKER, spec, out, HERE], env=env, cwd=tmp, capture_output=True,
                              text=True)
        if proc.returncode:
            why = "skipped" if "No module named 'devinterp'" in proc.stderr else "failed"
            return None, f"devinterp {why} ({py}): {proc.stderr.strip()[-800:]}"
        with open(out) as f:
            return json.load(f), None


def chain_stats(per_chain):
    """Mean, sd and se (sd / sqrt(chains)) of the finite chains' LLCs; `diverged` counts the others:
    a chain whose loss went non-finite has a NaN LLC in all three samplers, and dropping it silently
    hid that (a mean over survivors only)."""
    x = np.asarray(per_chain, dtype=float)
    ok = x[np.isfinite(x)]
    sd = float(ok.std(ddof=1)) if len(ok) > 1 else float("nan")
    return dict(mean=float(ok.mean()) if len(ok) else float("nan"), std=sd,
                se=sd / math.sqrt(len(ok)) if len(ok) else float("nan"), chains=len(ok),
                diverged=len(x) - len(ok))


def llc_text(per_chain):
    """'llc M' over the finite chains, saying how many diverged (a plain mean of them is NaN)."""
    st = chain_stats(per_chain)
    n = st["chains"] + st["diverged"]
    if not st["chains"]:
        return f"llc - (all {n} chains diverged)"
    return f"llc {st['mean']:.2f}" + (f" ({st['diverged']} of {n} chains diverged)"
                                      if st["diverged"] else "")


def thread_counts(spec):
    """--threads: comma-separated counts; `all` is the number of cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return list(dict.fromkeys(cores if t == "all" else int(t) for t in str(spec).split(",") if t))


def estimate_or_nan(loss_fn, params, data_, **kw):
    """sgld.estimate_llc; where every chain diverged (it raises then) a stand-in with all-NaN chains
    and the call's wall time as sample time: that round counts as diverged chains, as elsewhere."""
    t = time.perf_counter()
    try:
        return sgld.estimate_llc(loss_fn, params, data_, **kw)
    except sgld.AllChainsDivergedError:
        sync(kw["device"])
        C, nan = kw["num_chains"], float("nan")
        out = dict(sample_time=time.perf_counter() - t, llc_per_chain=[nan] * C, llc_mean=nan,
                   llc_se=nan, nan_chains=list(range(C)), init_loss=nan, all_diverged=True)
        return [out] * len(params) if isinstance(params, list) else out


def bench_sgld(cfg, device, model, log):
    """Ours vs the plain loop vs devinterp: same checkpoint, fixed data set, L(w*) and hyperparameters, at each
    thread count, rounds interleaved; then every chain mode of ours briefly (and on CUDA: graphs, batching, TF32)."""
    task, dev, C, steps = data.Task(), torch.device(device), cfg["chains"], cfg["burnin"] + cfg["draws"]
    model = model.to(dev).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs, ys = task.sample(torch.Generator().manual_seed(common.derive_seed(cfg["seed"], 99)), cfg["n"])
    xs, ys = xs.to(dev), ys.to(dev)
    tokens = task.model_input(xs, ys)
    with torch.no_grad():  # L(w*) on the whole set, one value for all three
        L0 = sum(float(task.loss(model(tokens[i:i + 1024]), ys[i:i + 1024])) * len(ys[i:i + 1024])
                 for i in range(0, len(ys), 1024)) / len(ys)
    hp = dict(epsilon=cfg["epsilon"], gamma=cfg["gamma"], nbeta=cfg["nbeta"])
    loss_fn = data.RunLoss(model, task)

    def ours(p=params, **kw):
        return estimate_or_nan(loss_fn, p, (xs, ys), **{**dict(
            num_chains=C, num_burnin=0, batch_size=cfg["batch"], seed=cfg["seed"], device=dev), **hp, **kw})

    threads = thread_counts(cfg["threads"]) if dev.type == "cpu" else [torch.get_num_threads()]
    res = {(k, th): dict(time=0.0, steps=0, chains=[])
           for th in threads for k in ("ours", "plain", "devinterp")}
    notes, peaks, ours_mode, ours_L0 = [], {}, "every chain diverged", float("nan")
    for th in threads:
        torch.set_num_threads(th)
        peaks[th] = measure_peak(device, cfg["quick"])

    def add(k, th, r, t, per_chain, done=C * steps, **extra):
        """A round's time, chain-steps run (devinterp: fewer, it stops diverged chains) and LLCs."""
        res[k, th]["time"] += t
        res[k, th]["steps"] += done
        res[k, th]["chains"] += list(per_chain)
        res[k, th].update(extra)
        log(f"sgld round {r}, {th} thread(s): {k} {done / t:.2f} chain-steps/s, "
            f"{llc_text(per_chain)}")

    for r in range(cfg["rounds"]):
        seed = cfg["seed"] + r
        for th in threads:
            torch.set_num_threads(th)
            out = ours(num_draws=cfg["draws"], num_burnin=cfg["burnin"], seed=seed,
                       cuda_graph=cfg["cuda_graph"] and dev.type == "cuda" and sgld.triton is not None)
            add("ours", th, r, out["sample_time"], out["llc_per_chain"])
            if not out.get("all_diverged"):
                ours_mode = out["chain_mode"] + (" + CUDA graph" if out["cuda_graph"] else "")
                ours_L0 = out["init_loss"]
            pc, t = timed(dev, plain_chains, model, tokens, ys, L0, chains=C, burnin=cfg["burnin"],
                          draws=cfg["draws"], batch=cfg["batch"], seed=seed, device=dev, **hp)
            add("plain", th, r, t, pc)
            dv, msg = run_devinterp(cfg, dev, model, tokens, ys, L0, seed, th)
            if dv is None:
                notes.append(msg)
                log(msg)
                res.pop(("devinterp", th), None)
            elif ("devinterp", th) in res:
                add("devinterp", th, r, dv["wall"], dv["per_chain"], dv["steps"],
                    version=dv["version"])
    torch.set_num_threads(threads[0])
    table = {f"{k}@{th}": dict(sampler=k, threads=th, chain_steps_per_s=v["steps"] / v["time"],
                               **chain_stats(v["chains"]), **({"version": v["version"]} if "version" in v else {}))
             for (k, th), v in res.items()}
    modes, tf32 = ours_modes(ours, params, cfg, dev, log)
    full = icl_flops(ICLConfig(), cfg["batch"])
    return dict(table=table, modes=modes, notes=notes, ours_mode=ours_mode, L0=L0, ours_L0=ours_L0,
                peaks=peaks, tf32=tf32, flops=dict(plain=full, devinterp=full, ours=icl_flops(
                    ICLConfig(), cfg["batch"], sliced=ours_mode.startswith("native"))),
                settings=dict(chains=C, burnin=cfg["burnin"], draws=cfg["draws"], rounds=cfg["rounds"],
                              batch=cfg["batch"], n=cfg["n"], **hp))


def ours_modes(ours, params, cfg, dev, log):
    """Every chain mode of ours briefly, throughput only (and on CUDA: graphs, batched checkpoints,
    TF32's effect on the estimate). Returns (modes, tf32)."""
    modes, tf32, C, steps = {}, {}, cfg["chains"], cfg["burnin"] + cfg["draws"]
    for mode in ["native", "native_loop", "loop", "vmap"]:  # vmap is slow on CPU at large batch
        slow = mode == "vmap" and dev.type == "cpu" and cfg["batch"] * C > 2048 and not cfg["quick"]
        ms = max(2, cfg["modes_steps"] // 2) if slow else cfg["modes_steps"]
        modes[mode] = C * ms / ours(num_draws=ms, chain_mode=mode)["sample_time"]
        log(f"sgld mode {mode}: {modes[mode]:.2f} chain-steps/s")
    if dev.type == "cuda" and sgld.triton is not None:
        ms = cfg["modes_steps"] * 10
        for graph in (False, True):
            modes[f"native, cuda_graph={graph}"] = C * ms / ours(num_draws=ms, chain_mode="native",
                                                                 cuda_graph=graph)["sample_time"]
        for kb in (4, 16):  # checkpoints batched into one computation (copies of the one here)
            out = ours([params] * kb, num_draws=ms, chain_mode="native", cuda_graph=True)
            modes[f"native, cuda_graph, {kb} checkpoints batched"] = kb * C * ms / out[0]["sample_time"]
        keep = torch.backends.cuda.matmul.allow_tf32
        for on in (False, True):  # same seed, same chains' data and noise
            torch.backends.cuda.matmul.allow_tf32 = on
            out = ours(num_draws=cfg["draws"], num_burnin=cfg["burnin"])
            tf32[on] = dict(llc=out["llc_mean"], se=out["llc_se"], diverged=len(out["nan_chains"]),
                            chain_steps_per_s=C * steps / out["sample_time"])
        torch.backends.cuda.matmul.allow_tf32 = keep
    return modes, tf32


# ---------------------------------------------------------------------------------------------- memory
MEM_SCRIPT = """
import resource, runpy, sys
sys.path.insert(0, {here!r})
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
try:  # this process's own peak (ru_maxrss can inherit the peak of a big parent across fork + exec)
    kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("MAXRSS_KB", kb)
"""


def sweep_maxrss(run_dir, steps, extra):
    """Peak RSS (MB) of a fresh process running llc.py over the given checkpoints (rows to mem_<count>.jsonl)."""
    argv = [os.path.join(HERE, "llc.py"), f"--ckpt={run_dir}", f"--steps={','.join(map(str, steps))}",
            f"--out=mem_{len(steps)}.jsonl", *extra]
    proc = subprocess.run([sys.executable, "-c", MEM_SCRIPT.format(here=HERE, argv=argv)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llc sweep failed: {proc.stderr[-1000:]}")
    return int(proc.stdout.split("MAXRSS_KB")[-1].split()[0]) / 1024


def make_sweep_run(run_dir, model, num, cfg_run):
    """A run folder with `num` checkpoints: the model's parameters plus small seeded perturbations."""
    common.atomic_write(os.path.join(run_dir, "config.json"), json.dumps(cfg_run))
    m, gen = build_model(model.cfg, 0), torch.Generator().manual_seed(0)
    for s in range(num):
        with torch.no_grad():
            for p, p0 in zip(m.parameters(), model.parameters()):
                p.copy_(p0 + 1e-3 * torch.randn(p.shape, generator=gen))
        common.save_checkpoint(run_dir, s, m)


def bench_memory(cfg, model, log):
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as run:
        make_sweep_run(run, model.cpu(), cfg["mem_ckpts"], dict(vars(model.cfg), sigma2=0.125, num_tasks=0,
                                                               task_seed=0, seed=0))
        extra = [f"--num_chains={cfg['chains']}", f"--batch_size={cfg['batch']}", "--num_burnin=0",
                 f"--num_draws={cfg['mem_draws']}", f"--n={cfg['batch']}", "--device=cpu", "--epsilon=1e-3"]
        one, many = sweep_maxrss(run, [0], extra), sweep_maxrss(run, list(range(cfg["mem_ckpts"])), extra)
    log(f"memory: peak RSS {one:.0f} MB for 1 checkpoint, {many:.0f} MB for {cfg['mem_ckpts']}: "
        f"ratio {many / one:.3f}")
    return dict(one_mb=one, many_mb=many, checkpoints=cfg["mem_ckpts"], ratio=many / one, settings=" ".join(extra))


# ---------------------------------------------------------------------------------------------- report
def of(v):
    """'k of n': a table row's diverged chains of all its chains."""
    return f"{v['diverged']} of {v['chains'] + v['diverged']}"


def diverged(v):
    """'; k of n chains diverged' for a row whose chains did (its mean is over the others)."""
    return f"; {of(v)} chains diverged" if v.get("diverged") else ""


def compare(k, ours, v):
    """ours - v in combined standard errors, where that means something: not where chains diverged,
    as then each mean is over whichever chains survived, a biased and different subset in each."""
    if ours.get("diverged") or v.get("diverged"):
        return (f"LLC ours - {k}: not compared, chains diverged (ours {of(ours)}, {k} {of(v)}): "
                "the survivors' means are biased (tune --epsilon, --gamma here, or use --ckpt)")
    z = (ours["mean"] - v["mean"]) / math.hypot(ours["se"], v["se"])
    return f"LLC ours - {k}: {ours['mean'] - v['mean']:+.2f} = {z:+.2f} combined standard errors"


def report(results):
    L, peak = [f"Measured {results['machine']}", ""], results.get("peak")
    if peak:
        L += [f"fp32 matmul peak (best of 5 square matmuls): {peak / 1e9:.1f} GFLOP/s", ""]

    def rate(fl, per_s, pk):  # a FLOP rate, and its share of the peak pk
        r = fl * per_s
        return f"{r / 1e9:.1f} GFLOP/s" + (f" ({100 * r / pk:.0f}% of {pk / 1e9:.0f})" if pk else "")
    if "sgld" in results:
        s, st = results["sgld"], results["sgld"]["settings"]
        L += [f"SGLD on an L2H4 checkpoint: {st['chains']} chains x ({st['burnin']} burn-in + {st['draws']} draws) x "
              f"{st['rounds']} round(s), batch {st['batch']}, fixed set of {st['n']} sequences, eps {st['epsilon']:g}, "
              f"gamma {st['gamma']:g}, nbeta {st['nbeta']:g}; L(w*) = {s['L0']:.5f} (ours: {s['ours_L0']:.5f})", "",
              "| sampler | threads | chain-steps/s | vs devinterp (same threads) | vs plain loop | GFLOP per "
              "chain-step | FLOP rate (% of peak at those threads) | LLC mean ± se (chain std) |", "|---" * 8 + "|"]
        names = {"ours": f"ours (sgld.py, {s['ours_mode']})", "plain": "plain one-chain loop (nn.Module, autograd)",
                 "devinterp": "devinterp"}
        tab = s["table"]
        for k, v in tab.items():
            r, th, fl = v["chain_steps_per_s"], v["threads"], s["flops"][v["sampler"]]
            dv, pl = tab.get(f"devinterp@{th}", {}).get("chain_steps_per_s"), tab[f"plain@{th}"]["chain_steps_per_s"]
            L.append(f"| {names[v['sampler']]}{' ' + v['version'] if 'version' in v else ''} | {th} | {r:.2f} | "
                     f"{f'{r / dv:.2f}x' if dv else '-'} | {r / pl:.2f}x | {fl / 1e9:.2f} | "
                     f"{rate(fl, r, s['peaks'].get(th))} | "
                     f"{v['mean']:.2f} ± {v['se']:.2f} ({v['std']:.2f}){diverged(v)} |")
        L += [f"\n{note}" for note in dict.fromkeys(s["notes"])]
        L += ["\n" + compare(k, tab["ours@%d" % v["threads"]], v)
              for k, v in tab.items() if v["sampler"] != "ours"]
        if s.get("tf32"):
            f, t = s["tf32"][False], s["tf32"][True]
            L += ["", f"TF32 matmuls (same seed): LLC {t['llc']:.2f} ± {t['se']:.2f} vs fp32 {f['llc']:.2f} ± "
                  f"{f['se']:.2f} ({(t['llc'] - f['llc']) / math.hypot(t['se'], f['se']):+.2f} combined se); "
                  f"{t['chain_steps_per_s']:.1f} vs {f['chain_steps_per_s']:.1f} chain-steps/s"
                  + (f"; chains diverged: {t['diverged']} vs {f['diverged']} of {st['chains']}"
                     if t.get("diverged") or f.get("diverged") else "")]
        L += ["", "Chain modes of ours (throughput only): " + ", ".join(f"{k} {v:.2f}" for k, v in s["modes"].items())
              + " chain-steps/s", ""]
    if "train" in results:
        t = results["train"]
        ref = t["steps_per_s"][t["default"]]
        L += [f"Training, L2H4, batch {t['batch']}, {t['steps']} steps x {t['rounds']} round(s), interleaved:", "",
              "| loop | steps/s | vs train.py's default | GFLOP per step | FLOP rate |",
              "|---" * 5 + "|"]
        L += [f"| {k} | {v:.2f} | {v / ref:.2f}x | {t['flops_per_step'][k] / 1e9:.3f} | "
              f"{rate(t['flops_per_step'][k], v, peak)} |" for k, v in t["steps_per_s"].items()] + [""]
    if "memory" in results:
        m = results["memory"]
        L.append(f"Memory: llc.py sweep peak RSS {m['one_mb']:.0f} MB over 1 checkpoint, {m['many_mb']:.0f} MB over "
                 f"{m['checkpoints']}: ratio {m['ratio']:.3f} ({m['settings']})")
    return "\n".join(L)


def main(argv):
    cfg = common.parse_args("bench.py", __doc__, DEFAULTS, argv, sources=[__file__])
    cuda = cfg["device"].startswith("cuda")
    if cuda and not torch.cuda.is_available():
        common.fail("bench.py", f"--device={cfg['device']}, but this torch ({torch.__version__}) sees no CUDA device")
    # the presets are defaults (CUDA: more steps, a GPU step is ~100x cheaper; memory is a CPU measurement)
    cfg = common.configure({**DEFAULTS, **(CUDA if cuda else {}), **(QUICK if cfg["quick"] else {})}, argv)
    device, sections, log = cfg["device"], [s for s in cfg["sections"].split(",") if s], common.progress
    if not cuda:  # train, peak and memory use the first count; sgld each in turn
        torch.set_num_threads(thread_counts(cfg["threads"])[0])
    if cfg["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    common.tune_malloc()
    results, t0 = {"machine": machine_line(device), "config": dict(cfg)}, time.time()
    if "peak" in sections:
        results["peak"] = measure_peak(device, cfg["quick"])
        log(f"peak: {results['peak'] / 1e9:.1f} GFLOP/s")
    run, step = cfg["ckpt"], cfg["step"]
    if "train" in sections or (not run and {"sgld", "memory"} & set(sections)):
        results["train"] = bench_train(cfg, device, log)
        run = run or results["train"]["model_dir"]
        if "train" not in sections:
            results.pop("train")
    if {"sgld", "memory"} & set(sections):
        model = data.load_model(run, step if step >= 0 else common.list_checkpoints(run)[-1])
        if "sgld" in sections:
            results["sgld"] = bench_sgld(cfg, device, model, log)
        if "memory" in sections:
            results["memory"] = bench_memory(cfg, model, log)
    results["seconds"] = time.time() - t0
    text = report(results)
    print(text)
    if cfg["md"]:
        common.atomic_write(cfg["md"], f"# Benchmark (bench.py)\n\n`python bench.py {' '.join(argv)}`\n\n{text}\n")
    if cfg["json"]:
        common.atomic_write(cfg["json"], json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
