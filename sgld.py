"""The local learning coefficient estimator, lambda_hat = n*beta * (E[L_batch(w)] - L(w*)) over SGLD
chains localised at w* (Lau et al. 2023), for one or several checkpoints at once: all chains'
sampled parameters in one flat buffer W (chains, P), moved by one update; each step's losses stay on
the device until the end.

This file is the whole estimator: copy it alone and `from sgld import estimate_llc` (torch and numpy
only). Beside it in the project, fast/ adds optional fast paths (the fused Triton update, a
CUDA-graph step, the check of a hand-derived gradient); they are looked up when an estimate starts
(fast_paths) and used only when present.

Reading order: Settings, then "the loop" (sgld_loop and its update, one screen), then
estimate_llc."""
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

DRIFT_Z = 4.0  # |llc_drift_z| above this warns: the chains have not settled by the draws' last half


class AllChainsDivergedError(RuntimeError):
    """Every chain of a checkpoint produced a non-finite loss: the sampler settings are unstable
    there."""


try:  # the project's optional fast paths; a copy of sgld.py alone runs without them
    import fast as _fast
except ImportError:
    _fast = None


def fast_paths():
    """The module fast/ when it is importable (it is, in the project), else None: then the torch
    update and autograd only. fast/ imports nothing from the project (its kernel check is handed
    sgld_update_torch), so the import graph has no cycle."""
    return _fast


@dataclass
class Settings:
    """What a user sets; estimate_llc(..., **settings) takes these names. Values the estimate
    derives from them (the batch size of a DataLoader, nbeta="default", the rows of the L(w*) set)
    are reported in its result."""
    epsilon: float                  # step size
    gamma: float                    # localisation strength (pull towards w*)
    nbeta: object                   # n * inverse temperature; "default": B / ln B (devinterp's)
    num_chains: int = 8
    num_draws: int = 500
    num_burnin: int = 0
    batch_size: int | None = None   # rows per chain and step (default: all fixed rows; a loader's)
    seed: int = 0
    n: int | None = None            # rows of the L(w*) set (default 16 x batch_size; estimate_llc)
    include: object = None          # restricted LLC: globs of the sampled parameters (all) ...
    exclude: object = None          # ... minus these; the others stay at w*
    masks: dict | None = None       # {name: bool tensor}: sample only the True elements (and names)
    loss: object = None             # params is an nn.Module: loss(model(input), batch) is the loss
    inputs: object = None           # ... input = inputs(batch) (default batch[0] or ["input_ids"])
    per_token: bool = False         # loss_fn gives per-token losses (the gradient: of their mean)
    device: object = None           # default: the device of the parameters
    update_backend: str = "auto"    # auto (CUDA: triton, XLA: xla, else torch) | torch | ...
    chain_mode: str = "auto"        # how the chains' gradients are computed: auto | CHAIN_MODES
    cuda_graph: bool = False        # capture one SGLD step in a CUDA graph (CUDA, native, triton)
    workers: int | None = None      # native_loop on CPU: chain threads (default torch's threads)
    grad_chunk: int = 256           # native_loop on CPU: rows per gradient pass (0: whole batch)
    progress: str | None = None     # a label: progress lines with rate and ETA on stderr
    init_loss: list | None = None   # L(w*) per checkpoint, as results give it (init_loss...)
    se_target: float = 0.0          # stop once every llc_se is at most this (every 100 draws)
    paired: bool = False            # L(w*) on each draw's own minibatch: no L(w*) set error
    horizon: int = 0                # > num_draws: the mean over this many steps, extrapolated
    observe: object = None          # observe(params) -> (m,) tensor at a chain's point: its mean
    observe_every: int = 10         # ... and covariance over every k-th draw (result "observed")
    observe_anchors: int = 0        # > 0: the covariance with the first this many entries only

    def __post_init__(self):
        """A value out of range is named with its bound, e.g. "num_chains=0 must be at least 1"."""
        nbeta = 1.0 if self.nbeta == "default" else self.nbeta
        above = {"epsilon": self.epsilon, "nbeta": nbeta}
        least = {"num_chains": 1, "num_draws": 1, "batch_size": 1, "n": 1, "gamma": 0,
                 "num_burnin": 0, "grad_chunk": 0, "se_target": 0, "horizon": 0,
                 "observe_every": 1, "observe_anchors": 0}
        bad = [f"{k}={v!r} must be above 0" for k, v in above.items() if not v > 0]
        bad += [f"{k}={getattr(self, k)!r} must be at least {lo}" for k, lo in least.items()
                if getattr(self, k) is not None and not getattr(self, k) >= lo]
        if self.horizon and self.num_burnin:
            bad.append(f"horizon={self.horizon} needs num_burnin=0 (it extrapolates from w*)")
        if bad:
            raise ValueError("; ".join(bad))


