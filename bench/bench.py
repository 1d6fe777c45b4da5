"""Throughput of the LLC sampler (sgld: ours vs a plain loop vs devinterp) and of training (train:
train.py vs plain loops) on this machine, side by side in one run, rounds interleaved so that load
changes hit all alike; also peak (fp32 matmul yardstick) and memory (llc.py sweep RSS). --quick and
--device=cuda preset some defaults (QUICK, CUDA). --threads: the sgld section runs at each count in
turn (ours: chain workers, the others: torch's intra-op threads); the other sections at the first.
Run from anywhere as `python bench/bench.py [--key=value ...]`."""
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# `python bench/bench.py` puts bench/ first on the path, not the repository root, where the
# modules measured here live (common, data, sgld, fast, model): so the root goes first.
sys.path.insert(0, ROOT)

import common  # noqa: E402
import data  # noqa: E402
import sgld  # noqa: E402
from fast import icl_loss_and_grads, triton  # noqa: E402
from fast.memory import tune_malloc  # noqa: E402
from analysis import susceptibility  # noqa: E402
from model import ICLConfig  # noqa: E402
from report import report  # noqa: E402

WORKER = os.path.join(HERE, "devinterp_worker.py")  # run by devinterp's python (run_devinterp)
DEVINTERP_PY = os.environ.get("DEVINTERP_PYTHON", "/work/venvs/devinterp/bin/python")
DEVINTERP_PATH = os.environ.get("DEVINTERP_PATH", "")
DEFAULTS = dict(
    device="cpu",                       # cpu | cuda (CUDA preset: more steps, no memory section)
    sections="peak,train,sgld,memory",  # comma-separated: peak, train, sgld, memory, observe
    quick=False,                        # a smoke run in seconds: tiny sizes, meaningless numbers
    ckpt="",                            # run folder of the sgld/memory model ('': train's model)
    step=-1,                            # its checkpoint step (-1: the last)
    threads="1,all",                    # sgld's CPU thread counts in turn; the rest: the first
    chains=8,                           # SGLD chains
    batch=1024,                         # SGLD rows per chain and step
    burnin=20,                          # SGLD burn-in steps per chain
    draws=60,                           # SGLD draws per chain
    rounds=2,                           # interleaved rounds of train and sgld (round r: seed + r)
    n=32768,                            # rows of the fixed data set all SGLD samplers share
    epsilon=1e-3,                       # SGLD step size (v2 hyperparameters)
    gamma=6.0,                          # SGLD localisation strength
    nbeta=60.0,                         # SGLD n * inverse temperature
    seed=0,                             # data set and first round's chains
    modes_steps=4,                      # SGLD steps per chain in the chain-mode line
    train_steps=300,                    # S: train.py's (S+1)-step minus 3-step run, over S-2 steps
    train_batch=256,                    # training batch size
    mem_ckpts=50,                       # checkpoints in the memory section's sweep
    mem_draws=2,                        # SGLD draws per checkpoint in that sweep
    probes="ood_inputs/3,tasks/64,positions",  # observe: the probe distributions (llc.py --probes)
    probe_rows=512,                     # observe: rows per probe set
    bif_rows=64,                        # observe: per-sample losses of as many rows and queries
    observe_every=20,                   # observe: the probes at every k-th draw
    observe_batch=128,                  # observe: SGLD rows per chain and step (llc_cpu.py's)
    devinterp_python=DEVINTERP_PY,      # python of devinterp's own venv ($DEVINTERP_PYTHON)
    devinterp_path=DEVINTERP_PATH,      # or: devinterp's source, on this python (.ci/peers)
    cuda_graph=True,                    # ours on CUDA: one SGLD step captured in a CUDA graph
    tf32=False,                         # allow TF32 matmuls
    md="",                              # also write the report to this Markdown file
    json="",                            # and the raw results to this JSON file
)
QUICK = dict(chains=2, batch=64, burnin=2, draws=4, rounds=1, n=512, modes_steps=2,
             train_steps=200, train_batch=32, mem_ckpts=5, mem_draws=1, probe_rows=32,
             bif_rows=4, observe_every=2, observe_batch=16)
CUDA = dict(sections="peak,train,sgld", burnin=100, draws=400, train_steps=1000, modes_steps=20)


