"""Side-by-side throughput of the LLC sampler and of training, against simple baselines and the peer library.

    python bench.py                          # CPU: all sections, sgld at 1 thread and at all cores (~15 min)
    python bench.py --quick                  # a smoke run (seconds; numbers are not meaningful)
    python bench.py --device=cuda            # the GPU measurement, one command (~3-5 min): peak, train, sgld
                                             # with 100 burn-in + 400 draws x 2 rounds (devinterp if installed)
    python bench.py --sections=sgld --ckpt=out/tiny --step=2842 --draws=200
    python bench.py --md=notes/README_bench.md --json=bench.json

Sections (--sections, comma separated):
  peak    fp32 matmul peak of this device (a large square matmul, best of 5): the yardstick for FLOP rates.
  train   training steps/s of the L2H4 model at batch 256: train.py's own loop (train.train, checkpoint and eval
          cost removed by differencing two runs) vs a plain nn.Module + Adam loop, vs the plain loop with llc.py's
          hand-written gradient (what train.py could use).
  sgld    SGLD chain-steps/s on an L2H4 checkpoint at the v2 hyperparameters (eps 1e-3, gamma 6, nbeta 60),
          batch 1024, 8 chains: ours (llc.estimate_llc, auto mode) vs a plain one-chain-at-a-time nn.Module
          autograd loop vs devinterp 1.3.2 (estimate_learning_coeff_with_summary, run by the python of a separate
          virtual environment: --devinterp_python or $DEVINTERP_PYTHON, default /work/venvs/devinterp/bin/python;
          or, with --devinterp_path=<folder> ($DEVINTERP_PATH), devinterp's source put on this python's path;
          the column is skipped with a message when it is absent). All three sample the same fixed data set
          (shuffled minibatches) from the same checkpoint and L(w*); the runs are interleaved over --rounds rounds
          (different seeds) so that load changes hit all of them alike, and their LLCs are compared within
          standard errors (chain-level: std over chains / sqrt(chains)). Each at every --threads count (default
          "1,all"): ours spreads its chains over that many worker threads, the others get that many intra-op
          threads. Also every chain_mode of ours, briefly.
  memory  peak RSS of an llc.py sweep over 50 checkpoints vs over one (separate processes).
The checkpoint is --ckpt/--step, else the model trained by the train section (train.py's run, `--train_steps`).
FLOPs are counted analytically (matrix products only; checked against torch's FlopCounterMode in the tests).
"""
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
import llc
from bench_baselines import plain_chains, run_devinterp, sync
from data import Task, to_tokens
from model import ICLConfig, build_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = dict(
    device="cpu", sections="peak,train,sgld,memory", quick=False, ckpt="", step=-1, threads="1,all",
    chains=8, batch=1024, burnin=20, draws=60, rounds=2, n=32768, epsilon=1e-3, gamma=6.0, nbeta=60.0, seed=0,
    modes_steps=4, train_steps=300, train_batch=256, mem_ckpts=50, mem_draws=2,
    devinterp_python=os.environ.get("DEVINTERP_PYTHON", "/work/venvs/devinterp/bin/python"),
    devinterp_path=os.environ.get("DEVINTERP_PATH", ""),
    cuda_graph=True, tf32=False, md="", json="")
QUICK = dict(chains=2, batch=64, burnin=2, draws=4, rounds=1, n=512, modes_steps=2, train_steps=20,
             train_batch=32, mem_ckpts=5, mem_draws=1)
CUDA = dict(sections="peak,train,sgld", burnin=100, draws=400, train_steps=1000, modes_steps=20)  # GPU defaults


# ------------------------------------------------------------------------------------------ FLOP counts
def icl_flops(cfg, batch, sliced=False, backward=True):
    """Matrix-product FLOPs (2 per multiply-add) of the regression transformer on `batch` sequences: forward
    only, or forward + backward (every product twice more, except the embedding, whose input needs no
    gradient). sliced: llc.icl_loss_and_grads' count (last block's queries, attention output and MLP at the K
    x-token rows only; unembedding at those rows and output channel 0 only); else the nn.Module's."""
    K, d, H, F, V, L = cfg.K, cfg.d_model, cfg.n_head, cfg.d_mlp, cfg.D + 1, cfg.n_layer
    T, dh = 2 * K, d // H

    def block(tq):  # queries/outputs at tq rows, keys and values at T rows
        return T * d * 2 * d + tq * d * d + 2 * H * tq * T * dh + tq * d * d + 2 * tq * d * F

    emb = T * V * d
    body = (L - 1) * block(T) + block(K if sliced else T)
    unemb = K * d if sliced else T * d * V
    fwd = 2 * (emb + body + unemb)
    total = 3 * fwd - 2 * emb if backward else fwd
    return total * batch


