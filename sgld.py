"""The local learning coefficient estimator, lambda_hat = n*beta * (E[L_batch(w)] - L(w*)) over SGLD chains localised
at w* (Lau et al. 2023), for one or several checkpoints at once: all chains' sampled parameters in one flat buffer
W (chains, P), moved by one fused update; each step's losses stay on the device until the end."""
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from common import Progress, derive_seed, select_params
from fast import (batched_grad_mismatch, cuda_graph_step, noise_key, sgld_update_torch, sgld_update_triton, triton,
                  triton_update_ok)


DRIFT_Z = 4.0  # |llc_drift_z| above this warns: the chains have not settled by the last half of the draws


class AllChainsDivergedError(RuntimeError):
    """Every chain of a checkpoint produced a non-finite loss: the sampler settings are unstable there."""


@dataclass
class Settings:
    """The estimator's settings; estimate_llc(..., **settings) takes these names."""
    epsilon: float                  # step size
    gamma: float                    # localisation strength (pull towards w*)
    nbeta: object                   # n * inverse temperature; "default": B / ln B (devinterp's default)
    num_chains: int = 8
    num_draws: int = 500
    num_burnin: int = 0
    batch_size: int | None = None   # rows per chain and step (fixed data: default all rows)
    seed: int = 0
    n: int | None = None            # stream: rows for L(w*) (default 16 x batch_size)
    include: object = None          # restricted LLC: glob patterns of the sampled parameters (default all) ...
    exclude: object = None          # ... minus these; the others stay at w*
    masks: dict | None = None       # {name: bool tensor}: only the True elements are sampled (alone: only these names)
    loss: object = None             # params is an nn.Module: loss(model(input), batch) is the loss
    inputs: object = None           # ... with input = inputs(batch) (default batch[0], or batch["input_ids"])
    per_token: bool = False         # loss_fn returns a vector of per-token losses (the gradient is of its mean)
    device: object = None           # default: the device of the parameters
    update_backend: str = "auto"    # auto (triton on CUDA, xla on XLA, else torch) | torch | triton | xla
    chain_mode: str = "auto"        # how the chains' gradients are computed: auto or a key of GRADIENTS
    cuda_graph: bool = False        # capture one SGLD step in a CUDA graph (CUDA, native, triton)
    workers: int | None = None      # native_loop on CPU: chain worker threads (default torch's thread count)
    grad_chunk: int = 256           # native_loop on CPU: rows per gradient pass (0: the whole batch)
    progress: str | None = None     # a label: progress lines with rate and ETA on stderr
    init_loss: list | None = None   # L(w*) per checkpoint, as results give it (init_loss[_per_token]): not recomputed
    se_target: float = 0.0          # stop once every checkpoint's llc_se is at most this (checked every 100 draws)
    paired: bool = False            # L(w*) on each draw's own minibatch: no error from a separate L(w*) set
    horizon: int = 0                # > num_draws: the mean over this many steps from w*, the rest extrapolated

    def __post_init__(self):
        if not (self.epsilon > 0 and (self.nbeta == "default" or self.nbeta > 0) and self.gamma >= 0
                and self.num_chains >= 1 and self.num_draws >= 1
                and min(self.num_burnin, self.grad_chunk, self.se_target, self.horizon) >= 0
                and not (self.horizon and self.num_burnin)):
            raise ValueError(
                f"need epsilon, nbeta > 0, gamma >= 0, num_chains, num_draws >= 1, num_burnin, grad_chunk, "
                f"se_target, horizon >= 0, horizon only without burn-in; got {self.epsilon}, {self.nbeta}, "
                f"{self.gamma}, {self.num_chains}, {self.num_draws}, {self.num_burnin}, {self.grad_chunk}, "
                f"{self.se_target}, {self.horizon}")


def sgld_coefficients(epsilon, gamma, nbeta):
    """w <- w - (eps/2)[nbeta g + gamma (w - w*)] + sqrt(eps) xi  ==  w - a g - b (w - w*) + c xi."""
    return epsilon * nbeta / 2, epsilon * gamma / 2, math.sqrt(epsilon)