# ----------------------------------------------------------------------------------------- the loop
def sgld_loop(grad_fn, update, batches, W, total, shape, star=None, graph=None, stop=None,
              progress=None, sync=None, observe=None):
    """`total` SGLD steps of every chain (a row of W). A step: each chain's loss and gradient at its
    pre-step point on its own minibatch (paired: and its loss at w* on that minibatch, star), then
    update(W, G). Returns the pre-step losses of every step, (chains, steps, *shape), kept on the
    device (read back once), and which chains stayed finite. stop(trace, steps done) may end it
    early; graph(step, batch) may replace the step by a captured one (a CUDA graph, on step 0's
    batch); sync() ends each step (XLA); observe(t, W) looks at the chains before step t."""
    def step(batch):
        G, loss = grad_fn(W, batch)
        if star is not None:
            loss = torch.stack([loss, star(batch)], 1)
        update(W, G)
        return loss

    trace = torch.empty((W.shape[0], total, *shape), device=W.device, dtype=W.dtype)
    alive = torch.ones(W.shape[0], dtype=torch.bool, device=W.device)
    t_dev = torch.zeros(1, dtype=torch.int64, device=W.device)  # an on-device index: one XLA graph
    batch = batches()
    step = step if graph is None else graph(step, batch)
    for t in range(total):
        if observe is not None:
            observe(t, W)
        loss = step(batch if t == 0 else batches())
        alive &= torch.isfinite(loss.reshape(W.shape[0], -1)).all(1)
        trace.index_copy_(1, t_dev, loss.unsqueeze(1).to(trace.dtype))  # trace[:, t] = loss
        t_dev += 1
        if sync is not None:
            sync()
        if progress is not None:
            progress.update(t + 1)
        if stop is not None and stop(trace, t + 1):
            return trace[:, :t + 1], alive
    return trace, alive


def sgld_coefficients(epsilon, gamma, nbeta):
    """w <- w - (eps/2)[nbeta g + gamma (w - w*)] + sqrt(eps) xi == w - a g - b (w - w*) + c xi."""
    return epsilon * nbeta / 2, epsilon * gamma / 2, math.sqrt(epsilon)


def sgld_update_torch(W, W0, G, noise, a, b, c):
    """W <- W - a G - b (W - W0) + c noise in place (the Triton kernel's order). W0: (P,), or a row
    per group of chains (R, P); noise: (C, P), or one group's (C / R, P) used by every group."""
    R, P = (W0.shape[0] if W0.dim() == 2 else 1), W.shape[1]
    z = noise.view(-1, P) if noise.shape[0] != W.shape[0] else noise.view(R, -1, P)
    Wg = W.view(R, -1, P)
    Wg.copy_(Wg - a * G.view(R, -1, P) - b * (Wg - W0.view(R, 1, P)) + c * z)


def noise_key(seed, step):
    """The Triton update's Philox key for one step: seed in the high word, step in the low word."""
    return ((int(seed) & 0x7FFFFFFF) << 32) | (int(step) & 0xFFFFFFFF)


def make_update(backend, W0, C, coeffs, seed, gen):
    """update(W, G): the SGLD update of every chain in place, each checkpoint's chains pulled to
    their row of W0, with one checkpoint's worth of noise (C chains) used by every checkpoint.
    torch: the noise from `gen`; triton: fast/'s fused kernel, which draws it from a Philox key
    kept on the device (update.key)."""
    a, b, c = coeffs
    if backend == "triton":
        key = torch.tensor([noise_key(seed, 0)], dtype=torch.int64, device=W0.device)

        def update(W, G):
            fast_paths().sgld_update_triton(W, W0, G, a, b, c, key)
            key.add_(1)
        update.key = key
        return update

    def update(W, G):
        noise = torch.randn((C, W.shape[1]), generator=gen, device=gen.device, dtype=W.dtype)
        sgld_update_torch(W, W0, G, noise.to(W.device), a, b, c)
    return update


