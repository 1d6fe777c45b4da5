"""Local learning coefficient (LLC) estimation with batched, localised SGLD chains.

lambda_hat = n*beta * (E[L_batch(w)] - L(w*)), the expectation over SGLD chains localised at a checkpoint w*
(Lau et al. 2023; Hoogland et al. 2024). The chains' parameters live in one flat buffer W (chains, P); a single
fused update moves all of W (sgld.py: a Triton kernel with in-kernel Philox noise on CUDA, torch elsewhere);
losses stay on the device until the end (no host sync per step). The chains' gradients (chain_mode, per device):
  native / native_loop  the regression transformer's loss and gradient written out by hand for a stack of chains
                        (icl_loss_and_grads: bmm over the chain dimension, the last block sliced to the rows the
                        loss reads); all chains at once on GPU/TPU; on CPU one chain at a time, the chains spread
                        over worker threads (--threads, default all usable cores) in cache-sized row chunks
  vmap / loop           torch.func.grad of any loss_fn(params, batch), vmapped over chains or one chain at a time
On CUDA the whole SGLD step can be captured in a CUDA graph (--cuda_graph); --tf32 allows TF32 matmuls.

    python llc.py --ckpt out/run                                  # quick CPU defaults, every checkpoint
    python llc.py configs/llc_v1.py --ckpt out/run --steps=100,1000 --num_chains=4
    python llc.py --ckpt out/run --include='blocks.0.**' --out=llc_block0.jsonl   # restricted LLC
    python llc.py --ckpt out/run --calibrate                      # eps x nbeta x gamma grid + trace plots
    python llc.py configs/llc_v1.py --ckpt out/run --ckpt_batch=16   # GPU: 16 checkpoints in one computation
    torchrun --standalone --nproc_per_node=4 llc.py configs/llc_v2.py --ckpt out/run   # checkpoints across ranks
(Under torchrun give `n` in a config file: torchrun's own parser takes `--n=...` for an abbreviation of its options.)
"""
import math, os, sys, time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads crawl under load
import numpy as np
import torch
from torch.func import functional_call, grad, vmap

import common
from common import release_memory, tune_malloc
from icl_grad import icl_loss_and_grads
from sgld import (ChainBatches, _as_tuple, _graph_step, _tmap, chain_summary, make_generators, mean_loss,
                  noise_key, select_params, sgld_coefficients, sgld_update_torch, sgld_update_triton, triton)

# ------------------------------------------------------------------------------------------- the estimator
class AllChainsDivergedError(RuntimeError):
    """Every chain produced a non-finite loss: the sampler settings are unstable for this checkpoint."""


CHAIN_MODES = ("auto", "native", "native_loop", "vmap", "loop")


def pick_chain_mode(loss_fn, device, batch_rows, num_params):
    """auto: the loss's hand-written batched gradient when it has one (all chains in one computation on an
    accelerator; one chain at a time on CPU, where per-chain products stay cache-sized and a bmm over a chain
    dimension is slower), else torch.func: vmap over the chains, except on CPU for big problems (rows x params
    >= 1e7, e.g. the L2H4 model at batch 1024), where vmap's (C, B, ...) activations fall out of cache and a loop
    over chains is faster (measured 2.3x at L2H4, batch 1024; vmap 2x faster for a 30-parameter model)."""
    cpu = torch.device(device).type == "cpu"
    if getattr(loss_fn, "batched_grad", None) is not None:
        return "native_loop" if cpu else "native"
    return "loop" if cpu and batch_rows * num_params >= 1e7 else "vmap"


def verify_batched_grad(loss_fn, params, names, batch, rtol=1e-3):
    """A hand-derived gradient (loss_fn.batched_grad) must match autograd's of loss_fn at w* on a small batch: it
    would silently go stale if the model's code changed, so the native modes check it once per estimate."""
    def mean_loss_and_loss(q):
        loss = loss_fn(q, batch)
        return loss.mean(), loss.detach()
    loss_h, g_h = loss_fn.batched_grad({k: v[None] for k, v in params.items()}, tuple(x[None] for x in batch))
    g_a, loss_a = grad(mean_loss_and_loss, has_aux=True)(params)
    errs = {k: float((g_h[k][0] - g_a[k]).abs().max() / g_a[k].abs().max().clamp_min(1e-12)) for k in names}
    errs["(loss)"] = float((loss_h[0] - loss_a).abs().max() / loss_a.abs().max().clamp_min(1e-12))
    bad = {k: e for k, e in errs.items() if not e <= rtol}
    if bad:
        raise ValueError(f"the hand-derived gradient (batched_grad) disagrees with autograd at w* (relative errors "
                         f"{bad}): has the model's code changed? Use chain_mode='loop' or 'vmap', or update "
                         "icl_grad.py")


