"""The hand-derived gradient as the SGLD chains' gradient (sgld.py's chain modes native and
native_loop): a loss_fn's batched_grad over the chains' points, every chain in one computation
(GPU/TPU) or one chain at a time on threads (CPU). sgld.py uses them only after the gradient
matched autograd at every w* (grad.batched_grad_mismatch)."""
from concurrent.futures import ThreadPoolExecutor

import torch


def _native_rows(loss_fn, chains, W, lo, hi, batch, chunk):
    """loss_fn.batched_grad for chains lo:hi, flattened to (hi-lo, P); with `chunk`, averaged over
    row chunks."""
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
    """The hand-derived gradient one chain at a time on `workers` threads, each single-threaded, in
    cache-sized row chunks (CPU): the same chains for any number of workers."""
    cpu = chains.W.device.type == "cpu"
    workers = min(chains.CT, int(s.workers or torch.get_num_threads())) if cpu else 1
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) \
        if workers > 1 else None
    chunk = s.grad_chunk if cpu else 0

    def grad_fn(W, batch):
        rows = lambda i: _native_rows(loss_fn, chains, W, i, i + 1, batch, chunk)  # noqa: E731
        out = list((pool.map if pool else map)(rows, range(chains.CT)))
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    grad_fn.close = pool.shutdown if pool else None
    return grad_fn


NATIVE_GRADIENTS = {"native": native_grad, "native_loop": native_loop_grad}