def icl_flops(cfg, batch, sliced=False, backward=True):
    """Matrix-product FLOPs of the regression transformer on `batch` sequences, forward (+ backward:
    twice more, but not the embedding's input). sliced: the hand-derived gradient's (last block,
    unembedding at the K x-rows only)."""
    K, d, H, F, V, L = cfg.K, cfg.d_model, cfg.n_head, cfg.d_mlp, cfg.D + 1, cfg.n_layer
    T, dh = 2 * K, d // H

    def block(tq):  # queries/outputs at tq rows, keys and values at T rows
        return T * d * 2 * d + tq * d * d + 2 * H * tq * T * dh + tq * d * d + 2 * tq * d * F

    emb = T * V * d
    last = block(K) + K * d if sliced else block(T) + T * d * V
    fwd = 2 * (emb + (L - 1) * block(T) + last)
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
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                if ln.startswith("model name")), platform.processor() or platform.machine())
    dev = (torch.cuda.get_device_name() if torch.device(device).type == "cuda"
           else f"CPU with {torch.get_num_threads()} torch thread(s)")
    return (f"{time.strftime('%Y-%m-%d %H:%M')} on {cpu} ({os.cpu_count()} cores visible); "
            f"{dev}, torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")


# ------------------------------------------------------------------------------------ training
def time_train_py(out_dir, total, batch, device, fast):
    """Wall time of a `total`-step train.py run in a subprocess, checkpoints at steps 0, 1 and
    total - 1 only (n_log = n_lin = 1). fast: its --fast_grad (None: no flag, the default)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}",
           f"--max_steps={total}", "--stop_at=-1", "--n_log=1", "--n_lin=1",
           "--eval_batch_size=64", "--log_interval=1000000000", f"--batch_size={batch}",
           f"--device={device}", *([] if fast is None else [f"--fast_grad={fast}"])]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc, t = timed(device, subprocess.run, cmd, env=env, cwd=ROOT, capture_output=True,
                    text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return t


def time_plain_loop(steps, batch, device, hand_written):
    """Wall time of `steps` steps of a plain training loop (after 3 untimed ones): the default
    model, Adam, autograd or (hand_written) the hand-derived gradient of the same loss."""
    mcfg, task = ICLConfig(), data.Task()
    model = mcfg.build(0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    params, gen = dict(model.named_parameters()), torch.Generator(device=device)

    def step(i):
        gen.manual_seed(i)
        xs, ys = task.sample(gen, batch)
        opt.zero_grad(set_to_none=True)
        if hand_written:  # chain dimension 1
            w = {k: v.detach()[None] for k, v in params.items()}
            g = icl_loss_and_grads(mcfg, w, xs[None], ys[None])[1]
            for k, v in params.items():
                v.grad = g[k][0].reshape(v.shape)
        else:
            task.loss(model(task.model_input(xs, ys)), ys).backward()
        opt.step()
    for i in range(3):
        step(i)
    return timed(device, lambda: [step(i) for i in range(steps)])[1]


def bench_train(cfg, device, log):
    """Steps/s of train.py as the paper's config runs it (--fast_grad=auto, configs/L2H4.py) and
    with its other gradient (subprocesses; an (S+1)-step run minus a 3-step run, both with
    checkpoints and evals at steps 0, 1 and the last, leaves S-2 bare steps) and of plain loops at
    the same model and batch. auto is the hand-derived gradient on CPU, autograd elsewhere (227.6
    vs 155.8 steps/s on an H200); bench does not import train, so that rule is restated here."""
    S, bs, tmp = cfg["train_steps"], cfg["train_batch"], tempfile.mkdtemp(prefix="bench_train_")
    hand = torch.device(device).type == "cpu"  # auto's gradient: hand-derived on CPU only
    other = ("train.py --fast_grad=False (autograd)" if hand
             else "train.py --fast_grad=True (hand-derived)")
    names = [f"train.py --fast_grad=auto ({'hand-derived' if hand else 'autograd'} here)", other,
             "plain nn.Module + Adam loop", "plain loop, fast.icl_loss_and_grads gradient"]
    total = dict.fromkeys(names, 0.0)
    for r in range(cfg["rounds"]):
        for i, (k, fast) in enumerate(((names[0], "auto"), (names[1], not hand))):
            run = os.path.join(tmp, f"r{r}_{i}")
            t3 = time_train_py(run + "_short", 3, bs, device, fast)
            tS = time_train_py(run + "_long", S + 1, bs, device, fast)
            if tS <= t3:
                raise RuntimeError(f"train.py timing failed: {S + 1} steps took {tS:.2f}s, "
                                   f"3 steps {t3:.2f}s; use more --train_steps")
            total[k] += tS - t3
        total[names[2]] += time_plain_loop(S, bs, device, False)
        total[names[3]] += time_plain_loop(S, bs, device, True)
    rows = {k: cfg["rounds"] * (S if k.startswith("plain") else S - 2) / v
            for k, v in total.items()}
    log(f"train: {', '.join(f'{k} {v:.1f} steps/s' for k, v in rows.items())}")
    sliced = (names[0] if hand else names[1], names[3])  # the hand-derived gradient's FLOPs
    return dict(steps=S, batch=bs, rounds=cfg["rounds"], steps_per_s=rows, default=names[0],
                flops_per_step={k: icl_flops(ICLConfig(), bs, sliced=k in sliced) for k in rows},
                model_dir=os.path.join(tmp, f"r{cfg['rounds'] - 1}_0_long"))


# ---------------------------------------------------------------------------------------- SGLD
def plain_chains(model, tokens, ys, L0, *, epsilon, gamma, nbeta, chains, burnin, draws, batch,
                 seed, device):
    """The straightforward sampler: one chain at a time, a copy of the nn.Module, autograd, a
    per-tensor update, minibatches from per-chain shuffles of the fixed set. Returns the chains'
    LLCs."""
    n, (a, b, c) = len(ys), sgld.sgld_coefficients(epsilon, gamma, nbeta)
    trace = np.zeros((chains, draws))
    for ch in range(chains):
        m = model.cfg.build(0).to(device)
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
                    noise = torch.randn(p.shape, generator=gen, device=device)
                    p.add_(-a * p.grad - b * (p - p0) + c * noise)
            if t >= burnin:
                trace[ch, t - burnin] = loss.item()
    return nbeta * (trace.mean(1) - L0)


def run_devinterp(cfg, device, model, tokens, ys, L0, seed, threads):
    """devinterp's estimate_learning_coeff_with_summary in a separate process (devinterp_worker.py):
    its venv's python, or this python with --devinterp_path on its path. Returns (result, None),
    or (None, why not)."""
    path = cfg["devinterp_path"]
    py = sys.executable if path else cfg["devinterp_python"]
    if not (py and os.path.exists(py)):
        return None, (f"devinterp skipped: no python at {py!r} "
                      "(set --devinterp_python or $DEVINTERP_PYTHON)")
    env = {**os.environ, **tune_malloc(), "OMP_NUM_THREADS": str(threads)}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(path),
                                                        env.get("PYTHONPATH")) if p)
    seeds = np.random.SeedSequence(seed).generate_state(cfg["chains"]).tolist()  # devinterp's own
    hp = {k: cfg[k] for k in ("epsilon", "gamma", "nbeta", "chains", "burnin", "draws", "batch")}
    with tempfile.TemporaryDirectory(prefix="bench_devinterp_") as tmp:
        spec, out = os.path.join(tmp, "spec.pt"), os.path.join(tmp, "out.json")
        torch.save(dict(state_dict=model.state_dict(), model_cfg=vars(model.cfg),
                        tokens=tokens.cpu(), ys=ys.cpu(), init_loss=L0, seed=seed,
                        threads=threads, device=str(device), chain_seeds=seeds, **hp), spec)
        proc = subprocess.run([py, WORKER, spec, out, ROOT], env=env, cwd=tmp,
                              capture_output=True, text=True)
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


def fixed_set(cfg, task, model, dev):
    """The fixed data set all samplers share (xs, ys), its model input and L(w*) on all of it."""
    gen = torch.Generator().manual_seed(common.derive_seed(cfg["seed"], 99))
    xs, ys = task.sample(gen, cfg["n"])
    xs, ys = xs.to(dev), ys.to(dev)
    tokens = task.model_input(xs, ys)
    with torch.no_grad():  # L(w*) on the whole set, one value for all three
        parts = [(float(task.loss(model(tokens[i:i + 1024]), ys[i:i + 1024])), len(ys[i:i + 1024]))
                 for i in range(0, len(ys), 1024)]
    return xs, ys, tokens, sum(loss * n for loss, n in parts) / len(ys)


def sgld_rounds(cfg, dev, threads, ours, plain, devinterp, log):
    """The interleaved rounds: in each, at each thread count, ours, the plain loop and devinterp
    (dropped at its first failure). Returns (per (sampler, threads): time, chain-steps and LLCs;
    notes; ours' chain mode and L(w*), from its last round where not every chain diverged)."""
    C, steps = cfg["chains"], cfg["burnin"] + cfg["draws"]
    res = {(k, th): dict(time=0.0, steps=0, chains=[])
           for th in threads for k in ("ours", "plain", "devinterp")}
    notes, ours_mode, ours_L0 = [], "every chain diverged", float("nan")
    graph = cfg["cuda_graph"] and dev.type == "cuda" and triton is not None

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
                       cuda_graph=graph)
            add("ours", th, r, out["sample_time"], out["llc_per_chain"])
            if not out.get("all_diverged"):
                ours_mode = out["chain_mode"] + (" + CUDA graph" if out["cuda_graph"] else "")
                ours_L0 = out["init_loss"]
            pc, t = plain(seed)
            add("plain", th, r, t, pc)
            dv, msg = devinterp(seed, th)
            if dv is None:
                notes.append(msg)
                log(msg)
                res.pop(("devinterp", th), None)
            elif ("devinterp", th) in res:
                add("devinterp", th, r, dv["wall"], dv["per_chain"], dv["steps"],
                    version=dv["version"])
    return res, notes, ours_mode, ours_L0