# ------------------------------------------------------------------------------------- the estimate
def estimate_llc(loss_fn, params, data, **settings):
    """The LLC at `params` (name -> tensor: w*), or at each of a list of them in one batched
    computation (a list of results, each its own estimate). loss_fn(params, batch) -> mean loss, or
    an nn.Module with loss=callable(model_output, batch) (params None: the module's own). data:
    tensors (a fixed set), sample(generator, m) -> batch (a stream), or any iterable of batches (a
    DataLoader: a short last batch is skipped). See Settings for the rest.

    L(w*) is the mean loss over a separate set of n rows (n is reported in the result): a fixed set:
    all of its rows; a stream: n fresh rows (default 16 x batch_size); an iterable: its first n rows
    (default 16 batches; all of them if it has fewer). paired=True takes L(w*) on each draw's own
    minibatch instead."""
    s, t_start = Settings(**settings), time.time()
    loss_fn, w_stars, data, B, device = setup(loss_fn, params, data, s)
    (g_data, g_noise, g_init, _), seeds = make_generators(s.seed, device)
    nbeta = B / math.log(B) if s.nbeta == "default" else s.nbeta
    L0 = init_losses(loss_fn, w_stars, data, B, s, g_init, seeds[2])
    C, num_ckpts = s.num_chains, len(w_stars)
    chains = Chains(w_stars, sampled_names(s, w_stars[0]), C, s.masks or {})
    mode = choose_gradient(loss_fn, w_stars, chains, data, s, B, g_init, device)
    backend = choose_update(s, device, mode)
    make_grad = GRADIENTS[mode] if mode in GRADIENTS else fast_paths().NATIVE_GRADIENTS[mode]
    grad_fn, threads = make_grad(loss_fn, chains, s), torch.get_num_threads()
    if mode == "native_loop" and device.type == "cpu":  # each chain single-threaded, any worker
        torch.set_num_threads(1)
    coeffs = sgld_coefficients(s.epsilon, s.gamma, nbeta)
    update = make_update(backend, chains.W0, C, coeffs, seeds[1], g_noise)
    observer = None if s.observe is None else Observer(s, chains, mode in ("loop", "native_loop"))
    total, t_sample = s.num_burnin + s.num_draws, time.time()
    try:
        trace, alive = sgld_loop(
            grad_fn, update, minibatches(data, C, B, num_ckpts, g_data), chains.W, total,
            ((2,) if s.paired else ()) + tuple(L0[0].shape),
            star=star_losses(loss_fn, chains, mode) if s.paired else None,
            graph=cuda_graph(chains.W, update) if s.cuda_graph else None,
            stop=se_stop(s, L0, nbeta), sync=xla_mark_step() if backend == "xla" else None,
            progress=Progress(s.progress, total, "SGLD steps") if s.progress else None,
            observe=observer)
    finally:
        if getattr(grad_fn, "close", None):
            grad_fn.close()
        torch.set_num_threads(threads)
    results, draws = summarise(trace, alive.cpu().numpy(), L0, s, nbeta)
    info = dict(epsilon=s.epsilon, gamma=s.gamma, nbeta=nbeta, num_chains=C, num_draws=s.num_draws,
                num_burnin=s.num_burnin, batch_size=B, seed=s.seed, n=data.n, paired=bool(s.paired),
                horizon=s.horizon, data_mode="stream" if isinstance(data, StreamData) else "fixed",
                num_params=chains.W.shape[1], update_backend=backend, chain_mode=mode,
                cuda_graph=bool(s.cuda_graph), checkpoints_batched=num_ckpts,
                **(dict(se_target=s.se_target, draws_used=draws) if s.se_target else {}),
                sample_time=time.time() - t_sample)  # chain-steps/s: num_ckpts*C*total / this
    finish(results, info, t_start)
    if observer is not None:
        observer.attach(results)
    return results if isinstance(params, (list, tuple)) else results[0]


def setup(loss_fn, params, data, s):
    """(loss_fn(params, batch), the w* dicts on the device, the wrapped data, its batch size, the
    device): an nn.Module becomes a loss of its parameters, by default at its own parameters."""
    model = loss_fn if isinstance(loss_fn, torch.nn.Module) else None
    if model is not None and s.loss is None:
        raise ValueError("with an nn.Module give loss=callable(model_output, batch)")
    if model is not None and params is None:
        params = {k: v.detach() for k, v in model.named_parameters()}
    group = checkpoints(params)
    device = next(iter(group[0].values())).device if s.device is None else torch.device(s.device)
    w_stars = [{k: v.detach().to(device) for k, v in p.items()} for p in group]
    data, B = wrap_data(data, s, device)
    if model is not None:
        loss_fn = module_loss(model, s.loss, s.inputs, getattr(data, "keys", None))
    return loss_fn, w_stars, data, B, device


def init_losses(loss_fn, w_stars, data, B, s, gen, seed):
    """L(w*) per checkpoint (float64): as given (s.init_loss), else the mean loss over data's L(w*)
    set, the same rows for every checkpoint (gen reseeded each time)."""
    device = next(iter(w_stars[0].values())).device
    L0 = [torch.as_tensor(v, dtype=torch.float64, device=device) for v in s.init_loss or []]
    for w in w_stars[len(L0):]:
        gen.manual_seed(seed)
        L0.append(mean_loss(loss_fn, w, data, B, gen))
    bad = any(v.dim() != int(s.per_token) or not torch.isfinite(v).all() for v in L0)
    if bad or len(L0) != len(w_stars):
        want = "vector (per_token=True)" if s.per_token else "scalar (per_token=False)"
        raise ValueError(f"L(w*) = {[v.tolist() for v in L0]}: need a finite {want} per checkpoint")
    return L0


