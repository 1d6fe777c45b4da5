"""The regression transformer's loss and gradient for stacked chains, derived by hand, and the check
against autograd that gates it: a hand-derived gradient goes stale when model.py is edited, so it is
used only after it matched at the point where it starts (sgld.py, train.py)."""
import math
from typing import NamedTuple

import torch
from torch.func import grad

_aten = torch.ops.aten
LN_EPS = 1e-5  # nn.LayerNorm's default, as in model.py


def _ln(x, w, b):
    """LayerNorm of x (G, R, d) with a per-chain affine w, b (G, d); one fused kernel when G ==
    1."""
    d = x.shape[-1]
    if x.shape[0] == 1:
        y, mu, rstd = _aten.native_layer_norm(x, (d,), w[0], b[0], LN_EPS)
    else:
        xhat, mu, rstd = _aten.native_layer_norm(x, (d,), None, None, LN_EPS)
        y = torch.addcmul(b.unsqueeze(1), xhat, w.unsqueeze(1))
    return y, (x, mu, rstd)


def _ln_backward(dy, w, saved):
    x, mu, rstd = saved
    d = x.shape[-1]
    if x.shape[0] == 1:
        dx, dw, db = _aten.native_layer_norm_backward(dy, x, (d,), mu, rstd, w[0], w[0],
                                                      [True, True, True])
        return dx, dw[None], db[None]
    dw, db = (dy * ((x - mu) * rstd)).sum(1), dy.sum(1)
    dx = _aten.native_layer_norm_backward(dy * w.unsqueeze(1), x, (d,), mu, rstd, None, None,
                                          [True, False, False])[0]
    return dx, dw, db


def _heads_in(A, Wt):
    """A (G, R, d) @ Wt (G, J, d, dh) for every j -> (J, G, R, dh): per-head projections, written
    head-major, so that the attention bmm's read them with no permute copy. One broadcast bmm when G
    == 1."""
    G, R, d = A.shape
    J = Wt.shape[1]
    if G == 1:
        return torch.bmm(A[0].expand(J, R, d), Wt[0]).unsqueeze(1)
    return torch.stack([torch.bmm(A, Wt[:, j]) for j in range(J)])


def _heads_out(X, Wr, acc=None):
    """acc + sum_j X[j] @ Wr[:, j], for X (J, G, R, dh) and Wr (G, J, dh, d): the per-head products
    summed back into the model dimension (accumulated in place after the first)."""
    out = torch.bmm(X[0], Wr[:, 0]) if acc is None else torch.baddbmm(acc, X[0], Wr[:, 0])
    for j in range(1, X.shape[0]):
        out.baddbmm_(X[j], Wr[:, j])
    return out


def _heads_wgrad(X, A):
    """X[j]^T @ A for X (J, G, R, dh), A (G, R, d) -> (J, G, dh, d): the weight gradients of
    _heads_in."""
    J, G, R, _ = X.shape
    if G == 1:
        return torch.bmm(X[:, 0].transpose(1, 2), A[0].expand(J, R, A.shape[2])).unsqueeze(1)
    return torch.stack([torch.bmm(X[j].transpose(1, 2), A) for j in range(J)])


class _Dims(NamedTuple):
    G: int  # stacked parameter sets (chains)
    B: int  # sequences per chain
    K: int  # (x, y) pairs per sequence
    T: int  # tokens per sequence, 2K
    d: int  # model width
    H: int  # heads
    dh: int  # head width
    N: int  # token rows per chain, B*T
    rows: int  # x-token rows per chain, B*K (the rows the loss reads)


def _t(w):
    return w.transpose(-1, -2)


def _tc(w):
    return w.transpose(-1, -2).contiguous()  # bmm is faster with a contiguous right operand


