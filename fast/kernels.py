"""The fused Triton SGLD update (checked against sgld.py's torch update on a device's first use) and
the capture of one SGLD step in a CUDA graph (checked against the eager step)."""
import math
import os
import warnings

import torch

try:  # optional: CPU-only installs use the torch update
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# -------------------------------------------------------------------------- the fused SGLD update
if triton is not None:
    @triton.jit
    def _sgld_kernel(w_ptr, w0_ptr, g_ptr, key_ptr, P, CG, a, b, c, BLOCK: tl.constexpr):
        """W[ch] <- W - a*G - b*(W - W0[ch // CG]) + c*randn, the noise never stored. Chain ch draws
        the noise of chain ch % CG (common random numbers across checkpoints); the key is read from
        memory (CUDA graphs)."""
        chain = tl.program_id(1).to(tl.int64)
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = j < P
        idx = chain * P + j
        w = tl.load(w_ptr + idx, mask=mask)
        w0 = tl.load(w0_ptr + (chain // CG) * P + j, mask=mask)
        g = tl.load(g_ptr + idx, mask=mask)
        # the Philox counter: unique per (chain, element)
        z = tl.randn(tl.load(key_ptr), (chain % CG) * P + j)
        tl.store(w_ptr + idx, w - a * g - b * (w - w0) + c * z, mask=mask)


def sgld_update_triton(W, W0, G, a, b, c, key, block=1024):
    """The fused update of all chains in place; `key` an int or a one-element int64 tensor on W's
    device. CPU tensors need TRITON_INTERPRET=1 set before this module is imported."""
    if triton is None:
        raise RuntimeError("update_backend='triton' needs the triton package")
    if not W.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton update on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "importing fast")
    assert W.is_contiguous() and G.is_contiguous() and W0.is_contiguous() and W.shape == G.shape
    if not torch.is_tensor(key):
        key = torch.tensor([key], dtype=torch.int64, device=W.device)
    C, P = W.shape
    R = W0.shape[0] if W0.dim() == 2 else 1
    assert W0.shape[-1] == P and C % R == 0
    _sgld_kernel[(triton.cdiv(P, block), C)](W, W0, G, key, P, C // R, float(a), float(b), float(c),
                                              BLOCK=block)


_TRITON_CHECKED = {}


def triton_update_ok(device, sgld_update_torch) -> bool:
    """Once per device: the kernel against the torch update (sgld.py's, passed in), the noise-free
    part to float rounding and the noise's mean and variance within 6 standard errors. On a
    mismatch: one warning, and the torch update is used."""
    if str(device) not in _TRITON_CHECKED:
        gen = torch.Generator().manual_seed(0)
        shapes = ((4, 4099), (4, 4099), (4099,))
        W, G, W0 = (torch.randn(*s, generator=gen).to(device) for s in shapes)
        want, got, z = W.clone(), W.clone(), W.clone()
        sgld_update_torch(want, W0, G, torch.zeros_like(W), 0.01, 0.02, 0.1)
        sgld_update_triton(got, W0, G, 0.01, 0.02, 0.0, key=123)
        sgld_update_triton(z, W0, G, 0.01, 0.02, 1.0, key=124)
        z, se = (z - want).double(), 1 / math.sqrt(W.numel())
        exact = torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        why = (None if exact else "the noise-free update differs") or (
            None if abs(z.mean()) < 6 * se and abs(z.var() - 1) < 6 * math.sqrt(2) * se else
            f"the noise has mean {float(z.mean()):.4f}, variance {float(z.var()):.4f}")
        if why:
            warnings.warn(f"the Triton SGLD update failed its check on {device} ({why}): using the "
                          "torch update")
        _TRITON_CHECKED[str(device)] = why is None
    return _TRITON_CHECKED[str(device)]


# ------------------------------------------------------------------------------------ CUDA graphs
def cuda_graph_step(step, first, W, key):
    """sgld_step captured in a CUDA graph on static batch buffers, once checked against the eager
    step (on a mismatch: one warning, eager steps). W and the noise key are restored, so the chains
    start where they would."""
    static = tuple(x.clone() for x in first)
    W_keep, key_keep = W.clone(), key.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    W.copy_(W_keep)
    key.copy_(key_keep)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(static)

    def replay(batch):
        [s_.copy_(x) for s_, x in zip(static, batch)]
        graph.replay()
        return loss
    W.copy_(W_keep), key.copy_(key_keep)
    eager_loss, eager_W = step(first).clone(), W.clone()
    W.copy_(W_keep), key.copy_(key_keep)
    pairs = ((replay(first), eager_loss), (W, eager_W))
    ok = all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in pairs)
    W.copy_(W_keep), key.copy_(key_keep)
    if not ok:
        warnings.warn("the CUDA-graph SGLD step does not replay the eager step: running eager "
                      "steps")
    return replay if ok else step