def summarise(trace, alive, L0, s, nbeta):
    """Each checkpoint's estimate from the post-burn-in part of the on-device trace (read back
    here), and the number of draws it used."""
    C, tr = s.num_chains, trace[:, s.num_burnin:].double().cpu().numpy()
    rows = [chain_summary(tr[g * C:(g + 1) * C], L0[g].cpu().numpy(), alive[g * C:(g + 1) * C],
                          nbeta, s.per_token, s.paired, s.horizon) for g in range(len(L0))]
    return rows, tr.shape[1]


def se_stop(s, L0, nbeta):
    """stop(trace, steps done) for Settings.se_target (None without one): every checkpoint's llc_se
    at most the target, checked every 100 draws."""
    if not s.se_target:
        return None

    def stop(trace, t):
        if t <= s.num_burnin or (t - s.num_burnin) % 100:
            return False
        rows = summarise(trace[:, :t], np.ones(trace.shape[0], bool), L0, s, nbeta)[0]
        return all(r is not None and r["llc_se"] <= s.se_target for r in rows)
    return stop


def finish(results, info, t_start):
    """Raise where every chain of a checkpoint diverged; else add the run's settings to each result
    and warn where its chains still drift."""
    many = len(results) > 1
    if lost := [g for g, r in enumerate(results) if r is None]:
        raise AllChainsDivergedError(
            f"all {info['num_chains']} SGLD chains diverged (non-finite loss) with "
            f"epsilon={info['epsilon']}, nbeta={info['nbeta']}, gamma={info['gamma']}"
            f"{f' at checkpoint(s) {lost} of the {len(results)}' if many else ''}: lower epsilon "
            "(or nbeta), or check that w* is near a minimum")
    for g, r in enumerate(results):
        r.update(info, wall_time=time.time() - t_start)
        if abs(r["llc_drift_z"]) > DRIFT_Z:
            where = f"checkpoint {g}: " if many else ""
            warnings.warn(f"{where}the chains still drift: the last quarter of the draws sits "
                          f"{r['llc_drift']:+.2f} LLC ({r['llc_drift_z']:+.1f} se) from the one "
                          "before; lengthen num_burnin (or num_draws)")


def module_loss(model, loss, inputs, keys):
    """loss_fn(params, batch) of an nn.Module: loss(model(inputs(batch)), batch), dict batches
    rebuilt from keys."""
    def loss_fn(params, batch):
        b = dict(zip(keys, batch)) if keys else batch
        x = inputs(b) if inputs else b["input_ids"] if keys else b[0]
        return loss(functional_call(model, params, (x,)), b)
    return loss_fn


def checkpoints(params):
    """A list of w* dicts (a single dict: a list of one), all finite, with the same names and
    shapes."""
    group = list(params) if isinstance(params, (list, tuple)) else [params]
    if not group or any(set(p) != set(group[0]) or any(p[k].shape != group[0][k].shape for k in p)
                        for p in group):
        raise ValueError("a list of checkpoints needs at least one, all with the same parameter "
                         "names and shapes")
    if bad := [k for p in group for k, v in p.items() if not torch.isfinite(v).all()]:
        raise ValueError(f"parameter {bad[0]!r} of w* has non-finite values")
    return group


def choose_update(s, device, mode):
    """The update backend: auto is triton on CUDA (fast/, once its kernel passed its check), xla
    on XLA, else torch."""
    fast, backend = fast_paths(), s.update_backend
    if backend == "auto":
        backend = "xla" if device.type == "xla" else "torch"
        if device.type == "cuda" and fast is not None and fast.triton is not None:
            backend = "triton" if fast.triton_update_ok(device, sgld_update_torch) else "torch"
    if backend not in ("torch", "triton", "xla"):
        raise ValueError(f"unknown update_backend {backend!r} (auto, torch, triton, xla)")
    if backend == "triton" and fast is None:
        raise ValueError("update_backend='triton' needs fast/ (the project's) beside sgld.py")
    if s.cuda_graph and not (device.type == "cuda" and mode == "native" and backend == "triton"):
        raise ValueError("cuda_graph needs device cuda, chain_mode 'native' and the triton update")
    return backend


def xla_mark_step():
    import torch_xla.core.xla_model as xm  # optional dependency (TPU): one graph per SGLD step
    return xm.mark_step


def cuda_graph(W, update):
    """graph(step, batch) for sgld_loop: fast/'s capture of the step in a CUDA graph, checked
    against the eager step (W and the noise key restored after)."""
    return lambda step, batch: fast_paths().cuda_graph_step(step, batch, W, update.key)