def sampled_names(s, w):
    """The names of w the chains sample: by include/exclude pattern, or (masks alone) the masked names; masks checked."""
    masks, names = s.masks or {}, list(w)
    for k, m in masks.items():
        if k not in w or m.dtype != torch.bool or m.shape != w[k].shape or not m.any():
            raise ValueError(f"mask {k!r}: need a bool tensor of the parameter's shape with a True element "
                             f"(names: {', '.join(names)})")
    if masks and s.include is None and s.exclude is None:
        return [n for n in names if n in masks]
    sel = select_params(names, s.include, s.exclude)
    if set(masks) - set(sel):
        raise ValueError(f"masks for parameters that are not sampled: {sorted(set(masks) - set(sel))}")
    return sel


class Chains:
    """All chains of all checkpoints (checkpoint-major: chain c of checkpoint g is row g*C + c): the flat buffer W
    of the sampled parameters, W0 a row per checkpoint, and each chain's frozen parameters (views, no copies)."""

    def __init__(self, w_stars, names, C, masks):
        w = w_stars[0]  # a masked tensor: its True elements in W, the rest (and the other names) frozen per chain
        self.names, self.shapes = names, [w[k].shape for k in names]
        self.idx = [masks[k].to(w[k].device).reshape(-1).nonzero()[:, 0] if k in masks else None for k in names]
        self.sizes = [w[k].numel() if i is None else len(i) for k, i in zip(names, self.idx)]
        self.K, self.C, self.CT = len(w_stars), C, len(w_stars) * C
        flat = lambda t, i: t.reshape(-1) if i is None else t.reshape(-1)[i]  # noqa: E731
        self.W0 = torch.stack([torch.cat([flat(p[k], i) for k, i in zip(names, self.idx)]) for p in w_stars])  # (K, P)
        self.W = self.W0.repeat_interleave(C, 0)  # (CT, P)
        self.frozen = {k: torch.stack([p[k] for p in w_stars])[:, None].expand(self.K, C, *w[k].shape)
                       .reshape(self.CT, *w[k].shape) for k in w if k not in names or k in masks}

    def view(self, w, fz):
        """Named parameters from the flat row(s) w, (P,) or (G, P), as views (so grad gives a flat gradient), and fz;
        a masked tensor is its frozen w* with the sampled elements written in."""
        lead, out = w.shape[:-1], {}
        for k, p, sh, i in zip(self.names, torch.split(w, self.sizes, dim=-1), self.shapes, self.idx):
            shape = tuple(lead) + tuple(sh)  # a tuple: a 0-dim parameter has an empty shape
            out[k] = p.view(shape) if i is None else fz[k].reshape(*lead, -1).index_copy(-1, i, p).view(shape)
        return {**fz, **out}


# ---------------------------------------------------------------------------------------------------- data
def make_generators(seed, device):
    """Independent generators (data order, noise, L(w*) set, fixed dataset) from one seed. XLA draws on the CPU."""
    dev = torch.device(device)
    gdev = dev if dev.type in ("cpu", "cuda") else torch.device("cpu")
    seeds = [derive_seed(seed, 0x11C, i) for i in range(4)]
    return [torch.Generator(gdev).manual_seed(s) for s in seeds], seeds


_tuple = lambda batch: tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)  # noqa: E731


class FixedData:
    """A fixed set of rows: each chain walks its own permutation, reshuffled every epoch; L(w*) over every row."""

    def __init__(self, rows, device):
        self.rows = tuple(x.to(device) for x in _tuple(rows))
        self.n = self.rows[0].shape[0]
        if any(x.shape[0] != self.n for x in self.rows):
            raise ValueError(f"fixed dataset: tensors need the same number of rows, got {[x.shape[0] for x in self.rows]}")
        self.perm = self.pos = None

    def chunks(self, m, gen):
        return (tuple(x[i:i + m] for x in self.rows) for i in range(0, self.n, m))

    def next(self, C, B, gen):
        if B == self.n:  # full batch: every chain sees the whole set
            return tuple(x.expand(C, *x.shape) for x in self.rows)
        if self.perm is None or self.pos + B > self.n:  # on the generator's device: on XLA the host slices it
            self.perm, self.pos = torch.argsort(torch.rand(C, self.n, generator=gen, device=gen.device), dim=1), 0
        idx = self.perm[:, self.pos:self.pos + B].to(self.rows[0].device)
        self.pos += B
        return tuple(x[idx] for x in self.rows)