def icl_loss_and_grads(cfg, p, xs, ys, per_token=False, slice_last=True):
    """(loss (G,) or per token (G, K), grads name -> (G, *shape) of the mean loss) of
    model.ICLTransformer + data.Task.loss for G stacked parameter sets p, xs (G, B, K, D), ys (G, B,
    K): every product a bmm over the chains, attention head-major; with slice_last the last block
    only at the rows and output channel the loss reads."""
    G, B, K, D = xs.shape
    H, nl = cfg.n_head, cfg.n_layer
    dm = _Dims(G, B, K, 2 * K, cfg.d_model, H, cfg.d_model // H, B * 2 * K, B * K)
    tok = xs.new_zeros(G, B, K, 2, D + 1)  # data.to_tokens, with a chain dimension
    tok[..., 0, 1:] = xs
    tok[..., 1, 0] = ys
    tok = tok.view(G, dm.N, D + 1)
    x = torch.bmm(tok, _tc(p["token_embedding.weight"]))
    x.view(G, B, dm.T, dm.d).add_(_t(p["postn_embedding.weight"])[:, None, :dm.T])
    mask = torch.full((dm.T, dm.T), float("-inf"), device=xs.device, dtype=xs.dtype).triu(1)
    saved = []
    for i in range(nl):
        x, kept = _block_forward(_block(p, i), x, slice_last and i == nl - 1, mask, dm)
        saved.append(kept)
    if not slice_last:
        x = x.view(G, dm.rows, 2 * dm.d)[:, :, :dm.d]
    f, sf = _ln(x, p["unembedding.0.weight"], p["unembedding.0.bias"])
    Wu0 = p["unembedding.1.weight"][:, 0]  # output channel 0 is the prediction
    pred = torch.baddbmm(p["unembedding.1.bias"][:, :1, None], f, Wu0.unsqueeze(2)).view(G, B, K)
    err = pred - ys
    loss_tok = (err * err).mean(1)
    loss = loss_tok if per_token else loss_tok.mean(1)

    g = {}  # ----------------------------------------------------------- backward of the mean loss
    dpred = (err * (2.0 / (B * K))).view(G, dm.rows, 1)
    g["unembedding.1.weight"] = torch.zeros_like(p["unembedding.1.weight"])
    g["unembedding.1.weight"][:, 0] = torch.bmm(_t(f), dpred)[..., 0]
    g["unembedding.1.bias"] = torch.zeros_like(p["unembedding.1.bias"])
    g["unembedding.1.bias"][:, 0] = dpred.sum((1, 2))
    dx, g["unembedding.0.weight"], g["unembedding.0.bias"] = _ln_backward(
        torch.bmm(dpred, Wu0.unsqueeze(1)), p["unembedding.0.weight"], sf)
    if not slice_last:
        full = dx.new_zeros(G, dm.N, dm.d)
        full.view(G, dm.rows, 2 * dm.d)[:, :, :dm.d] = dx
        dx = full
    for i in reversed(range(nl)):
        dx = _block_backward(_block(p, i), f"blocks.{i}.", dx, saved[i], dm, g)
    g["token_embedding.weight"] = torch.bmm(_t(dx), tok)
    # (G, d, 2K of the config): T columns used
    g["postn_embedding.weight"] = torch.zeros_like(p["postn_embedding.weight"])
    g["postn_embedding.weight"][:, :, :dm.T] = _t(dx.view(G, B, dm.T, dm.d).sum(1))
    return loss, g


def _block(p, i):
    """Block i's parameters by their name within the block."""
    return lambda n: p[f"blocks.{i}.{n}"]


def _block_forward(W, x, last, mask, dm):
    """One block, y = x + attn(LN0 x); x <- x + (y + mlp(LN1 y)) (the doubled residual), and what
    its backward needs; `last`: only at the x-token rows (queries, residual and MLP)."""
    G, B, K, T, d, H, dh, N, rows = dm
    # (G, 3, H, dh, d): the rows of q, k and v per head
    Wqkv = W("attention.qkv.weight").view(G, H, 3, dh, d).transpose(1, 2)
    Wo = W("attention.out.weight")
    a, s0 = _ln(x, W("layer_norms.0.weight"), W("layer_norms.0.bias"))
    if not last:
        q, k, v = _heads_in(a, _tc(Wqkv.reshape(G, 3 * H, dh, d))).view(3, H * G * B, T, dh)
        Tq, xr, aq = T, x, a
    else:
        k, v = _heads_in(a, _tc(Wqkv[:, 1:].reshape(G, 2 * H, dh, d))).view(2, H * G * B, T, dh)
        aq = a.view(G, rows, 2 * d)[:, :, :d]  # the x-token rows (a strided view)
        q = _heads_in(aq, _tc(Wqkv[:, 0])).view(H * G * B, K, dh)
        Tq, xr = K, x.view(G, rows, 2 * d)[:, :, :d]
    P = torch.baddbmm(mask[::T // Tq], q, _t(k), alpha=1.0 / math.sqrt(dh)).softmax(-1)
    o = torch.bmm(P, v).view(H, G, B * Tq, dh)
    y = _heads_out(o, Wo.view(G, d, H, dh).permute(0, 2, 3, 1).contiguous(), xr)
    a2, s1 = _ln(y, W("layer_norms.1.weight"), W("layer_norms.1.bias"))
    r = torch.baddbmm(W("compute.0.bias").unsqueeze(1), a2, _tc(W("compute.0.weight"))).relu_()
    m = torch.baddbmm(W("compute.2.bias").unsqueeze(1), r, _tc(W("compute.2.weight")))
    return xr + (y + m), (a, aq, s0, q, k, v, P, o, a2, s1, r, last, Wqkv, Wo)


def _block_backward(W, pre, dx, saved, dm, g):
    """The block's backward: its weight gradients into g (names prefixed `pre`), the gradient at its
    input returned."""
    G, B, K, T, d, H, dh, N, rows = dm
    a, aq, s0, q, k, v, P, o, a2, s1, r, last, Wqkv, Wo = saved
    Tq, dxn = q.shape[1], dx
    g[pre + "compute.2.weight"] = torch.bmm(_t(dxn), r)
    g[pre + "compute.2.bias"] = dxn.sum(1)
    dh_ = _aten.threshold_backward(torch.bmm(dxn, W("compute.2.weight")), r, 0)
    g[pre + "compute.0.weight"] = torch.bmm(_t(dh_), a2)
    g[pre + "compute.0.bias"] = dh_.sum(1)
    dy, g[pre + "layer_norms.1.weight"], g[pre + "layer_norms.1.bias"] = _ln_backward(
        torch.bmm(dh_, W("compute.0.weight")), W("layer_norms.1.weight"), s1)
    dy += dxn
    g[pre + "attention.out.weight"] = _heads_wgrad(o, dy).permute(1, 3, 0, 2).reshape(G, d, d)
    do = _heads_in(dy, Wo.view(G, d, H, dh).transpose(1, 2).contiguous()).view(H * G * B, Tq, dh)
    dS = torch._softmax_backward_data(torch.bmm(do, _t(v)), P, -1, P.dtype)
    dS.mul_(1.0 / math.sqrt(dh))
    J = 3 if not last else 2  # the per-head projections computed at all T rows
    buf = torch.empty(J, H * G * B, T, dh, dtype=a.dtype, device=a.device)  # d(q|k|v) or d(k|v)
    if not last:
        torch.bmm(dS, k, out=buf[0])
    torch.bmm(_t(dS), q, out=buf[J - 2])
    torch.bmm(_t(P), do, out=buf[J - 1])
    dproj = buf.view(J * H, G, N, dh)
    gw = _heads_wgrad(dproj, a).view(J, H, G, dh, d)
    da = _heads_out(dproj, Wqkv[:, 3 - J:].reshape(G, J * H, dh, d))
    if last:
        dq = torch.bmm(dS, k).view(H, G, rows, dh)
        gw = torch.cat([_heads_wgrad(dq, aq).view(1, H, G, dh, d), gw])
        da.view(G, rows, 2 * d)[:, :, :d].add_(_heads_out(dq, Wqkv[:, 0]))
    g[pre + "attention.qkv.weight"] = gw.permute(2, 1, 0, 3, 4).reshape(G, 3 * d, d)
    dx, g[pre + "layer_norms.0.weight"], g[pre + "layer_norms.0.bias"] = _ln_backward(
        da, W("layer_norms.0.weight"), s0)
    if last:
        dx.view(G, rows, 2 * d)[:, :, :d] += dxn + dy
    else:
        dx += dxn
        dx += dy
    return dx


# -------------------------------------------------------------- the hand-derived gradient's check
def batched_grad_mismatch(loss_fn, params, names, batch, rtol=1e-3):
    """None when loss_fn.batched_grad matches autograd of loss_fn at w* on `batch`, else the
    relative errors: a hand-derived gradient goes stale when the model's code is edited."""
    def mean_and_loss(q):
        loss = loss_fn(q, batch)
        return loss.mean(), loss.detach()
    try:
        stacked = {k: v[None] for k, v in params.items()}
        loss_h, g_h = loss_fn.batched_grad(stacked, tuple(x[None] for x in batch))
        g_a, loss_a = grad(mean_and_loss, has_aux=True)(params)
        rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp_min(1e-12))  # noqa: E731
        errs = {k: rel(g_h[k][0], g_a[k]) for k in names}
        errs["(loss)"] = rel(loss_h[0], loss_a)
    except Exception as e:  # noqa: BLE001  (a model whose shapes no longer fit the derivation)
        return {"error": f"{type(e).__name__}: {e}"}
    bad = {k: round(e, 6) for k, e in errs.items() if not e <= rtol}
    return bad or None