def estimate_llc(loss_fn, params, data, *, epsilon, gamma, nbeta, num_chains=8, num_draws=500, num_burnin=0,
                 batch_size=None, seed=0, include=None, exclude=None, per_token=False, device=None, n=None,
                 update_backend="auto", chain_mode="auto", cuda_graph=False, workers=None, grad_chunk=256,
                 progress=None):
    """Estimate the LLC at `params` (dict name -> tensor, the point w*), or at each of a list of such dicts (the
    checkpoints of one run) in one batched computation: then a list of results, each the same as that checkpoint's
    own estimate would be (the same minibatches, noise and L(w*) set: common random numbers), up to float rounding
    in the batched products (bit-identical in native_loop).

    loss_fn(params, batch) -> mean loss over the batch (a K-vector when per_token; the gradient is of its
    mean); write it with torch.func.functional_call for an nn.Module. data: a tuple of tensors (fixed set of
    n rows) or sample(generator, batch_size) -> batch (fresh stream; L(w*) then uses a seeded sample of `n`
    rows, default 16 * batch_size). Parameters outside include/exclude stay at w* (restricted LLC).
    update_backend: auto (triton on CUDA, xla on XLA, else torch), torch, triton, xla.
    chain_mode: how the chains' gradients are computed, see pick_chain_mode and CHAIN_MODES; "native" and
    "native_loop" need loss_fn.batched_grad(params (C, ...), batch (C, B, ...)) -> (loss (C,[K]), grads (C, ...)),
    which run_loss_fn provides for the regression transformer (checked against autograd at w* first). All modes
    give the same chains up to float rounding. cuda_graph: capture one SGLD step (gradient, fused update, noise
    key) in a CUDA graph and replay it (CUDA, native mode, triton update). native_loop (CPU) only: `workers`
    threads compute different chains at once, each op single-threaded (default torch.get_num_threads(); 2 workers
    measured 1.7-1.9x one on 2 cores, where 2 intra-op threads gain ~1.4x), and each chain's batch is processed
    `grad_chunk` rows at a time (default 256: activations stay in L2 cache; measured 1.3x over a whole 1024-row
    batch); neither changes a chain's arithmetic beyond the order of one sum. `progress`: a label; when set,
    prints progress with ETA to stderr. Same seed => identical result (for a given chain_mode, grad_chunk and
    device; any number of workers). Raises AllChainsDivergedError when every chain of a checkpoint diverged."""
    t_start = time.time()
    if not (epsilon > 0 and nbeta > 0 and gamma >= 0):
        raise ValueError(f"need epsilon > 0, nbeta > 0, gamma >= 0; got {epsilon}, {nbeta}, {gamma}")
    if num_chains < 1 or num_draws < 1 or num_burnin < 0:
        raise ValueError(f"need num_chains, num_draws >= 1, num_burnin >= 0; got {num_chains}, {num_draws}, "
                         f"{num_burnin}")
    many = isinstance(params, (list, tuple))
    group = list(params) if many else [params]
    if not group or any(set(p) != set(group[0]) or any(p[k].shape != group[0][k].shape for k in p) for p in group):
        raise ValueError("a list of checkpoints needs at least one, all with the same parameter names and shapes")
    device = torch.device(device) if device is not None else next(iter(group[0].values())).device
    names = select_params(list(group[0]), include, exclude)
    w_stars = [{k: v.detach().to(device) for k, v in p.items()} for p in group]
    for w_star in w_stars:
        for k, v in w_star.items():
            if not torch.isfinite(v).all():
                raise ValueError(f"parameter {k!r} of w* has non-finite values")
    w_star, Kc = w_stars[0], len(w_stars)  # (shapes and sizes; Kc checkpoints)
    (g_data, g_noise, g_init, _), seeds = make_generators(seed, device)

    stream = callable(data)
    if stream:
        if not batch_size:
            raise ValueError("a stream `data` (a sample callable) needs batch_size")
        B, n = int(batch_size), int(n or 16 * batch_size)
    else:
        data = tuple(x.to(device) for x in (data if isinstance(data, (tuple, list)) else (data,)))
        rows = data[0].shape[0]
        if any(x.shape[0] != rows for x in data) or (n is not None and n != rows):
            raise ValueError(f"fixed dataset: all tensors need the same number of rows (n={n}), got "
                             f"{[x.shape[0] for x in data]}")
        B, n = int(batch_size or rows), rows
        if B > n:
            raise ValueError(f"batch_size={B} is larger than the dataset (n={n})")
    init_losses = []
    for w in w_stars:  # every checkpoint's L(w*) on the same rows: the L(w*) generator restarted for each
        g_init.manual_seed(seeds[2])
        init_losses.append(mean_loss(loss_fn, w, data, n, B, g_init, device))
        if init_losses[-1].dim() != int(per_token):
            raise ValueError(f"loss_fn returned shape {tuple(init_losses[-1].shape)}; expected a "
                             f"{'vector (per_token=True)' if per_token else 'scalar (per_token=False)'}")
        if not torch.isfinite(init_losses[-1]).all():
            raise ValueError(f"L(w*) is not finite ({init_losses[-1].tolist()}): the checkpoint itself is broken")

    if update_backend == "auto":
        update_backend = ("triton" if device.type == "cuda" and triton is not None
                          else "xla" if device.type == "xla" else "torch")
    if update_backend == "xla":
        import torch_xla.core.xla_model as xm  # lazy: never required elsewhere
    elif update_backend not in ("torch", "triton"):
        raise ValueError(f"unknown update_backend {update_backend!r} (auto, torch, triton, xla)")
    if chain_mode == "auto":
        chain_mode = pick_chain_mode(loss_fn, device, B, sum(w_star[k].numel() for k in names))
    if chain_mode not in CHAIN_MODES[1:]:
        raise ValueError(f"unknown chain_mode {chain_mode!r} ({', '.join(CHAIN_MODES)})")
    if chain_mode.startswith("native") and getattr(loss_fn, "batched_grad", None) is None:
        raise ValueError(f"chain_mode={chain_mode!r} needs a loss_fn with a batched_grad (see run_loss_fn)")
    if cuda_graph and not (device.type == "cuda" and chain_mode == "native" and update_backend == "triton"):
        raise ValueError("cuda_graph needs device cuda, chain_mode 'native' and the triton update")
    if chain_mode.startswith("native"):  # on 8 rows of the data (the L(w*) generator is done with)
        rows8 = _tmap(lambda x: x.to(device), data(g_init, 8)) if stream else tuple(x[:8] for x in data)
        for w in w_stars:
            verify_batched_grad(loss_fn, w, names, rows8)

    C, CT = num_chains, Kc * num_chains  # chains per checkpoint; in all (checkpoint-major: row g*C + c)
    W0 = torch.stack([torch.cat([w[k].reshape(-1) for k in names]) for w in w_stars])  # (Kc, P): a row per w*
    W = W0.repeat_interleave(C, 0)  # (CT, P): all chains' sampled parameters in one flat buffer
    sizes = [w_star[k].numel() for k in names]
    frozen = {k: torch.stack([w[k] for w in w_stars])[:, None].expand(Kc, C, *w_star[k].shape)
              .reshape(CT, *w_star[k].shape) for k in w_star if k not in names}  # each chain's (a view when Kc = 1)
    a, b, c = sgld_coefficients(epsilon, gamma, nbeta)
    key = torch.tensor([noise_key(seeds[1], 0)], dtype=torch.int64, device=device)  # + 1 per step

    def objective(w, fz, batch):
        """One chain: the named parameters are views into its row w (P,), so grad() returns a flat (P,)
        gradient (split's backward is a single cat) and vmap a (C, P) one: no per-parameter copies. fz: the
        chain's frozen parameters."""
        sel = {k: p.view(w_star[k].shape) for k, p in zip(names, torch.split(w, sizes))}
        loss = loss_fn({**fz, **sel}, batch)
        return loss.mean(), loss.detach()

    def native_rows(lo, hi, batch, chunk=None):
        """The batched gradient for chains lo:hi, parameters as views into W's rows, flattened into (hi-lo, P);
        with `chunk`, the mean over the batch's row chunks (of equal weight per row)."""
        G_ = hi - lo
        p = {k: W[lo:hi, o - s:o].view(G_, *w_star[k].shape)
             for k, s, o in zip(names, sizes, np.cumsum(sizes).tolist())}
        p.update({k: v[lo:hi] for k, v in frozen.items()})
        flat, loss = 0, 0
        for r in range(0, B, chunk or B):
            m = min(chunk or B, B - r)
            lc, grads = loss_fn.batched_grad(p, tuple(x[lo:hi, r:r + m] for x in batch))
            gc = torch.cat([grads[k].reshape(G_, -1) for k in names], 1)
            if m == B:
                return gc, lc
            flat, loss = flat + gc * (m / B), loss + lc * (m / B)
        return flat, loss

    pool, n_threads = None, torch.get_num_threads()  # native_loop on CPU: the chain workers; torch's threads
    if chain_mode == "vmap":
        vgrad = vmap(grad(objective, has_aux=True))
        grad_fn = lambda W, batch: vgrad(W, frozen, batch)  # noqa: E731
    elif chain_mode == "loop":
        one = grad(objective, has_aux=True)

        def grad_fn(W, batch):
            out = [one(W[i], {k: v[i] for k, v in frozen.items()}, _tmap(lambda x: x[i], batch))
                   for i in range(CT)]
            return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    elif chain_mode == "native":
        grad_fn = lambda W, batch: native_rows(0, CT, _as_tuple(batch))  # noqa: E731
    else:
        cpu = device.type == "cpu"
        chunk = int(grad_chunk or 0) if cpu else 0
        if chunk < 0:
            raise ValueError(f"grad_chunk must be >= 0 (0: the whole batch at once); got {grad_chunk}")
        workers = min(CT, int(workers or torch.get_num_threads())) if cpu else 1
        if cpu and n_threads != 1:  # each chain's ops single-threaded, whichever thread: same chains for any workers
            torch.set_num_threads(1)
        if workers > 1:  # (the thread setting is per thread: each worker sets its own, once)
            pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))

        def grad_fn(W, batch):
            batch = _as_tuple(batch)
            out = list((pool.map if pool else map)(lambda i: native_rows(i, i + 1, batch, chunk), range(CT)))
            return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    def sgld_step(batch):
        """Gradient of every chain at its pre-step point, then the update; returns the pre-step losses."""
        G, loss = grad_fn(W, batch)
        if update_backend == "triton":
            sgld_update_triton(W, W0, G, a, b, c, key)
            key.add_(1)
        else:  # one checkpoint's worth of noise, repeated for every checkpoint (as in the kernel)
            noise = torch.randn((C, W.shape[1]), generator=g_noise, device=g_noise.device, dtype=W.dtype)
            sgld_update_torch(W, W0, G, noise.to(device), a, b, c)
        return loss

    batches = ChainBatches(data, C, B, g_data, device)
    if Kc > 1:  # every checkpoint's chain c gets chain c's minibatch
        single = batches
        batches = lambda: _tmap(lambda x: x.repeat(Kc, *[1] * (x.dim() - 1)), single())  # noqa: E731
    t_sample = time.time()  # the SGLD loop, graph capture included
    step, first = sgld_step, None
    if cuda_graph:  # the static buffers are filled with step 0's batch, which step 0 then uses
        first = batches()
        step = _graph_step(sgld_step, first, W, key)
    total = num_burnin + num_draws
    trace = torch.empty((CT, total) + tuple(init_losses[0].shape), device=device, dtype=W.dtype)  # burn-in cut later
    t_dev = torch.zeros(1, dtype=torch.int64, device=device)  # XLA: a device-side index keeps one graph per step
    alive = torch.ones(CT, dtype=torch.bool, device=device)
    every = max(1, total // 10)
    try:
        for t in range(total):
            loss = step(first if t == 0 and first is not None else batches())  # pre-step loss of every chain
            alive &= torch.isfinite(loss.reshape(CT, -1)).all(1)  # (burn-in losses count: a NaN chain is lost)
            if update_backend == "xla":
                trace.index_copy_(1, t_dev, loss.unsqueeze(1))
                t_dev.add_(1)
                xm.mark_step()
            else:
                trace[:, t] = loss
            if progress and ((t + 1) % every == 0 or t + 1 == total):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                el = time.time() - t_start
                tty = sys.stderr.isatty()
                print(f"{chr(13) if tty else ''}{progress}: SGLD step {t + 1}/{total}, {(t + 1) / el:.1f} it/s, "
                      f"ETA {el * (total - t - 1) / (t + 1):.0f}s", end="\n" if t + 1 == total or not tty else "",
                      file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
        if torch.get_num_threads() != n_threads:  # restored (set_num_threads also sets torch's global default)
            torch.set_num_threads(n_threads)
    tr = trace[:, num_burnin:].double().cpu().numpy()  # the one read-back
    sample_time, alive = time.time() - t_sample, alive.cpu().numpy()
    settings = dict(epsilon=epsilon, gamma=gamma, nbeta=nbeta, num_chains=C, num_draws=num_draws,
                    num_burnin=num_burnin, batch_size=B, seed=seed, n=n, data_mode="stream" if stream else "fixed",
                    num_params=W.shape[1], update_backend=update_backend, chain_mode=chain_mode,
                    cuda_graph=bool(cuda_graph), checkpoints_batched=Kc,
                    sample_time=sample_time)  # the SGLD loop (chain-steps/s = CT * (burn-in + draws) / sample_time)
    results = [chain_summary(tr[g * C:(g + 1) * C], init_losses[g].cpu().numpy(), alive[g * C:(g + 1) * C], nbeta,
                             per_token) for g in range(Kc)]
    lost = [g for g, r in enumerate(results) if r is None]
    if lost:
        raise AllChainsDivergedError(
            f"all {C} SGLD chains diverged (non-finite loss) with epsilon={epsilon}, nbeta={nbeta}, gamma={gamma}"
            f"{f' at checkpoint(s) {lost} of the {Kc}' if many else ''}: lower epsilon (or nbeta), or check that "
            "w* is near a minimum")
    for r in results:
        r.update(settings, wall_time=time.time() - t_start)
    return results if many else results[0]


# --------------------------------------------------------------------------------------- the command line
DEFAULTS = dict(  # quick CPU setting for tiny demo runs; configs/llc_v1.py and llc_v2.py hold the paper's
    ckpt="", steps="", out="llc.jsonl", epsilon=3e-4, gamma=6.0, nbeta=60.0, num_chains=4, num_draws=100,
    num_burnin=50, batch_size=32, n=4096, data_mode="stream", seed=0, per_token=False, include="", exclude="",
    device="", update_backend="auto", chain_mode="auto", cuda_graph=False, tf32=False, threads=0, grad_chunk=256,
    ckpt_batch=1, trace_points=100,
    calibrate=False, calib_steps="",
    calib_epsilon="3e-4,1e-3,3e-3", calib_nbeta="20,60,200", calib_gamma="6,60")
RUN_KEYS = ("epsilon", "gamma", "nbeta", "num_chains", "num_draws", "num_burnin", "batch_size", "seed", "n",
            "data_mode", "per_token", "include", "exclude")  # a resumed file must agree on all of these


class RunLoss:
    """The run's training loss as a function of (params, (inputs, targets)), for estimate_llc; any task with the
    common interface (data.Task, lm_data.LMTask): model_input, loss, loss_per_token. For the regression
    transformer (model.ICLTransformer with data.Task) it also offers batched_grad, the hand-written gradient of
    all chains at once (icl_loss_and_grads), which estimate_llc's chain_mode "auto" prefers."""

    def __init__(self, model, task, per_token=False):
        self.model, self.task, self.per_token = model, task, per_token
        from data import Task
        from model import ICLTransformer
        if type(model) is ICLTransformer and type(task) is Task:
            self.batched_grad = self._icl_batched_grad
        else:
            self.batched_grad = None

    def __call__(self, params, batch):
        out = functional_call(self.model, params, (self.task.model_input(*batch),))
        return (self.task.loss_per_token if self.per_token else self.task.loss)(out, batch[1])

    def _icl_batched_grad(self, params, batch):
        return icl_loss_and_grads(self.model.cfg, params, batch[0], batch[1], self.per_token)


def run_loss_fn(model, task, per_token=False):
    """See RunLoss."""
    return RunLoss(model, task, per_token)


def run_sampler(task):
    """The run's data stream as sample(gen, batch_size), drawn on the generator's device."""
    return lambda gen, m: task.sample(gen, m, device=gen.device)


def llc_row(step, res, trace_points):
    """One flat llc.jsonl row: the estimate, its diagnostics, a binned loss trace and the settings."""
    tr = res["loss_trace"].numpy()
    edges = np.linspace(0, tr.shape[1], min(trace_points, tr.shape[1]) + 1).astype(int)
    binned = [[float(r[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])] for r in tr]
    row = {"step": step, **{k: v for k, v in res.items() if k != "loss_trace"}}
    row.update(loss_trace=binned, trace_draws=edges[1:].tolist())
    return {k: common.finite(v) for k, v in row.items()}


def _estimate_at(cfg, out_dir, steps, task, dataset, device, **over):
    """estimate_llc at a list of checkpoints, batched into one computation: a list of results."""
    models = [common.load_model(out_dir, s).to(device) for s in steps]
    params = [{k: v.detach() for k, v in m.named_parameters()} for m in models]
    s = {**cfg, **over}
    return estimate_llc(
        run_loss_fn(models[0], task, s["per_token"]), params,
        dataset if dataset is not None else run_sampler(task),
        epsilon=s["epsilon"], gamma=s["gamma"], nbeta=s["nbeta"], num_chains=s["num_chains"],
        num_draws=s["num_draws"], num_burnin=s["num_burnin"], batch_size=s["batch_size"], seed=s["seed"],
        include=s["include"] or None, exclude=s["exclude"] or None, per_token=s["per_token"], device=device,
        n=s["n"] if dataset is None else None, update_backend=s["update_backend"], chain_mode=s["chain_mode"],
        cuda_graph=s["cuda_graph"], grad_chunk=s["grad_chunk"], progress=over.get("label"))


def _plan(cfg, out_dir, path):
    """(all requested steps, the steps still to do), or (None, a SystemExit message) when a checkpoint is missing
    or the output file holds rows made with other settings."""
    if cfg["data_mode"] not in ("stream", "fixed"):
        return None, f"llc.py: data_mode must be 'stream' or 'fixed', not {cfg['data_mode']!r}"
    if cfg["chain_mode"] not in CHAIN_MODES:
        return None, f"llc.py: chain_mode must be one of {CHAIN_MODES}, not {cfg['chain_mode']!r}"
    have = common.list_checkpoints(out_dir)
    steps = [int(s) for s in cfg["steps"].split(",")] if cfg["steps"] else have
    missing = sorted(set(steps) - set(have))
    if not steps or missing:
        return None, (f"llc.py: no checkpoint for step(s) {missing or 'any'} in {out_dir}/checkpoints "
                      f"(available: {have[:5]}{'...' if len(have) > 5 else ''})")
    rows = common.read_jsonl(path) if os.path.exists(path) else []
    for key in RUN_KEYS:
        old = {r.get(key) for r in rows} - {cfg[key]}
        if old:
            return None, (f"llc.py: {path} holds rows with {key}={old.pop()!r}, but this run has {key}={cfg[key]!r}; "
                          "use --out=<other file> or the same settings")
    done = {r["step"] for r in rows}
    todo = [s for s in steps if s not in done]
    print(f"llc.py: {len(todo)} checkpoint(s) to do, {len(steps) - len(todo)} already in {path}", file=sys.stderr)
    return steps, todo


def main(argv=None):
    """Estimate the LLC at every (or every --steps) checkpoint of a run into <ckpt>/<out>, one row per checkpoint,
    resumable. Under torchrun the checkpoints are dealt round-robin to the ranks (each on its own device: cuda:
    LOCAL_RANK, else CPU); after every round of one checkpoint per rank the rows are gathered (gloo, Python objects
    only) and rank 0 alone appends them in step order, so the file reads as a single-process run's would, and the
    rows are the same (every estimate depends only on its checkpoint, the seed and the settings)."""
    cfg = common.configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    out_dir = cfg["ckpt"]
    if not out_dir:
        raise SystemExit("llc.py: give the run directory with --ckpt=<out_dir>")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if cfg["calibrate"] and rank != 0:
        print(f"llc.py: rank {rank} idle (calibration runs on rank 0)", file=sys.stderr)
        return
    dist, n_threads = None, torch.get_num_threads()
    if world > 1 and not cfg["calibrate"]:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    try:
        _main(cfg, out_dir, dist, rank, world if dist else 1)
        if dist is not None:  # no rank tears its connections down while another still uses them (without this
            dist.barrier()    # barrier ~10% of 2-rank gloo runs ended in a rank's abort at exit)
    finally:
        if dist is not None:
            dist.destroy_process_group()
        else:
            torch.set_num_threads(n_threads)


def _rows(cfg, out_dir, steps, task, dataset, device):
    """The llc.jsonl rows of a group of checkpoints, estimated in one batched computation. When every chain of one
    of them diverged, each is estimated alone instead: the others keep their estimates, the failure is recorded
    (llc_mean null, so that a rerun does not repeat a known failure)."""
    base = lambda s: {"step": s, **{k: cfg[k] for k in RUN_KEYS}}  # noqa: E731
    try:
        res = _estimate_at(cfg, out_dir, steps, task, dataset, device)
    except AllChainsDivergedError as err:
        if len(steps) > 1:
            return [row for s in steps for row in _rows(cfg, out_dir, [s], task, dataset, device)]
        print(f"llc.py: step {steps[0]}: {err}", file=sys.stderr)
        return [{**base(steps[0]), "llc_mean": None, "nan_chains": list(range(cfg["num_chains"])), "error": str(err)}]
    return [{**base(s), **llc_row(s, r, cfg["trace_points"])} for s, r in zip(steps, res)]


def _main(cfg, out_dir, dist, rank, world):
    if cfg["device"]:
        device = torch.device(cfg["device"])
    elif torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device()
        if local >= torch.cuda.device_count():
            raise SystemExit(f"llc.py: rank {rank} would use cuda:{local}, but there are {torch.cuda.device_count()} "
                             "CUDA devices: use --nproc_per_node <= that, or --device=cpu")
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cpu":  # threads=0: this process's share of the usable cores (chain workers in native_loop)
        torch.set_num_threads(cfg["threads"] or max(1, len(os.sched_getaffinity(0)) // world))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # Triton launches and CUDA graphs use the current device
    if cfg["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tune_malloc()
    path = os.path.join(out_dir, cfg["out"])
    plan = [_plan(cfg, out_dir, path) if rank == 0 else None]
    if dist is not None:
        dist.broadcast_object_list(plan, src=0)
    steps, todo = plan[0]
    if steps is None:
        raise SystemExit(todo)
    task = common.run_task(out_dir)
    dataset = None
    if cfg["data_mode"] == "fixed":  # one fixed set for every checkpoint (common random numbers)
        (_, _, _, g_set), _ = make_generators(cfg["seed"], device)
        dataset = run_sampler(task)(g_set, cfg["n"])
    if cfg["calibrate"]:
        from calibrate import calibrate

        def estimate(step, **over):
            try:
                return _estimate_at(cfg, out_dir, [step], task, dataset, device, **over)[0]
            except AllChainsDivergedError:
                return None
        calibrate(cfg, out_dir, steps, estimate)
        return
    kb = max(1, int(cfg["ckpt_batch"]))
    groups = [todo[i:i + kb] for i in range(0, len(todo), kb)]  # each one batched computation
    t0, failed, mine = time.time(), 0, groups[rank::world]
    for i in range(math.ceil(len(groups) / world)):
        payload = None
        if i < len(mine):
            try:
                payload = _rows(cfg, out_dir, mine[i], task, dataset, device)
            except Exception as err:  # noqa: BLE001  tell the other ranks, then fail
                if dist is None:
                    raise
                payload = [{"fatal": f"rank {rank}, step(s) {mine[i]}: {type(err).__name__}: {err}"}]
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
            print(f"llc.py: step(s) {[r['step'] for r in rows]} [{done}/{len(todo)}] "
                  f"llc={[r['llc_mean'] for r in rows]} {el / done:.1f}s/ckpt "
                  f"ETA {el / done * (len(todo) - done):.0f}s", file=sys.stderr)
    if failed:
        raise SystemExit(f"llc.py: all chains diverged at {failed} checkpoint(s); rows written with llc_mean=null")


if __name__ == "__main__":
    main()