# ------------------------------------------------------------------------------------------- chains
def sampled_names(s, w):
    """The names of w the chains sample: by include/exclude pattern, or (masks alone) the masked
    names; the masks checked."""
    masks, names = s.masks or {}, list(w)
    for k, m in masks.items():
        if k not in w or m.dtype != torch.bool or m.shape != w[k].shape or not m.any():
            raise ValueError(f"mask {k!r}: need a bool tensor of the parameter's shape with a True "
                             f"element (names: {', '.join(names)})")
    if masks and s.include is None and s.exclude is None:
        return [n for n in names if n in masks]
    sel = select_params(names, s.include, s.exclude)
    if set(masks) - set(sel):
        raise ValueError(f"masks for parameters not sampled: {sorted(set(masks) - set(sel))}")
    return sel


class Chains:
    """All chains of all checkpoints (checkpoint-major: chain c of checkpoint g is row g*C + c): the
    flat buffer W of the sampled parameters, W0 a row per checkpoint, and each chain's frozen
    parameters (views, no copies)."""

    def __init__(self, w_stars, names, C, masks):
        w = w_stars[0]  # a masked tensor: its True elements in W, the rest (and other names) frozen
        self.names, self.shapes = names, [w[k].shape for k in names]
        self.idx = [masks[k].to(w[k].device).reshape(-1).nonzero()[:, 0] if k in masks else None
                    for k in names]
        self.sizes = [w[k].numel() if i is None else len(i) for k, i in zip(names, self.idx)]
        self.num_ckpts, self.C, self.CT = len(w_stars), C, len(w_stars) * C
        flat = lambda t, i: t.reshape(-1) if i is None else t.reshape(-1)[i]  # noqa: E731
        self.W0 = torch.stack([torch.cat([flat(p[k], i) for k, i in zip(names, self.idx)])
                               for p in w_stars])  # (num_ckpts, P)
        self.W = self.W0.repeat_interleave(C, 0)  # (CT, P)
        self.frozen = {k: torch.stack([p[k] for p in w_stars])[:, None]
                       .expand(self.num_ckpts, C, *w[k].shape).reshape(self.CT, *w[k].shape)
                       for k in w if k not in names or k in masks}

    def view(self, w, fz):
        """Named parameters from the flat row(s) w, (P,) or (R, P), as views (so grad gives a flat
        gradient), and fz; a masked tensor is its frozen w* with the sampled elements written in."""
        lead, out = w.shape[:-1], {}
        parts = torch.split(w, self.sizes, dim=-1)
        for k, p, sh, i in zip(self.names, parts, self.shapes, self.idx):
            shape = tuple(lead) + tuple(sh)  # a tuple: a 0-dim parameter has an empty shape
            out[k] = p.view(shape) if i is None else \
                fz[k].reshape(*lead, -1).index_copy(-1, i, p).view(shape)
        return {**fz, **out}


# --------------------------------------------------------------------------------------------- data
def make_generators(seed, device):
    """Independent generators (data order, noise, L(w*) set, fixed dataset) from one seed. XLA draws
    on the CPU."""
    dev = torch.device(device)
    gdev = dev if dev.type in ("cpu", "cuda") else torch.device("cpu")
    seeds = [derive_seed(seed, 0x11C, i) for i in range(4)]
    return [torch.Generator(gdev).manual_seed(s) for s in seeds], seeds


def wrap_data(data, s, device):
    """(FixedData (a tuple of tensors), StreamData (a sample callable) or IterData (any iterable of
    batches), the batch size): s.batch_size, or where the data decide it, theirs."""
    if callable(data):
        if not s.batch_size:
            raise ValueError("a stream `data` (a sample callable) needs batch_size")
        return StreamData(data, int(s.n or 16 * s.batch_size), device), s.batch_size
    tensors = isinstance(data, (tuple, list)) and all(map(torch.is_tensor, data))
    if not (torch.is_tensor(data) or tensors):
        data = IterData(data, s.n, device)
        return data, data.B
    data = FixedData(data, device)
    B = int(s.batch_size or data.n)
    if s.n is not None and s.n != data.n or B > data.n:
        raise ValueError(f"fixed dataset of {data.n} rows: n={s.n} must be None or {data.n}, "
                         f"batch_size={B} at most {data.n}")
    return data, B


def minibatches(data, C, B, num_ckpts, gen):
    """next() -> every chain's minibatch for one step: chain c of every checkpoint gets chain c's
    rows."""
    def next_batch():
        batch = data.next(C, B, gen)
        if num_ckpts == 1:
            return batch
        return tuple(x.repeat(num_ckpts, *[1] * (x.dim() - 1)) for x in batch)
    return next_batch


_tuple = lambda batch: tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)  # noqa: E731