class StreamData:
    """Fresh rows from sample(generator, m) at every step (chain c takes rows c*B:(c+1)*B of one draw); L(w*) on a
    seeded sample of n rows."""

    def __init__(self, sample, n, device):
        self.sample, self.n, self.device = sample, n, device

    def draw(self, m, gen):
        return tuple(x.to(self.device) for x in _tuple(self.sample(gen, m)))

    def chunks(self, m, gen):
        return (self.draw(min(m, self.n - i), gen) for i in range(0, self.n, m))

    def next(self, C, B, gen):
        return tuple(x.reshape(C, B, *x.shape[1:]) for x in self.draw(C * B, gen))


class IterData:
    """Batches from any iterable (a DataLoader; tuples or dicts of tensors), re-iterated at its end; chain c takes every
    C-th batch. L(w*) over the first n rows of one pass (default: 16 batches). Its own shuffling: no common numbers."""

    def __init__(self, iterable, n, device):
        self.src, self.device, self.keys, self.it = iterable, device, None, iter(iterable)
        self.B = self.fetch()[0].shape[0]
        self.n = n or 16 * self.B

    def fetch(self, again=True):
        b = next(self.it, None)
        if b is None and again:
            self.it = iter(self.src)
            b = next(self.it)
        if isinstance(b, dict):
            self.keys, b = list(b), tuple(b.values())
        return None if b is None else tuple(x.to(self.device) for x in _tuple(b))

    def chunks(self, m, gen):
        done, self.it = 0, iter(self.src)
        while done < self.n and (b := self.fetch(again=False)) is not None:
            yield tuple(x[:self.n - done] for x in b)
            done += min(len(b[0]), self.n - done)
        self.n, self.it = done, iter(self.src)  # fewer rows than n: L(w*) over all of them

    def next(self, C, B, gen):
        out = [self.fetch() for _ in range(C)]
        if any(len(b[0]) != B for b in out):
            raise ValueError(f"every batch needs {B} rows (a DataLoader: drop_last=True)")
        return tuple(torch.stack(x) for x in zip(*out))


@torch.no_grad()
def mean_loss(loss_fn, params, data, chunk, gen):
    """L(w*): the mean loss over data's L(w*) rows in chunks (weighted by size), accumulated in float64."""
    return sum(loss_fn(params, b).double() * b[0].shape[0] for b in data.chunks(chunk, gen)) / data.n


# ----------------------------------------------------------------------------- the chains' gradients
def vmap_grad(loss_fn, chains, s):
    """torch.func: grad vmapped over the chains (frozen parameters as vmapped inputs)."""
    def objective(w, fz, batch):
        loss = loss_fn(chains.view(w, fz), batch)
        return loss.mean(), loss.detach()
    g = vmap(grad(objective, has_aux=True))
    return lambda W, batch: g(W, chains.frozen, batch)


def loop_grad(loss_fn, chains, s):
    """torch.func: one chain at a time (CPU, large problems: activations stay in cache)."""
    def objective(w, i, batch):
        loss = loss_fn(chains.view(w, {k: v[i] for k, v in chains.frozen.items()}), batch)
        return loss.mean(), loss.detach()
    one = grad(objective, has_aux=True)

    def grad_fn(W, batch):
        out = [one(W[i], i, tuple(x[i] for x in batch)) for i in range(chains.CT)]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    return grad_fn