def bench_sgld(cfg, device, model, log):
    """Ours vs the plain loop vs devinterp: same checkpoint, fixed data set, L(w*) and
    hyperparameters, at each thread count, rounds interleaved; then every chain mode of ours
    briefly (and on CUDA: graphs, batching, TF32)."""
    task, dev, C = data.Task(), torch.device(device), cfg["chains"]
    model = model.to(dev).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs, ys, tokens, L0 = fixed_set(cfg, task, model, dev)
    hp = dict(epsilon=cfg["epsilon"], gamma=cfg["gamma"], nbeta=cfg["nbeta"])
    loss_fn = data.RunLoss(model, task)
    base = dict(num_chains=C, num_burnin=0, batch_size=cfg["batch"], seed=cfg["seed"], device=dev)

    def ours(p=params, **kw):
        return estimate_or_nan(loss_fn, p, (xs, ys), **{**base, **hp, **kw})

    def plain(seed):  # (LLCs, wall time)
        return timed(dev, plain_chains, model, tokens, ys, L0, chains=C, burnin=cfg["burnin"],
                     draws=cfg["draws"], batch=cfg["batch"], seed=seed, device=dev, **hp)

    def devinterp(seed, th):
        return run_devinterp(cfg, dev, model, tokens, ys, L0, seed, th)

    threads = thread_counts(cfg["threads"]) if dev.type == "cpu" else [torch.get_num_threads()]
    peaks = {}
    for th in threads:
        torch.set_num_threads(th)
        peaks[th] = measure_peak(device, cfg["quick"])
    res, notes, ours_mode, ours_L0 = sgld_rounds(cfg, dev, threads, ours, plain, devinterp, log)
    torch.set_num_threads(threads[0])
    table = {f"{k}@{th}": dict(sampler=k, threads=th, chain_steps_per_s=v["steps"] / v["time"],
                               **chain_stats(v["chains"]),
                               **({"version": v["version"]} if "version" in v else {}))
             for (k, th), v in res.items()}
    modes, tf32 = ours_modes(ours, params, cfg, dev, log)
    full = icl_flops(ICLConfig(), cfg["batch"])
    sliced = icl_flops(ICLConfig(), cfg["batch"], sliced=ours_mode.startswith("native"))
    settings = dict(chains=C, burnin=cfg["burnin"], draws=cfg["draws"], rounds=cfg["rounds"],
                    batch=cfg["batch"], n=cfg["n"], **hp)
    return dict(table=table, modes=modes, notes=notes, ours_mode=ours_mode, L0=L0,
                ours_L0=ours_L0, peaks=peaks, tf32=tf32,
                flops=dict(plain=full, devinterp=full, ours=sliced), settings=settings)