class FixedData:
    """A fixed set of rows: each chain walks its own permutation, reshuffled every epoch; L(w*) over
    every row."""

    def __init__(self, rows, device):
        self.rows = tuple(x.to(device) for x in _tuple(rows))
        self.n = self.rows[0].shape[0]
        if any(x.shape[0] != self.n for x in self.rows):
            raise ValueError(f"fixed dataset: tensors need the same number of rows, got "
                             f"{[x.shape[0] for x in self.rows]}")
        self.perm = self.pos = None

    def chunks(self, m, gen):
        return (tuple(x[i:i + m] for x in self.rows) for i in range(0, self.n, m))

    def next(self, C, B, gen):
        if B == self.n:  # full batch: every chain sees the whole set
            return tuple(x.expand(C, *x.shape) for x in self.rows)
        if self.perm is None or self.pos + B > self.n:  # on the generator's device (XLA: host)
            rand = torch.rand(C, self.n, generator=gen, device=gen.device)
            self.perm, self.pos = torch.argsort(rand, dim=1), 0
        idx = self.perm[:, self.pos:self.pos + B].to(self.rows[0].device)
        self.pos += B
        return tuple(x[idx] for x in self.rows)


class StreamData:
    """Fresh rows from sample(generator, m) at every step (chain c takes rows c*B:(c+1)*B of one
    draw); L(w*) on a seeded sample of n rows."""

    def __init__(self, sample, n, device):
        self.sample, self.n, self.device = sample, n, device

    def draw(self, m, gen):
        return tuple(x.to(self.device) for x in _tuple(self.sample(gen, m)))

    def chunks(self, m, gen):
        return (self.draw(min(m, self.n - i), gen) for i in range(0, self.n, m))

    def next(self, C, B, gen):
        return tuple(x.reshape(C, B, *x.shape[1:]) for x in self.draw(C * B, gen))


class IterData:
    """Batches from any iterable (a DataLoader; tuples or dicts of tensors), re-iterated at its end;
    chain c takes every C-th batch of the first batch's size B (a shorter one, a DataLoader's last
    without drop_last, is skipped). L(w*) over the first n rows of one pass (default: 16 batches),
    short batch included. Its own shuffling: no common random numbers."""

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

    def full_batch(self, B):
        """The next batch of B rows: one short batch in a row is skipped (a pass's last), two are an
        error."""
        for _ in range(2):
            if len((b := self.fetch())[0]) == B:
                return b
        raise ValueError(f"every batch but a pass's last needs {B} rows (the first batch's), got "
                         f"{len(b[0])}")

    def next(self, C, B, gen):
        return tuple(torch.stack(x) for x in zip(*[self.full_batch(B) for _ in range(C)]))


@torch.no_grad()
def mean_loss(loss_fn, params, data, chunk, gen):
    """L(w*): the mean loss over data's L(w*) rows in chunks (weighted by size), accumulated in
    float64."""
    total = sum(loss_fn(params, b).double() * b[0].shape[0] for b in data.chunks(chunk, gen))
    return total / data.n


# ---------------------------------------------------------------------------- the chains' gradients
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


GRADIENTS = {"vmap": vmap_grad, "loop": loop_grad}  # autograd; fast/ has native and native_loop
CHAIN_MODES = ("auto", *GRADIENTS, "native", "native_loop")


def pick_chain_mode(loss_fn, device, batch_rows, num_params):
    """auto's choice: the hand-derived gradient where the loss has one (one chain at a time on CPU),
    else torch.func: vmap, but a loop over chains on CPU for big problems (activations fall out of
    cache)."""
    cpu = torch.device(device).type == "cpu"
    if getattr(loss_fn, "batched_grad", None) is not None:
        return "native_loop" if cpu else "native"
    return "loop" if cpu and batch_rows * num_params >= 1e7 else "vmap"


def choose_gradient(loss_fn, w_stars, chains, data, s, B, gen, device):
    """The chain mode: explicit, or auto; a hand-derived gradient only after it matched autograd at
    every w* (fast/'s check: without fast/, none). auto falls back to autograd with one warning;
    an explicit native mode raises."""
    P = chains.W.shape[1]
    mode = pick_chain_mode(loss_fn, device, B, P) if s.chain_mode == "auto" else s.chain_mode
    if mode not in CHAIN_MODES[1:]:
        raise ValueError(f"unknown chain_mode {mode!r} ({', '.join(CHAIN_MODES)})")
    if not mode.startswith("native"):
        return mode
    if getattr(loss_fn, "batched_grad", None) is None:
        raise ValueError(f"chain_mode={mode!r} needs a loss_fn with a batched_grad (data.RunLoss "
                         "has one for the regression task)")
    if (fast := fast_paths()) is None:
        bad = {"error": "fast/, which checks it against autograd, is not importable"}
    else:
        rows = next(iter(data.chunks(8, gen)))
        bad = next(filter(None, (fast.batched_grad_mismatch(loss_fn, w, chains.names, rows)
                                 for w in w_stars)), None)
    if bad and s.chain_mode == "auto":
        mode = pick_chain_mode(None, device, B, P)
        warnings.warn(f"the hand-derived gradient disagrees with autograd ({bad}): has the model's "
                      f"code changed? Using chain_mode={mode!r} (autograd); set chain_mode to "
                      "silence this")
    elif bad:
        raise ValueError(f"the hand-derived gradient (batched_grad) disagrees with autograd at w* "
                         f"(relative errors {bad}): has the model's code changed? Use "
                         "chain_mode='loop' or 'vmap', or update fast/")
    return mode