def _native_rows(loss_fn, chains, W, lo, hi, batch, chunk):
    """loss_fn.batched_grad for chains lo:hi, flattened to (hi-lo, P); with `chunk`, averaged over row chunks."""
    p, B = chains.view(W[lo:hi], {k: v[lo:hi] for k, v in chains.frozen.items()}), batch[0].shape[1]
    flat, loss = 0, 0
    for r in range(0, B, chunk or B):
        m = min(chunk or B, B - r)
        lc, grads = loss_fn.batched_grad(p, tuple(x[lo:hi, r:r + m] for x in batch))
        gc = torch.cat([grads[k].reshape(hi - lo, -1)[:, slice(None) if i is None else i]
                        for k, i in zip(chains.names, chains.idx)], 1)
        if m == B:
            return gc, lc
        flat, loss = flat + gc * (m / B), loss + lc * (m / B)
    return flat, loss


def native_grad(loss_fn, chains, s):
    """The loss's hand-derived gradient, every chain in one batched computation (GPU/TPU)."""
    return lambda W, batch: _native_rows(loss_fn, chains, W, 0, chains.CT, batch, 0)


def native_loop_grad(loss_fn, chains, s):
    """The hand-derived gradient one chain at a time on `workers` threads, each single-threaded, in cache-sized
    row chunks (CPU): the same chains for any number of workers."""
    cpu = chains.W.device.type == "cpu"
    workers = min(chains.CT, int(s.workers or torch.get_num_threads())) if cpu else 1
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
    chunk = s.grad_chunk if cpu else 0

    def grad_fn(W, batch):
        out = list((pool.map if pool else map)(lambda i: _native_rows(loss_fn, chains, W, i, i + 1, batch, chunk),
                                               range(chains.CT)))
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    grad_fn.close = pool.shutdown if pool else None
    return grad_fn


GRADIENTS = {"vmap": vmap_grad, "loop": loop_grad, "native": native_grad, "native_loop": native_loop_grad}
CHAIN_MODES = ("auto", *GRADIENTS)


def pick_chain_mode(loss_fn, device, batch_rows, num_params):
    """auto's choice: the hand-derived gradient where the loss has one (one chain at a time on CPU), else
    torch.func: vmap, but a loop over chains on CPU for big problems (activations fall out of cache)."""
    cpu = torch.device(device).type == "cpu"
    if getattr(loss_fn, "batched_grad", None) is not None:
        return "native_loop" if cpu else "native"
    return "loop" if cpu and batch_rows * num_params >= 1e7 else "vmap"


def choose_gradient(loss_fn, w_stars, chains, data, s, gen, device):
    """The chain mode: explicit, or auto; a hand-derived gradient only after it matched autograd at every w*.
    auto falls back to autograd with one warning; an explicit native mode raises."""
    mode = pick_chain_mode(loss_fn, device, s.batch_size, chains.W.shape[1]) if s.chain_mode == "auto" else s.chain_mode
    if mode not in GRADIENTS:
        raise ValueError(f"unknown chain_mode {mode!r} ({', '.join(CHAIN_MODES)})")
    if mode.startswith("native"):
        if getattr(loss_fn, "batched_grad", None) is None:
            raise ValueError(f"chain_mode={mode!r} needs a loss_fn with a batched_grad (data.RunLoss has one for "
                             "the regression task)")
        rows = next(iter(data.chunks(8, gen)))
        bad = next(filter(None, (batched_grad_mismatch(loss_fn, w, chains.names, rows) for w in w_stars)), None)
        if bad and s.chain_mode == "auto":
            mode = pick_chain_mode(None, device, s.batch_size, chains.W.shape[1])
            warnings.warn(f"the hand-derived gradient disagrees with autograd ({bad}): has the model's code "
                          f"changed? Using chain_mode={mode!r} (autograd); set chain_mode to silence this")
        elif bad:
            raise ValueError(f"the hand-derived gradient (batched_grad) disagrees with autograd at w* (relative errors "
                             f"{bad}): has the model's code changed? Use chain_mode='loop' or 'vmap', or update "
                             "fast.py")
    return mode


def star_losses(loss_fn, chains, mode):
    """Every chain's minibatch loss at its own w*, without gradients (Settings.paired): one chain at a time where
    the gradients are (CPU loops), else vmapped over the chains."""
    W0 = chains.W0.repeat_interleave(chains.C, 0)
    if mode in ("loop", "native_loop"):
        def one(i, batch):
            fz = {k: v[i] for k, v in chains.frozen.items()}
            return loss_fn(chains.view(W0[i], fz), tuple(x[i] for x in batch))
        return torch.no_grad()(lambda batch: torch.stack([one(i, batch) for i in range(chains.CT)]))
    f = vmap(lambda w, fz, batch: loss_fn(chains.view(w, fz), batch))
    return torch.no_grad()(lambda batch: f(W0, chains.frozen, batch))