# ------------------------------------------------------------------------------------------- utilities
def measure_peak(device, quick=False):
    n = 512 if quick else (8192 if torch.device(device).type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def machine_line(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.device(device).type == "cuda":
        dev = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        dev = f"CPU with {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"
    return f"{time.strftime('%Y-%m-%d %H:%M')} on {cpu} ({os.cpu_count()} cores visible); {dev}; load average {load}"


# -------------------------------------------------------------------------------------------- training
def bench_train(cfg, device, log):
    """steps/s of train.py's loop and of plain loops at the same model and batch, interleaved over --rounds
    rounds. train.py: two runs of train.train on fresh folders per round (stop_at = 1 and stop_at = S, with
    checkpoints only at steps 0, 1 and S); the difference of their wall times over S - 1 steps removes start-up,
    evaluation and checkpoint cost."""
    import train
    S, bs = cfg["train_steps"], cfg["train_batch"]
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    # max_steps = S + 1 with n_log = n_lin = 1: checkpoints only at steps 0, 1 and S (the last one is the trained
    # model the sgld section uses when no --ckpt is given)
    base = [f"--max_steps={S + 1}", "--n_log=1", "--n_lin=1", "--eval_batch_size=64", "--log_interval=1000000000",
            f"--batch_size={bs}", f"--device={device}"]

    def train_py(stop, name):
        out = os.path.join(tmp, name)
        tcfg = common.configure(train.DEFAULTS, base + [f"--out_dir={out}", f"--stop_at={stop}"])
        sync(device)
        t = time.perf_counter()
        train.train(tcfg)
        sync(device)
        return time.perf_counter() - t

    def plain(hand_written):
        cfg_m = ICLConfig()
        model = build_model(cfg_m, 0).to(device)
        task = Task()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        gen = torch.Generator(device=device if torch.device(device).type == "cuda" else "cpu")
        params = dict(model.named_parameters())

        def step(i):
            gen.manual_seed(i)
            xs, ys = task.sample(gen, bs, device=gen.device)
            opt.zero_grad(set_to_none=True)
            if hand_written:  # llc.py's gradient of the same loss, chain dimension 1
                _, g = llc.icl_loss_and_grads(cfg_m, {k: v.detach()[None] for k, v in params.items()},
                                              xs[None], ys[None])
                for k, v in params.items():
                    v.grad = g[k][0].reshape(v.shape)
            else:
                task.loss(model(to_tokens(xs, ys)), ys).backward()
            opt.step()
        for i in range(3):
            step(i)
        sync(device)
        t = time.perf_counter()
        for i in range(S):
            step(i)
        sync(device)
        return time.perf_counter() - t

    train_py(1, "warmup")  # pays the first-call costs (imports, allocator, kernels)
    names = ["train.py (train.train)", "plain nn.Module + Adam loop", "plain loop, llc.icl_loss_and_grads gradient"]
    total = dict.fromkeys(names, 0.0)
    for r in range(cfg["rounds"]):
        t1, tS = train_py(1, f"r{r}_stop1"), train_py(S, f"r{r}_stop{S}")
        if tS <= t1:
            raise RuntimeError(f"train.py timing failed: {S} steps took {tS:.2f}s, 1 step {t1:.2f}s; "
                               "use more --train_steps")
        total[names[0]] += tS - t1
        total[names[1]] += plain(False)
        total[names[2]] += plain(True)
    rows = {k: cfg["rounds"] * (S - 1 if k == names[0] else S) / v for k, v in total.items()}
    flops = {k: icl_flops(ICLConfig(), bs, sliced="icl_loss" in k) for k in rows}
    log(f"train: {', '.join(f'{k} {v:.1f} steps/s' for k, v in rows.items())}")
    return dict(steps=S, batch=bs, rounds=cfg["rounds"], steps_per_s=rows, flops_per_step=flops,
                model_dir=os.path.join(tmp, f"r{cfg['rounds'] - 1}_stop{S}"))


# ------------------------------------------------------------------------------------------------ SGLD
def chain_stats(per_chain):
    x = np.asarray(per_chain, dtype=float)
    x = x[np.isfinite(x)]
    sd = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
    return dict(mean=float(x.mean()), std=sd, se=sd / math.sqrt(len(x)), chains=len(x))


def thread_counts(spec):
    """--threads: comma-separated counts; `all` is the number of cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return list(dict.fromkeys(cores if t == "all" else int(t) for t in str(spec).split(",") if t))


def bench_sgld(cfg, device, model, log):
    """Ours vs the plain loop vs devinterp on the same checkpoint, data, L(w*) and hyperparameters, at each thread
    count (CPU): ours spreads its chains over that many worker threads, the others use that many intra-op threads.
    Rounds are interleaved so that load changes hit every sampler alike."""
    task = Task()
    dev = torch.device(device)
    model = model.to(dev).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(common.derive_seed(cfg["seed"], 99))
    xs, ys = task.sample(gen, cfg["n"])
    xs, ys = xs.to(dev), ys.to(dev)
    with torch.no_grad():  # L(w*) on the whole set, one value for all three
        L0 = float(sum(task.loss(model(to_tokens(xs[i:i + 1024], ys[i:i + 1024])), ys[i:i + 1024]).double()
                       * len(ys[i:i + 1024]) for i in range(0, len(ys), 1024)) / len(ys))
    C, steps = cfg["chains"], cfg["burnin"] + cfg["draws"]
    hp = dict(epsilon=cfg["epsilon"], gamma=cfg["gamma"], nbeta=cfg["nbeta"])
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    threads = thread_counts(cfg["threads"]) if dev.type == "cpu" else [torch.get_num_threads()]
    res = {(k, th): dict(time=0.0, chains=[]) for th in threads for k in ("ours", "plain", "devinterp")}
    notes, ours_mode, ours_L0, peaks = [], None, None, {}
    for th in threads:
        torch.set_num_threads(th)
        peaks[th] = measure_peak(device, cfg["quick"])
    for r in range(cfg["rounds"]):
        seed = cfg["seed"] + r
        for th in threads:
            torch.set_num_threads(th)
            out = llc.estimate_llc(llc.run_loss_fn(model, task), params, (xs, ys), num_chains=C,
                                   num_draws=cfg["draws"], num_burnin=cfg["burnin"], batch_size=cfg["batch"],
                                   seed=seed, device=dev,
                                   cuda_graph=cfg["cuda_graph"] and dev.type == "cuda" and llc.triton is not None, **hp)
            res["ours", th]["time"] += out["sample_time"]
            res["ours", th]["chains"] += out["llc_per_chain"]
            ours_mode, ours_L0 = out["chain_mode"] + (" + CUDA graph" if out["cuda_graph"] else ""), out["init_loss"]
            log(f"sgld round {r}, {th} thread(s): ours {C * steps / out['sample_time']:.2f} chain-steps/s, "
                f"llc {out['llc_mean']:.2f}")
            sync(dev)
            t = time.perf_counter()
            pc, _ = plain_chains(model, task, xs, ys, L0, chains=C, burnin=cfg["burnin"], draws=cfg["draws"],
                                 batch=cfg["batch"], seed=seed, device=dev, **hp)
            sync(dev)
            res["plain", th]["time"] += time.perf_counter() - t
            res["plain", th]["chains"] += pc.tolist()
            log(f"sgld round {r}, {th} thread(s): plain loop {C * steps / (time.perf_counter() - t):.2f} "
                f"chain-steps/s, llc {pc.mean():.2f}")
            dv, msg = run_devinterp(cfg, dev, sd, xs, ys, L0, seed, th)
            if dv is None:
                notes.append(msg)
                log(msg)
                res.pop(("devinterp", th), None)
            elif ("devinterp", th) in res:
                res["devinterp", th]["time"] += dv["wall"]
                res["devinterp", th]["chains"] += dv["per_chain"]
                res["devinterp", th]["version"] = dv["version"]
                log(f"sgld round {r}, {th} thread(s): devinterp {dv['version']} {C * steps / dv['wall']:.2f} "
                    f"chain-steps/s, llc {dv['llc_mean']:.2f}")
    torch.set_num_threads(threads[0])
    total_steps = cfg["rounds"] * C * steps
    table = {}
    for (k, th), v in res.items():
        table[f"{k}@{th}"] = dict(sampler=k, threads=th, chain_steps_per_s=total_steps / v["time"],
                                  **chain_stats(v["chains"]), **({"version": v["version"]} if "version" in v else {}))
    # every chain mode of ours, briefly (throughput only, one round; the same seed gives the same chains)
    modes = {}
    for mode in ["native", "native_loop", "loop", "vmap"]:
        if mode == "vmap" and dev.type == "cpu" and cfg["batch"] * C > 2048 and not cfg["quick"]:
            ms = max(2, cfg["modes_steps"] // 2)  # slow on CPU at large batch; fewer steps
        else:
            ms = cfg["modes_steps"]
        out = llc.estimate_llc(llc.run_loss_fn(model, task), params, (xs, ys), num_chains=C, num_draws=ms,
                               num_burnin=0, batch_size=cfg["batch"], seed=cfg["seed"], device=dev, chain_mode=mode,
                               **hp)
        modes[mode] = C * ms / out["sample_time"]
        log(f"sgld mode {mode}: {modes[mode]:.2f} chain-steps/s")
    tf32 = {}
    if dev.type == "cuda" and llc.triton is not None:
        for graph in (False, True):
            out = llc.estimate_llc(llc.run_loss_fn(model, task), params, (xs, ys), num_chains=C,
                                   num_draws=cfg["modes_steps"] * 10, num_burnin=0, batch_size=cfg["batch"],
                                   seed=cfg["seed"], device=dev, chain_mode="native", cuda_graph=graph, **hp)
            modes[f"native, cuda_graph={graph}"] = C * cfg["modes_steps"] * 10 / out["sample_time"]
        for kb in (4, 16):  # checkpoints batched into one computation (here copies of the one checkpoint)
            outs = llc.estimate_llc(llc.run_loss_fn(model, task), [params] * kb, (xs, ys), num_chains=C,
                                    num_draws=cfg["modes_steps"] * 10, num_burnin=0, batch_size=cfg["batch"],
                                    seed=cfg["seed"], device=dev, chain_mode="native", cuda_graph=True, **hp)
            modes[f"native, cuda_graph, {kb} checkpoints batched"] = (kb * C * cfg["modes_steps"] * 10
                                                                      / outs[0]["sample_time"])
        keep = torch.backends.cuda.matmul.allow_tf32
        for on in (False, True):  # TF32's effect on the estimate: same seed, same chains' data and noise
            torch.backends.cuda.matmul.allow_tf32 = on
            out = llc.estimate_llc(llc.run_loss_fn(model, task), params, (xs, ys), num_chains=C,
                                   num_draws=cfg["draws"], num_burnin=cfg["burnin"], batch_size=cfg["batch"],
                                   seed=cfg["seed"], device=dev, **hp)
            tf32[on] = dict(llc=out["llc_mean"], se=out["llc_se"], chain_steps_per_s=C * steps / out["sample_time"])
        torch.backends.cuda.matmul.allow_tf32 = keep
    return dict(table=table, modes=modes, notes=notes, ours_mode=ours_mode, L0=L0, ours_L0=ours_L0, peaks=peaks,
                tf32=tf32,
                flops={"ours": icl_flops(ICLConfig(), cfg["batch"], sliced=ours_mode.startswith("native")),
                       "plain": icl_flops(ICLConfig(), cfg["batch"]),
                       "devinterp": icl_flops(ICLConfig(), cfg["batch"])},
                settings=dict(chains=C, burnin=cfg["burnin"], draws=cfg["draws"], rounds=cfg["rounds"],
                              batch=cfg["batch"], n=cfg["n"], **hp))


# ---------------------------------------------------------------------------------------------- memory
MEM_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {here!r})
import llc
llc.main({argv!r})
try:  # this process's own peak (ru_maxrss can inherit the peak of a big parent across fork + exec)
    kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("MAXRSS_KB", kb)
"""


def sweep_maxrss(run_dir, steps, extra, env=None):
    """Peak RSS (MB) of a fresh process running llc.py over the given checkpoints."""
    argv = ["--ckpt", run_dir, f"--steps={','.join(map(str, steps))}", f"--out=mem_{len(steps)}.jsonl", *extra]
    proc = subprocess.run([sys.executable, "-c", MEM_SCRIPT.format(here=HERE, argv=argv)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"llc sweep failed: {proc.stderr[-1000:]}")
    kb = int(proc.stdout.split("MAXRSS_KB")[-1].split()[0])
    return kb / 1024


def make_sweep_run(run_dir, model, num, cfg_run):
    """A run folder with `num` checkpoints: the model's parameters plus small seeded perturbations."""
    common.atomic_write(os.path.join(run_dir, "config.json"), json.dumps(cfg_run))
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for s in range(num):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(base[k] + 1e-3 * torch.randn(p.shape, generator=gen))
        common.save_checkpoint(run_dir, s, model)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(base[k])


def bench_memory(cfg, model, log):
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as run:
        cfg_run = dict(D=4, K=8, sigma2=0.125, num_tasks=0, task_seed=0, **{k: getattr(model.cfg, k) for k in
                       ("n_layer", "n_head", "d_model", "d_mlp")}, seed=0)
        make_sweep_run(run, model.cpu(), cfg["mem_ckpts"], cfg_run)
        extra = [f"--num_chains={cfg['chains']}", f"--batch_size={cfg['batch']}", "--num_burnin=0",
                 f"--num_draws={cfg['mem_draws']}", f"--n={cfg['batch']}", "--device=cpu", "--epsilon=1e-3"]
        one = sweep_maxrss(run, [0], extra)
        many = sweep_maxrss(run, list(range(cfg["mem_ckpts"])), extra)
    log(f"memory: peak RSS {one:.0f} MB for 1 checkpoint, {many:.0f} MB for {cfg['mem_ckpts']}: "
        f"ratio {many / one:.3f}")
    return dict(one_mb=one, many_mb=many, checkpoints=cfg["mem_ckpts"], ratio=many / one,
                settings=" ".join(extra))


# ---------------------------------------------------------------------------------------------- report
def report(results, cfg, device):
    L = [f"Measured {results['machine']}", ""]
    peak = results.get("peak")
    if peak:
        L.append(f"fp32 matmul peak (best of 5 square matmuls): {peak / 1e9:.1f} GFLOP/s")
        L.append("")

    def rate(fl, per_s):
        s = f"{fl * per_s / 1e9:.1f} GFLOP/s"
        return s + (f" ({100 * fl * per_s / peak:.0f}% of peak)" if peak else "")
    if "sgld" in results:
        s = results["sgld"]
        st = s["settings"]
        L.append(f"SGLD on an L2H4 checkpoint: {st['chains']} chains x ({st['burnin']} burn-in + {st['draws']} "
                 f"draws) x {st['rounds']} round(s), batch {st['batch']}, fixed set of {st['n']} sequences, "
                 f"eps {st['epsilon']:g}, gamma {st['gamma']:g}, nbeta {st['nbeta']:g}; L(w*) = {s['L0']:.5f}")
        L.append("")
        L.append("| sampler | threads | chain-steps/s | vs devinterp (same threads) | vs plain loop | "
                 "GFLOP per chain-step | FLOP rate (vs peak at those threads) | LLC mean ± se (chain std) |")
        L.append("|---|---|---|---|---|---|---|---|")
        names = {"ours": f"ours (llc.py, {s['ours_mode']})", "plain": "plain one-chain loop (nn.Module, autograd)",
                 "devinterp": "devinterp"}
        tab = s["table"]
        for k, v in tab.items():
            r, th = v["chain_steps_per_s"], v["threads"]
            dv, pl = tab.get(f"devinterp@{th}", {}).get("chain_steps_per_s"), tab[f"plain@{th}"]["chain_steps_per_s"]
            fl = s["flops"][v["sampler"]]
            pk = s["peaks"].get(th, s["peaks"].get(str(th)))
            L.append(f"| {names[v['sampler']]}{' ' + v['version'] if 'version' in v else ''} | {th} | {r:.2f} | "
                     f"{f'{r / dv:.2f}x' if dv else '-'} | {r / pl:.2f}x | {fl / 1e9:.2f} | {fl * r / 1e9:.1f} GFLOP/s"
                     f"{f' ({100 * fl * r / pk:.0f}% of {pk / 1e9:.0f})' if pk else ''} | "
                     f"{v['mean']:.2f} ± {v['se']:.2f} ({v['std']:.2f}) |")
        for note in dict.fromkeys(s["notes"]):
            L.append(f"\n{note}")
        for k, v in tab.items():
            ref = tab[f"ours@{v['threads']}"]
            if v["sampler"] != "ours":
                z = (ref["mean"] - v["mean"]) / math.hypot(ref["se"], v["se"])
                L.append(f"\nLLC ours - {k}: {ref['mean'] - v['mean']:+.2f} = {z:+.2f} combined standard errors")
        L.append("")
        if s.get("tf32"):
            f, t = s["tf32"][False], s["tf32"][True]
            L.append(f"TF32 matmuls (same seed): LLC {t['llc']:.2f} ± {t['se']:.2f} vs fp32 {f['llc']:.2f} ± "
                     f"{f['se']:.2f} ({(t['llc'] - f['llc']) / math.hypot(t['se'], f['se']):+.2f} combined se); "
                     f"{t['chain_steps_per_s']:.1f} vs {f['chain_steps_per_s']:.1f} chain-steps/s")
            L.append("")
        L.append("Chain modes of ours (throughput only): " + ", ".join(f"{k} {v:.2f}" for k, v in s["modes"].items())
                 + " chain-steps/s")
        L.append("")
    if "train" in results:
        t = results["train"]
        L.append(f"Training, L2H4, batch {t['batch']}, {t['steps']} steps x {t['rounds']} round(s), interleaved:")
        L.append("")
        L.append("| loop | steps/s | vs train.py | GFLOP per step | FLOP rate |")
        L.append("|---|---|---|---|---|")
        ref = t["steps_per_s"]["train.py (train.train)"]
        for k, v in t["steps_per_s"].items():
            L.append(f"| {k} | {v:.2f} | {v / ref:.2f}x | {t['flops_per_step'][k] / 1e9:.3f} | "
                     f"{rate(t['flops_per_step'][k], v)} |")
        L.append("")
    if "memory" in results:
        m = results["memory"]
        L.append(f"Memory: llc.py sweep peak RSS {m['one_mb']:.0f} MB over 1 checkpoint, {m['many_mb']:.0f} MB over "
                 f"{m['checkpoints']}: ratio {m['ratio']:.3f} ({m['settings']})")
    return "\n".join(L)


def main(argv):
    cfg = common.configure(DEFAULTS, argv)
    given = " ".join(argv)
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench.py: --device={cfg['device']}, but this torch ({torch.__version__}) sees no CUDA device")
    if cfg["device"].startswith("cuda"):  # more steps (a GPU step is ~100x cheaper); memory is a CPU measurement
        cfg.update({k: v for k, v in CUDA.items() if f"--{k}" not in given})
    if cfg["quick"]:
        cfg.update({k: v for k, v in QUICK.items() if f"--{k}" not in given})
    device = cfg["device"]
    if torch.device(device).type == "cpu":  # train, peak and memory use the first count; sgld each in turn
        torch.set_num_threads(thread_counts(cfg["threads"])[0])
    if cfg["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    common.tune_malloc()
    sections = [s for s in cfg["sections"].split(",") if s]
    log = common.progress
    results = {"machine": machine_line(device), "config": dict(cfg)}
    t0 = time.time()
    if "peak" in sections:
        results["peak"] = measure_peak(device, cfg["quick"])
        log(f"peak: {results['peak'] / 1e9:.1f} GFLOP/s")
    model = None
    if cfg["ckpt"]:
        step = cfg["step"] if cfg["step"] >= 0 else common.list_checkpoints(cfg["ckpt"])[-1]
        model = common.load_model(cfg["ckpt"], step)
    if "train" in sections or (model is None and ("sgld" in sections or "memory" in sections)):
        results["train"] = bench_train(cfg, device, log)
        if model is None:
            out = results["train"]["model_dir"]
            model = common.load_model(out, common.list_checkpoints(out)[-1])
        if "train" not in sections:
            results.pop("train")
    if "sgld" in sections:
        results["sgld"] = bench_sgld(cfg, device, model, log)
    if "memory" in sections:
        results["memory"] = bench_memory(cfg, model, log)
    results["seconds"] = time.time() - t0
    text = report(results, cfg, device)
    print(text)
    if cfg["md"]:
        common.atomic_write(cfg["md"], f"# Benchmark (bench.py)\n\n`python bench.py {' '.join(argv)}`\n\n{text}\n")
    if cfg["json"]:
        common.atomic_write(cfg["json"], json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