def star_losses(loss_fn, chains, mode):
    """Every chain's minibatch loss at its own w*, without gradients (Settings.paired): one chain at
    a time where the gradients are (CPU loops), else vmapped over the chains."""
    W0 = chains.W0.repeat_interleave(chains.C, 0)
    if mode in ("loop", "native_loop"):
        def one(i, batch):
            fz = {k: v[i] for k, v in chains.frozen.items()}
            return loss_fn(chains.view(W0[i], fz), tuple(x[i] for x in batch))
        return torch.no_grad()(lambda batch: torch.stack([one(i, batch) for i in range(chains.CT)]))
    f = vmap(lambda w, fz, batch: loss_fn(chains.view(w, fz), batch))
    return torch.no_grad()(lambda batch: f(W0, chains.frozen, batch))


# ---------------------------------------------------------------------------------- observables
class Observer:
    """Settings.observe(params) at every chain's point, every observe_every-th draw after the
    burn-in, kept as running moments per chain (memory: chains x m x m, or x observe_anchors: the
    covariance of every entry with the first few only; not draws), shifted by each chain's first
    observation so that the covariance suffers no cancellation. It reads W only: the chains, their
    noise and their minibatches are those of the same estimate without it."""

    def __init__(self, s, chains, loop):
        self.s, self.n = s, 0
        fz = chains.frozen
        if loop:  # one chain at a time where the gradients are (CPU loops)
            def f(W):
                return torch.stack([s.observe(chains.view(W[i], {k: v[i] for k, v in fz.items()}))
                                    for i in range(chains.CT)])
        else:
            g = vmap(lambda w, frozen: s.observe(chains.view(w, frozen)))
            f = lambda W: g(W, fz)  # noqa: E731
        self.f = torch.no_grad()(f)

    def __call__(self, t, W):
        t -= self.s.num_burnin
        if t < 0 or t % self.s.observe_every:
            return
        x = self.f(W).reshape(W.shape[0], -1).double()
        a = self.s.observe_anchors or x.shape[1]
        if self.n == 0:
            self.x0, self.S1 = x, torch.zeros_like(x)
            self.S2 = x.new_zeros(*x.shape, min(a, x.shape[1]))
        d = x - self.x0
        self.S1 += d
        self.S2 += d[:, :, None] * d[:, None, :a]
        self.n += 1

    def attach(self, results):
        """Each result's "observed": draws (observations per chain), mean (C, m), cov (C, m, m or
        anchors), each chain's own (ddof 1), as numpy arrays."""
        n, C, a = self.n, self.s.num_chains, self.S2.shape[2]
        m = self.S1 / n
        cov = (self.S2 - n * m[:, :, None] * m[:, None, :a]) / max(n - 1, 1)
        mean, cov = (m + self.x0).cpu().numpy(), cov.cpu().numpy()
        for g, r in enumerate(results):
            r["observed"] = dict(draws=n, every=self.s.observe_every,
                                 mean=mean[g * C:(g + 1) * C], cov=cov[g * C:(g + 1) * C])