# --------------------------------------------------------------------------------------------- the loop
def sample(step, next_batch, total, CT, shape, W, xla, progress, stop=None):
    """The SGLD loop: every step's pre-step losses of all chains into an on-device trace (read back once), and which
    chains stayed finite (burn-in included); it ends early where stop(trace, steps done) says so."""
    trace = torch.empty((CT, total) + tuple(shape), device=W.device, dtype=W.dtype)
    alive = torch.ones(CT, dtype=torch.bool, device=W.device)
    t_dev = torch.zeros(1, dtype=torch.int64, device=W.device)  # XLA: a device-side index keeps one graph per step
    if xla:
        import torch_xla.core.xla_model as xm  # optional dependency (TPU)
    for t in range(total):
        loss = step(next_batch())
        alive &= torch.isfinite(loss.reshape(CT, -1)).all(1)
        if xla:
            trace.index_copy_(1, t_dev, loss.unsqueeze(1))
            t_dev.add_(1)
            xm.mark_step()
        else:
            trace[:, t] = loss
        if progress is not None:
            progress.update(t + 1)
        if stop is not None and stop(trace, t + 1):
            return trace[:, :t + 1], alive
    return trace, alive


def module_loss(model, loss, inputs, keys):
    """loss_fn(params, batch) of an nn.Module: loss(model(inputs(batch)), batch), dict batches rebuilt from keys."""
    def loss_fn(params, batch):
        b = dict(zip(keys, batch)) if keys else batch
        x = inputs(b) if inputs else b["input_ids"] if keys else b[0]
        return loss(functional_call(model, params, (x,)), b)
    return loss_fn


def checkpoints(params):
    """A list of w* dicts (a single dict: a list of one), all finite, with the same names and shapes."""
    group = list(params) if isinstance(params, (list, tuple)) else [params]
    if not group or any(set(p) != set(group[0]) or any(p[k].shape != group[0][k].shape for k in p) for p in group):
        raise ValueError("a list of checkpoints needs at least one, all with the same parameter names and shapes")
    if bad := [k for p in group for k, v in p.items() if not torch.isfinite(v).all()]:
        raise ValueError(f"parameter {bad[0]!r} of w* has non-finite values")
    return group


def wrap_data(data, s, device):
    """FixedData (a tuple of tensors), StreamData (a sample callable) or IterData (any iterable of batches); fills in
    s.batch_size where the data decide it."""
    if callable(data):
        if not s.batch_size:
            raise ValueError("a stream `data` (a sample callable) needs batch_size")
        return StreamData(data, int(s.n or 16 * s.batch_size), device)
    if not (torch.is_tensor(data) or isinstance(data, (tuple, list)) and all(map(torch.is_tensor, data))):
        s.batch_size = (data := IterData(data, s.n, device)).B
        return data
    data = FixedData(data, device)
    s.batch_size = int(s.batch_size or data.n)
    if s.n is not None and s.n != data.n or s.batch_size > data.n:
        raise ValueError(f"fixed dataset of {data.n} rows: n={s.n} must be None or {data.n}, batch_size="
                         f"{s.batch_size} at most {data.n}")
    return data


def choose_update(s, device, mode):
    backend = s.update_backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton is not None else "xla" if device.type == "xla" else "torch"
        backend = "torch" if backend == "triton" and not triton_update_ok(device) else backend
    if backend not in ("torch", "triton", "xla"):
        raise ValueError(f"unknown update_backend {backend!r} (auto, torch, triton, xla)")
    if s.cuda_graph and not (device.type == "cuda" and mode == "native" and backend == "triton"):
        raise ValueError("cuda_graph needs device cuda, chain_mode 'native' and the triton update")
    return backend


