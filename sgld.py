"""The SGLD sampler's parts, used by llc.estimate_llc: the update of all chains' flat parameter buffer (a fused
Triton kernel with in-kernel Philox noise on CUDA, torch elsewhere), the parameters a restricted LLC samples, the
chains' minibatches, L(w*), the convergence diagnostics, and the CUDA-graph capture of one step."""
import math
import os
import re

import numpy as np
import torch

from common import derive_seed

try:  # optional: CPU-only installs use the torch update
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _sgld_kernel(w_ptr, w0_ptr, g_ptr, key_ptr, P, CG, a, b, c, BLOCK: tl.constexpr):
        """W[ch, j] <- W - a*G - b*(W - W0[ch // CG, j]) + c*randn: one read/write of W, the noise is never stored.
        Chains come in groups of CG sharing a row of W0 (a checkpoint); chain ch draws the noise of chain ch % CG
        of a single-checkpoint run (common random numbers across checkpoints). The Philox key is read from device
        memory, so a captured CUDA graph can advance it (key_ptr += 1)."""
        chain = tl.program_id(1).to(tl.int64)
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = j < P
        idx = chain * P + j
        w = tl.load(w_ptr + idx, mask=mask)
        w0 = tl.load(w0_ptr + (chain // CG) * P + j, mask=mask)
        g = tl.load(g_ptr + idx, mask=mask)
        z = tl.randn(tl.load(key_ptr), (chain % CG) * P + j)  # the Philox counter: unique per (chain, element)
        tl.store(w_ptr + idx, w - a * g - b * (w - w0) + c * z, mask=mask)


# ----------------------------------------------------------------------------------------------- the update
def sgld_coefficients(epsilon, gamma, nbeta):
    """w <- w - (eps/2)[nbeta g + gamma (w - w*)] + sqrt(eps) xi  ==  w - a g - b (w - w*) + c xi."""
    return epsilon * nbeta / 2, epsilon * gamma / 2, math.sqrt(epsilon)


def sgld_update_torch(W, W0, G, noise, a, b, c):
    """Reference update (CPU/XLA path and test oracle); same arithmetic order as the kernel. W0: (P,), or one row
    per group of chains (R, P); noise: (C, P), or one group's (C / R, P), used by every group. Broadcast views over
    (R, C / R, P): nothing is repeated in memory."""
    R, P = (W0.shape[0] if W0.dim() == 2 else 1), W.shape[1]
    Wg, z = W.view(R, -1, P), noise.view(-1, P) if noise.shape[0] != W.shape[0] else noise.view(R, -1, P)
    Wg.copy_(Wg - a * G.view(R, -1, P) - b * (Wg - W0.view(R, 1, P)) + c * z)


def noise_key(seed, step):
    """Philox key for one step: seed in the high word, step in the low word, so no two (seed, step) collide."""
    return ((int(seed) & 0x7FFFFFFF) << 32) | (int(step) & 0xFFFFFFFF)


def sgld_update_triton(W, W0, G, a, b, c, key, block=1024):
    """Fused update of all chains, W (C, P) in place; W0 (P,) or one row per group of chains (R, P). `key`: an int,
    or a one-element int64 tensor on W's device (read by the kernel at run time). Runs on CPU tensors under
    TRITON_INTERPRET=1 (tests)."""
    if triton is None:
        raise RuntimeError("update_backend='triton' needs the triton package")
    if not W.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton update on CPU tensors needs TRITON_INTERPRET=1 set before importing llc")
    assert W.is_contiguous() and G.is_contiguous() and W0.is_contiguous() and W.shape == G.shape
    if not torch.is_tensor(key):
        key = torch.tensor([key], dtype=torch.int64, device=W.device)
    C, P = W.shape
    R = W0.shape[0] if W0.dim() == 2 else 1
    assert W0.shape[-1] == P and C % R == 0
    _sgld_kernel[(triton.cdiv(P, block), C)](W, W0, G, key, P, C // R, float(a), float(b), float(c), BLOCK=block)


# ----------------------------------------------------------------------------------- parameter restriction
def _glob(pattern):
    """`*` matches within one dotted segment, `**` across segments; anchored at both ends."""
    parts = re.split(r"(\*\*|\*)", pattern)
    return re.compile("".join(".*" if p == "**" else "[^.]*" if p == "*" else re.escape(p) for p in parts))


def _patterns(x):
    if not x:
        return []
    return [p.strip() for p in (x.split(",") if isinstance(x, str) else x) if p.strip()]


def select_params(names, include=None, exclude=None):
    """Names matched by an include pattern and by no exclude pattern (exclude wins); default include: all."""
    inc, exc = _patterns(include) or ["**"], _patterns(exclude)
    regs = {p: _glob(p) for p in inc + exc}
    for p, r in regs.items():
        if not any(r.fullmatch(n) for n in names):
            raise ValueError(f"parameter pattern {p!r} matches no parameter; names are: {', '.join(names)}")
    sel = [n for n in names if any(regs[p].fullmatch(n) for p in inc)
           and not any(regs[p].fullmatch(n) for p in exc)]
    if not sel:
        raise ValueError(f"include={inc} / exclude={exc} leave no parameter to sample")
    return sel


# -------------------------------------------------------------------------------------------- data streams
def make_generators(seed, device):
    """Independent generators (data order, noise, L(w*) set, fixed dataset) from one seed; streams of
    neighbouring seeds never overlap. XLA devices draw on the CPU."""
    dev = torch.device(device)
    gdev = dev if dev.type in ("cpu", "cuda") else torch.device("cpu")
    seeds = [derive_seed(seed, 0x11C, i) for i in range(4)]
    return [torch.Generator(gdev).manual_seed(s) for s in seeds], seeds


def _tmap(f, batch):
    return tuple(f(x) for x in batch) if isinstance(batch, (tuple, list)) else f(batch)


class ChainBatches:
    """Per-chain minibatches (C, B, ...). Fixed dataset: each chain walks its own permutation of the rows,
    reshuffled every epoch (one argsort of a (C, n) uniform draw, no per-chain loop). Stream: one call
    sample(gen, C*B) split into C consecutive chunks (chain c gets rows c*B:(c+1)*B)."""

    def __init__(self, data, C, B, gen, device):
        self.data, self.C, self.B, self.gen, self.device = data, C, B, gen, device
        self.perm, self.pos = None, 0

    def __call__(self):
        C, B = self.C, self.B
        if callable(self.data):
            out = self.data(self.gen, C * B)
            return _tmap(lambda x: x.to(self.device).reshape(C, B, *x.shape[1:]), out)
        n = self.data[0].shape[0]
        if B == n:  # full batch: every chain sees the whole set, no shuffling needed
            return tuple(x.expand(C, *x.shape) for x in self.data)
        if self.perm is None or self.pos + B > n:  # kept on the generator's device: on XLA the host slices it
            u = torch.rand(C, n, generator=self.gen, device=self.gen.device)
            self.perm, self.pos = torch.argsort(u, dim=1), 0
        idx = self.perm[:, self.pos:self.pos + B].to(self.device)
        self.pos += B
        return tuple(x[idx] for x in self.data)


@torch.no_grad()
def mean_loss(loss_fn, params, data, n, chunk, gen, device):
    """L(w*) over the whole fixed set, or over a seeded sample of n rows of the stream (chunks weighted by
    size). Accumulated in float64 on the device."""
    total, done = 0.0, 0
    while done < n:
        m = min(chunk, n - done)
        batch = (_tmap(lambda x: x.to(device), data(gen, m)) if callable(data)
                 else tuple(x[done:done + m] for x in data))
        total = total + loss_fn(params, batch).double() * m
        done += m
    return total / n


# ----------------------------------------------------------------------------------------- diagnostics
def ess_rhat(x):
    """Multi-chain effective sample size (Geyer initial monotone sequence on the chain-averaged
    autocorrelation, as in Stan), split-R-hat, and the pooled variance estimate, for x of shape (C, T)."""
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


def chain_summary(tr, L0, alive, nbeta, per_token):
    """The LLC estimate and its diagnostics from one checkpoint's post-burn-in losses tr (C, T[, K]) (float64),
    L(w*) L0 and the chains that never produced a non-finite loss; None when every chain diverged."""
    C = tr.shape[0]
    bad = ~alive | ~np.isfinite(tr.reshape(C, -1)).all(1)
    ok = np.flatnonzero(~bad)
    if len(ok) == 0:
        return None
    loss_trace = tr.mean(-1) if per_token else tr  # (C, T): per-token losses averaged over tokens
    per_chain = nbeta * (loss_trace.mean(1) - float(L0.mean()))
    per_chain[bad] = np.nan
    ess, rhat, var = ess_rhat(loss_trace[ok])
    out = dict(llc_mean=float(per_chain[ok].mean()),
               llc_std=float(per_chain[ok].std(ddof=1)) if len(ok) > 1 else 0.0,
               llc_se=float(nbeta * math.sqrt(var / ess)), llc_per_chain=per_chain.tolist(),
               loss_trace=torch.from_numpy(loss_trace), init_loss=float(L0.mean()),
               nan_chains=np.flatnonzero(bad).tolist(), rhat=rhat, ess=ess)
    if per_token:
        out["llc_per_token"] = (nbeta * (tr[ok].mean((0, 1)) - L0)).tolist()
        out["init_loss_per_token"] = L0.tolist()
    return out


def _as_tuple(batch):
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _graph_step(sgld_step, first_batch, W, key):
    """Capture sgld_step (forward, backward, fused update, key += 1) in a CUDA graph on static batch buffers.
    Returns step(batch): copy the batch into the static buffers, replay, return the static loss buffer (valid
    until the next replay; the caller copies it into the trace). Warm-up runs happen on a side stream, and W and
    the noise key are restored afterwards, so the captured chains start exactly where the eager ones would."""
    static = tuple(x.clone() for x in _as_tuple(first_batch))
    W_keep, key_keep = W.clone(), key.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            sgld_step(static)
    torch.cuda.current_stream().wait_stream(side)
    W.copy_(W_keep)
    key.copy_(key_keep)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = sgld_step(static)

    def step(batch):
        for s, x in zip(static, _as_tuple(batch)):
            s.copy_(x)
        graph.replay()
        return loss
    return step