# --------------------------------------------------------- shared helpers (common.py imports these)
def derive_seed(*keys: int) -> int:
    """An independent 63-bit seed for a named random stream, e.g. (seed, rank, step): no overlap
    between streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def _glob(pattern):
    """`*` matches within one dotted segment, `**` across segments; anchored at both ends."""
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = (".*" if p == "**" else "[^.]*" if p == "*" else re.escape(p) for p in parts)
    return re.compile("".join(regex))


def _patterns(x):
    if not x:
        return []
    return [p.strip() for p in (x.split(",") if isinstance(x, str) else x) if p.strip()]


def select_params(names, include=None, exclude=None):
    """Parameter names matched by an include glob and by no exclude glob (exclude wins; default
    include: all), e.g. 'blocks.*.attention.**': `*` within one dotted segment, `**` across;
    comma-separated in a string."""
    inc, exc = _patterns(include) or ["**"], _patterns(exclude)
    regs = {p: _glob(p) for p in inc + exc}
    for p, r in regs.items():
        if not any(r.fullmatch(n) for n in names):
            raise ValueError(f"parameter pattern {p!r} matches no parameter; names are: "
                             f"{', '.join(names)}")
    sel = [n for n in names if any(regs[p].fullmatch(n) for p in inc)
           and not any(regs[p].fullmatch(n) for p in exc)]
    if not sel:
        raise ValueError(f"include={inc} / exclude={exc} leave no parameter to sample")
    return sel


class Progress:
    """Progress lines with rate and ETA on stderr, at most every `every` seconds and at the end."""

    def __init__(self, label, total, unit="it", every=10.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.t0 = self.last = time.time()

    def update(self, done, note="", force=False):
        now = time.time()
        if not (force or done >= self.total or now - self.last >= self.every):
            return
        self.last, el = now, now - self.t0
        rate = done / el if el > 0 else float("inf")
        eta = (self.total - done) / rate if done and rate > 0 else float("nan")
        print(f"{self.label}: {done}/{self.total} {self.unit}, {rate:.3g} {self.unit}/s, elapsed "
              f"{fmt_time(el)}, ETA {fmt_time(eta)}{' | ' + note if note else ''}", file=sys.stderr,
              flush=True)


def fmt_time(sec):
    if not np.isfinite(sec):
        return "?"
    if sec >= 3600:
        return f"{sec / 3600:.1f}h"
    return f"{sec / 60:.1f}m" if sec >= 60 else f"{sec:.0f}s"


# -------------------------------------------------------------------------------------- diagnostics
def ess_rhat(x):
    """Multi-chain effective sample size (Geyer's initial monotone sequence, as in Stan),
    split-R-hat and the pooled variance, for x of shape (C, T)."""
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
    """The kept draws' second half, its later quarter's mean minus its earlier quarter's, for x (C,
    T) in LLC units, and that difference's se (chain spread or ESS, the larger): near 0 once the
    chains have settled."""
    q = x.shape[1] // 4
    if q < 2:
        return float("nan"), float("nan")
    a, b = x[:, -2 * q:-q], x[:, -q:]
    d = b.mean(1) - a.mean(1)
    se_chains = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    se_ess = math.sqrt(sum(var / ess for ess, _, var in (ess_rhat(a), ess_rhat(b))))
    return float(d.mean()), float(max(se_chains, se_ess))


def extrapolate(x, horizon):
    """Each chain's mean over `horizon` steps from w* when only T < horizon ran (x: (C, T) per-draw
    LLC, no burn-in): the steps not run count at the mean of the run's last half, where the chains
    are taken as settled (llc_drift says how far they are). The paper's v1 value averages 5,000
    steps from w*; this reads it off a shorter run."""
    T = x.shape[1]
    if horizon <= T:
        return x.mean(1)
    return (x.sum(1) + (horizon - T) * x[:, T // 2:].mean(1)) / horizon


def chain_summary(tr, L0, alive, nbeta, per_token, paired=False, horizon=0):
    """The estimate and its diagnostics from one checkpoint's post-burn-in losses tr (C, T[, 2][,
    tokens]), L(w*) and the chains that stayed finite; None when every chain diverged. llc_se is the
    larger of the ESS standard error and the chain means' spread sd/sqrt(chains): an ESS within
    chains misses slow modes that the spread sees."""
    C = tr.shape[0]
    bad = ~alive | ~np.isfinite(tr.reshape(C, -1)).all(1)
    ok = np.flatnonzero(~bad)
    if len(ok) == 0:
        return None
    raw, star = (tr[:, :, 0], tr[:, :, 1]) if paired else (tr, None)
    excess = raw - (star if paired else L0)  # per draw: L_batch(w_t) - L(w*) (paired: same batch)
    tokens = (lambda x: x.mean(-1)) if per_token else (lambda x: x)  # averaged over the tokens
    ex = nbeta * tokens(excess)  # (C, T): per-draw LLC
    per_chain = extrapolate(ex, horizon)
    per_chain[bad] = np.nan
    ess, rhat, var = ess_rhat(ex[ok])
    # extrapolated (a horizon past the draws): the chains' spread only
    se_ess = math.sqrt(var / ess) if horizon <= ex.shape[1] else float("nan")
    spread = per_chain[ok].std(ddof=1) / math.sqrt(len(ok)) if len(ok) > 1 else float("nan")
    se_chains = float(spread)
    d, d_se = drift(ex[ok])
    out = dict(llc_mean=float(per_chain[ok].mean()),
               llc_std=float(per_chain[ok].std(ddof=1)) if len(ok) > 1 else 0.0,
               llc_se=float(np.nanmax([se_ess, se_chains])), llc_se_ess=se_ess,
               llc_se_chains=se_chains,
               llc_drift=d, llc_drift_z=d / d_se if d_se > 0 else float("nan"),
               llc_per_chain=per_chain.tolist(), loss_trace=torch.from_numpy(tokens(raw)),
               llc_trace=torch.from_numpy(ex),
               init_loss=float(L0.mean()), nan_chains=np.flatnonzero(bad).tolist(), rhat=rhat,
               ess=ess)
    if paired:
        out["init_loss_paired"] = float(tokens(star[ok]).mean())
    if per_token:
        out["llc_per_token"] = (nbeta * excess[ok].mean((0, 1))).tolist()
        out["init_loss_per_token"] = L0.tolist()
    return out