def estimate_llc(loss_fn, params, data, **settings):
    """The LLC at `params` (name -> tensor: w*), or at each of a list of them in one batched computation (a list of
    results, each its own estimate). loss_fn(params, batch) -> mean loss, or an nn.Module with loss=...; data: tensors
    (a fixed set), sample(generator, m) -> batch (a stream) or any iterable of batches. See Settings."""
    s, t_start, model = Settings(**settings), time.time(), loss_fn if isinstance(loss_fn, torch.nn.Module) else None
    if model is not None and s.loss is None:
        raise ValueError("with an nn.Module give loss=callable(model_output, batch)")
    if model is not None and params is None:
        params = {k: v.detach() for k, v in model.named_parameters()}
    group = checkpoints(params)
    device = torch.device(s.device) if s.device is not None else next(iter(group[0].values())).device
    w_stars = [{k: v.detach().to(device) for k, v in p.items()} for p in group]
    (g_data, g_noise, g_init, _), seeds = make_generators(s.seed, device)
    data = wrap_data(data, s, device)
    loss_fn = module_loss(model, s.loss, s.inputs, getattr(data, "keys", None)) if model is not None else loss_fn
    s.nbeta = s.batch_size / math.log(s.batch_size) if s.nbeta == "default" else s.nbeta
    L0 = [torch.as_tensor(v, dtype=torch.float64, device=device) for v in s.init_loss or []]
    for w in w_stars[len(L0):]:  # every checkpoint's L(w*) on the same rows (unless given)
        g_init.manual_seed(seeds[2])
        L0.append(mean_loss(loss_fn, w, data, s.batch_size, g_init))
    if len(L0) != len(w_stars) or any(v.dim() != int(s.per_token) or not torch.isfinite(v).all() for v in L0):
        raise ValueError(f"L(w*) = {[v.tolist() for v in L0]}: need a finite "
                         f"{'vector (per_token=True)' if s.per_token else 'scalar (per_token=False)'} per checkpoint")
    s.n = data.n
    chains = Chains(w_stars, sampled_names(s, w_stars[0]), s.num_chains, s.masks or {})
    mode = choose_gradient(loss_fn, w_stars, chains, data, s, g_init, device)
    backend = choose_update(s, device, mode)
    grad_fn, threads = GRADIENTS[mode](loss_fn, chains, s), torch.get_num_threads()
    if mode == "native_loop" and device.type == "cpu":  # each chain single-threaded, whichever worker runs it
        torch.set_num_threads(1)
    W, W0, C, K = chains.W, chains.W0, s.num_chains, chains.K
    a, b, c = sgld_coefficients(s.epsilon, s.gamma, s.nbeta)
    key = torch.tensor([noise_key(seeds[1], 0)], dtype=torch.int64, device=device)

    star = star_losses(loss_fn, chains, mode) if s.paired else None

    def sgld_step(batch):
        """Every chain's gradient at its pre-step point, then the update; returns the pre-step losses (paired:
        stacked with the losses at w* on the same minibatch)."""
        G, loss = grad_fn(W, batch)
        loss = torch.stack([loss, star(batch)], 1) if star is not None else loss
        if backend == "triton":
            sgld_update_triton(W, W0, G, a, b, c, key)
            key.add_(1)
        else:  # one checkpoint's worth of noise, used by every checkpoint (as in the kernel)
            noise = torch.randn((C, W.shape[1]), generator=g_noise, device=g_noise.device, dtype=W.dtype)
            sgld_update_torch(W, W0, G, noise.to(device), a, b, c)
        return loss

    def next_batch():  # every checkpoint's chain c gets chain c's minibatch
        batch = data.next(C, s.batch_size, g_data)
        return batch if K == 1 else tuple(x.repeat(K, *[1] * (x.dim() - 1)) for x in batch)

    def summaries(trace, alive):  # each checkpoint's estimate from the post-burn-in part of the on-device trace
        tr = trace[:, s.num_burnin:].double().cpu().numpy()  # the one read-back (and one per se check)
        return [chain_summary(tr[g * C:(g + 1) * C], L0[g].cpu().numpy(), alive[g * C:(g + 1) * C], s.nbeta,
                              s.per_token, s.paired, s.horizon) for g in range(K)], tr.shape[1]

    def reached(trace, t):  # the se target: checked every 100 draws
        return bool(s.se_target) and t > s.num_burnin and (t - s.num_burnin) % 100 == 0 and all(
            r is not None and r["llc_se"] <= s.se_target for r in summaries(trace[:, :t], np.ones(chains.CT, bool))[0])

    total, t_sample = s.num_burnin + s.num_draws, time.time()
    step, batches = sgld_step, next_batch
    if s.cuda_graph:  # step 0's batch fills the static buffers; step 0 then uses it
        first = [next_batch()]
        step = cuda_graph_step(sgld_step, first[0], W, key)
        batches = lambda: first.pop() if first else next_batch()  # noqa: E731
    try:
        shape = ((2,) if s.paired else ()) + tuple(L0[0].shape)
        trace, alive = sample(step, batches, total, chains.CT, shape, W, backend == "xla",
                              Progress(s.progress, total, "SGLD steps") if s.progress else None, reached)
    finally:
        if getattr(grad_fn, "close", None):
            grad_fn.close()
        torch.set_num_threads(threads)
    results, draws = summaries(trace, alive.cpu().numpy())
    info = dict(epsilon=s.epsilon, gamma=s.gamma, nbeta=s.nbeta, num_chains=C, num_draws=s.num_draws,
                num_burnin=s.num_burnin, batch_size=s.batch_size, seed=s.seed, n=s.n, paired=bool(s.paired),
                horizon=s.horizon,
                data_mode="stream" if isinstance(data, StreamData) else "fixed", num_params=W.shape[1],
                update_backend=backend, chain_mode=mode, cuda_graph=bool(s.cuda_graph), checkpoints_batched=K,
                **(dict(se_target=s.se_target, draws_used=draws) if s.se_target else {}),  # num_draws: the cap
                sample_time=time.time() - t_sample)  # the SGLD loop: chain-steps/s = K*C*(burn-in + draws)/sample_time
    lost = [g for g, r in enumerate(results) if r is None]
    if lost:
        raise AllChainsDivergedError(
            f"all {C} SGLD chains diverged (non-finite loss) with epsilon={s.epsilon}, nbeta={s.nbeta}, "
            f"gamma={s.gamma}{f' at checkpoint(s) {lost} of the {K}' if K > 1 else ''}: lower epsilon (or nbeta), "
            "or check that w* is near a minimum")
    for g, r in enumerate(results):
        r.update(info, wall_time=time.time() - t_start)
        if abs(r["llc_drift_z"]) > DRIFT_Z:
            warnings.warn(f"{f'checkpoint {g}: ' if K > 1 else ''}the chains still drift: the last quarter of the "
                          f"draws sits {r['llc_drift']:+.2f} LLC ({r['llc_drift_z']:+.1f} se) from the one before; "
                          "lengthen num_burnin (or num_draws)")
    return results if isinstance(params, (list, tuple)) else results[0]