def ours_modes(ours, params, cfg, dev, log):
    """Every chain mode of ours briefly, throughput only (and on CUDA: graphs, batched checkpoints,
    TF32's effect on the estimate). Returns (modes, tf32)."""
    modes, C = {}, cfg["chains"]
    for mode in ["native", "native_loop", "loop", "vmap"]:  # vmap is slow on CPU at large batch
        slow = mode == "vmap" and dev.type == "cpu" and cfg["batch"] * C > 2048 and not cfg["quick"]
        ms = max(2, cfg["modes_steps"] // 2) if slow else cfg["modes_steps"]
        modes[mode] = C * ms / ours(num_draws=ms, chain_mode=mode)["sample_time"]
        log(f"sgld mode {mode}: {modes[mode]:.2f} chain-steps/s")
    if dev.type != "cuda" or triton is None:
        return modes, {}
    ms = cfg["modes_steps"] * 10
    for graph in (False, True):
        out = ours(num_draws=ms, chain_mode="native", cuda_graph=graph)
        modes[f"native, cuda_graph={graph}"] = C * ms / out["sample_time"]
    for kb in (4, 16):  # checkpoints batched into one computation (copies of the one here)
        out = ours([params] * kb, num_draws=ms, chain_mode="native", cuda_graph=True)
        modes[f"native, cuda_graph, {kb} checkpoints batched"] = kb * C * ms / out[0]["sample_time"]
    return modes, tf32_effect(ours, cfg)


def tf32_effect(ours, cfg):
    """Ours with and without TF32 matmuls, same seed, same chains' data and noise."""
    tf32, keep, steps = {}, torch.backends.cuda.matmul.allow_tf32, cfg["burnin"] + cfg["draws"]
    for on in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = on
        out = ours(num_draws=cfg["draws"], num_burnin=cfg["burnin"])
        tf32[on] = dict(llc=out["llc_mean"], se=out["llc_se"], diverged=len(out["nan_chains"]),
                        chain_steps_per_s=cfg["chains"] * steps / out["sample_time"])
    torch.backends.cuda.matmul.allow_tf32 = keep
    return tf32


# -------------------------------------------------------------------------------------- memory
MEM_SCRIPT = """
import resource, runpy, sys
sys.path.insert(0, {root!r})
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
try:  # this process's own peak (ru_maxrss can inherit the peak of a big parent across fork + exec)
    kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("MAXRSS_KB", kb)
"""


def sweep_maxrss(run_dir, steps, extra):
    """Peak RSS (MB) of a fresh process running llc.py over the given checkpoints (rows to
    mem_<count>.jsonl)."""
    argv = [os.path.join(ROOT, "llc.py"), f"--ckpt={run_dir}",
            f"--steps={','.join(map(str, steps))}", f"--out=mem_{len(steps)}.jsonl", *extra]
    proc = subprocess.run([sys.executable, "-c", MEM_SCRIPT.format(root=ROOT, argv=argv)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llc sweep failed: {proc.stderr[-1000:]}")
    return int(proc.stdout.split("MAXRSS_KB")[-1].split()[0]) / 1024


def make_sweep_run(run_dir, model, num, cfg_run):
    """A run folder with `num` checkpoints: the model's parameters plus small seeded
    perturbations."""
    common.atomic_write(os.path.join(run_dir, "config.json"), json.dumps(cfg_run))
    m, gen = model.cfg.build(0), torch.Generator().manual_seed(0)
    for s in range(num):
        with torch.no_grad():
            for p, p0 in zip(m.parameters(), model.parameters()):
                p.copy_(p0 + 1e-3 * torch.randn(p.shape, generator=gen))
        common.save_checkpoint(run_dir, s, m)


def bench_memory(cfg, model, log):
    """Peak RSS of an llc.py sweep over mem_ckpts checkpoints against one over a single one."""
    run_cfg = dict(vars(model.cfg), sigma2=0.125, num_tasks=0, task_seed=0, seed=0)
    extra = [f"--num_chains={cfg['chains']}", f"--batch_size={cfg['batch']}", "--num_burnin=0",
             f"--num_draws={cfg['mem_draws']}", f"--n={cfg['batch']}", "--device=cpu",
             "--epsilon=1e-3"]
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as run:
        make_sweep_run(run, model.cpu(), cfg["mem_ckpts"], run_cfg)
        one = sweep_maxrss(run, [0], extra)
        many = sweep_maxrss(run, list(range(cfg["mem_ckpts"])), extra)
    log(f"memory: peak RSS {one:.0f} MB for 1 checkpoint, {many:.0f} MB for {cfg['mem_ckpts']}: "
        f"ratio {many / one:.3f}")
    return dict(one_mb=one, many_mb=many, checkpoints=cfg["mem_ckpts"], ratio=many / one,
                settings=" ".join(extra))


def bench_observe(cfg, run, model, log):
    """The cost of llc.py --probes: the same estimate (the run's stream, chain_mode auto) with and
    without the probes observed, rounds interleaved in this process; the ratio of sampling times."""
    task, dev = data.task_for(run), torch.device(cfg["device"])
    model = model.to(dev)
    params = {k: v.detach() for k, v in model.named_parameters()}
    probes = susceptibility.Probes(task, cfg["probes"], cfg["probe_rows"], 0, dev,
                                   cfg["bif_rows"])
    kw = dict(epsilon=cfg["epsilon"], gamma=cfg["gamma"], nbeta=cfg["nbeta"],
              num_chains=cfg["chains"], num_burnin=cfg["burnin"], num_draws=cfg["draws"],
              batch_size=cfg["observe_batch"], n=cfg["observe_batch"] * 16, chain_mode="auto",
              observe_every=cfg["observe_every"])
    times = {"plain": [], "probes": []}
    for r in range(cfg["rounds"]):
        for name, extra in (("plain", {}), ("probes", probes.settings(model))):
            res = sgld.estimate_llc(data.RunLoss(model, task), params, task.sample,
                                    seed=cfg["seed"] + r, **kw, **extra)
            times[name].append(res["sample_time"])
    ratio = sum(times["probes"]) / sum(times["plain"])
    log(f"observe: {cfg['probes']} ({cfg['probe_rows']} rows each, every {cfg['observe_every']} "
        f"draws, {cfg['bif_rows']} per-sample rows): {ratio:.2f}x the plain estimate's time")
    return dict(ratio=ratio, times=times, probes=cfg["probes"], probe_rows=cfg["probe_rows"],
                bif_rows=cfg["bif_rows"], every=cfg["observe_every"], mode=res["chain_mode"])


# ---------------------------------------------------------------------------------------- main
PROG = "bench/bench.py"


def options(argv):
    """The options: --help and bad options as every script's; the presets are defaults (CUDA:
    more steps, a GPU step is ~100x cheaper; memory is a CPU measurement), given options win."""
    cfg = common.parse_args(PROG, __doc__, DEFAULTS, argv, sources=[__file__])
    cuda = cfg["device"].startswith("cuda")
    if cuda and not torch.cuda.is_available():
        common.fail(PROG, f"--device={cfg['device']}, but this torch ({torch.__version__}) "
                          "sees no CUDA device")
    presets = {**DEFAULTS, **(CUDA if cuda else {}), **(QUICK if cfg["quick"] else {})}
    return common.configure(presets, argv)


def measure(cfg, sections, log):
    """The sections asked for, in order: peak, train (also where sgld or memory need its model),
    sgld, memory."""
    device, results = cfg["device"], {}
    if "peak" in sections:
        results["peak"] = measure_peak(device, cfg["quick"])
        log(f"peak: {results['peak'] / 1e9:.1f} GFLOP/s")
    run, step = cfg["ckpt"], cfg["step"]
    if "train" in sections or (not run and {"sgld", "memory", "observe"} & set(sections)):
        results["train"] = bench_train(cfg, device, log)
        run = run or results["train"]["model_dir"]
        if "train" not in sections:
            results.pop("train")
    if {"sgld", "memory", "observe"} & set(sections):
        model = data.load_model(run, step if step >= 0 else common.list_checkpoints(run)[-1])
        if "sgld" in sections:
            results["sgld"] = bench_sgld(cfg, device, model, log)
        if "memory" in sections:
            results["memory"] = bench_memory(cfg, model, log)
        if "observe" in sections:
            results["observe"] = bench_observe(cfg, run, model, log)
    return results


def main(argv):
    cfg = options(argv)
    sections = [s for s in cfg["sections"].split(",") if s]
    if not cfg["device"].startswith("cuda"):  # train, peak and memory: the first count
        torch.set_num_threads(thread_counts(cfg["threads"])[0])
    if cfg["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tune_malloc()
    results, t0 = {"machine": machine_line(cfg["device"]), "config": dict(cfg)}, time.time()
    results.update(measure(cfg, sections, common.progress))
    results["seconds"] = time.time() - t0
    text = report(results)
    print(text)
    if cfg["md"]:
        command = f"python {PROG} {' '.join(argv)}"
        common.atomic_write(cfg["md"], f"# Benchmark ({PROG})\n\n`{command}`\n\n{text}\n")
    if cfg["json"]:
        common.atomic_write(cfg["json"], json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