# ---------------------------------------------------------------------------------------------- diagnostics
def ess_rhat(x):
    """Multi-chain effective sample size (Geyer's initial monotone sequence, as in Stan), split-R-hat and the pooled
    variance, for x of shape (C, T)."""
    C, T = x.shape
    if T < 4:
        return float(C * T), float("nan"), float(x.var()) if x.size > 1 else 0.0
    h = T // 2
    halves = np.concatenate([x[:, :h], x[:, T - h:]])
    Wh = halves.var(1, ddof=1).mean()
    var_h = (h - 1) / h * Wh + halves.mean(1).var(ddof=1)
    rhat = float(np.sqrt(var_h / Wh)) if Wh > 0 else float("nan")
    xc = x - x.mean(1, keepdims=True)
    f = np.fft.rfft(xc, 2 * T)
    acov = np.fft.irfft(f * np.conj(f), 2 * T)[:, :T] / T
    W = acov[:, 0].mean() * T / (T - 1)
    var_plus = W * (T - 1) / T + (x.mean(1).var(ddof=1) if C > 1 else 0.0)
    if var_plus <= 0:
        return float(C * T), rhat, 0.0
    rho = 1 - (W - acov.mean(0)) / var_plus
    rho[0] = 1.0
    pairs = rho[:-1:2] + rho[1::2]
    k = int(np.argmax(pairs <= 0)) if (pairs <= 0).any() else len(pairs)
    tau = -1 + 2 * np.minimum.accumulate(pairs[:max(k, 1)]).sum()
    ess = C * T / max(tau, 1 / np.log10(max(C * T, 10)))
    return float(ess), rhat, float(var_plus)


def drift(x):
    """The kept draws' second half, its later quarter's mean minus its earlier quarter's, for x (C, T) in LLC
    units, and that difference's se (chain spread or ESS, the larger): near 0 once the chains have settled."""
    q = x.shape[1] // 4
    if q < 2:
        return float("nan"), float("nan")
    a, b = x[:, -2 * q:-q], x[:, -q:]
    d = b.mean(1) - a.mean(1)
    se_chains = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    se_ess = math.sqrt(sum(var / ess for ess, _, var in (ess_rhat(a), ess_rhat(b))))
    return float(d.mean()), float(max(se_chains, se_ess))


def extrapolate(x, horizon):
    """Each chain's mean over `horizon` steps from w* when only T < horizon ran (x: (C, T) per-draw LLC, no burn-in):
    the steps not run count at the mean of the run's last half, where the chains are taken as settled (llc_drift
    says how far they are). The paper's v1 value averages 5,000 steps from w*; this reads it off a shorter run."""
    T = x.shape[1]
    if horizon <= T:
        return x.mean(1)
    return (x.sum(1) + (horizon - T) * x[:, T // 2:].mean(1)) / horizon


def chain_summary(tr, L0, alive, nbeta, per_token, paired=False, horizon=0):
    """The estimate and its diagnostics from one checkpoint's post-burn-in losses tr (C, T[, 2][, K]), L(w*) and
    the chains that stayed finite; None when every chain diverged. llc_se is the larger of the ESS standard error
    and the chain means' spread sd/sqrt(chains): an ESS within chains misses slow modes that the spread sees."""
    C = tr.shape[0]
    bad = ~alive | ~np.isfinite(tr.reshape(C, -1)).all(1)
    ok = np.flatnonzero(~bad)
    if len(ok) == 0:
        return None
    raw, star = (tr[:, :, 0], tr[:, :, 1]) if paired else (tr, None)
    excess = raw - (star if paired else L0)  # per draw: L_batch(w_t) - L(w*), paired on the same batch
    tokens = (lambda x: x.mean(-1)) if per_token else (lambda x: x)  # per-token losses averaged over tokens
    ex = nbeta * tokens(excess)  # (C, T): per-draw LLC
    per_chain = extrapolate(ex, horizon)
    per_chain[bad] = np.nan
    ess, rhat, var = ess_rhat(ex[ok])
    se_ess = math.sqrt(var / ess) if horizon <= ex.shape[1] else float("nan")  # extrapolated: the spread only
    se_chains = float(per_chain[ok].std(ddof=1) / math.sqrt(len(ok))) if len(ok) > 1 else float("nan")
    d, d_se = drift(ex[ok])
    out = dict(llc_mean=float(per_chain[ok].mean()),
               llc_std=float(per_chain[ok].std(ddof=1)) if len(ok) > 1 else 0.0,
               llc_se=float(np.nanmax([se_ess, se_chains])), llc_se_ess=se_ess, llc_se_chains=se_chains,
               llc_drift=d, llc_drift_z=d / d_se if d_se > 0 else float("nan"),
               llc_per_chain=per_chain.tolist(), loss_trace=torch.from_numpy(tokens(raw)),
               llc_trace=torch.from_numpy(ex),
               init_loss=float(L0.mean()), nan_chains=np.flatnonzero(bad).tolist(), rhat=rhat, ess=ess)
    if paired:
        out["init_loss_paired"] = float(tokens(star[ok]).mean())
    if per_token:
        out["llc_per_token"] = (nbeta * excess[ok].mean((0, 1))).tolist()
        out["init_loss_per_token"] = L0.tolist()
    return out
