"""The regression transformer's loss and gradients for a stack of parameter sets, derived by hand.

The SGLD hot path (llc.py, chain_mode "native"/"native_loop"): G chains' forward and backward as a few bmm's
over the chain dimension instead of autograd through G separate graphs, and the last block evaluated only at
the rows and the output channel the loss reads. Mathematically identical to model.ICLTransformer +
data.Task.loss under autograd (tests/test_llc.py checks losses and gradients against it).
"""
import math

import torch

_aten = torch.ops.aten
LN_EPS = 1e-5  # nn.LayerNorm's default, as in model.py


def _ln(x, w, b):
    """LayerNorm of x (G, R, d) with a per-chain affine w, b (G, d); one fused kernel when G == 1."""
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
        dx, dw, db = _aten.native_layer_norm_backward(dy, x, (d,), mu, rstd, w[0], w[0], [True, True, True])
        return dx, dw[None], db[None]
    dw, db = (dy * ((x - mu) * rstd)).sum(1), dy.sum(1)
    dx = _aten.native_layer_norm_backward(dy * w.unsqueeze(1), x, (d,), mu, rstd, None, None,
                                          [True, False, False])[0]
    return dx, dw, db


def _heads_in(A, Wt):
    """A (G, R, d) @ Wt (G, J, d, dh) for every j -> (J, G, R, dh): per-head projections, written head-major, so
    that the attention bmm's read them with no permute copy. One broadcast bmm when G == 1."""
    G, R, d = A.shape
    J = Wt.shape[1]
    if G == 1:
        return torch.bmm(A[0].expand(J, R, d), Wt[0]).unsqueeze(1)
    return torch.stack([torch.bmm(A, Wt[:, j]) for j in range(J)])


def _heads_out(X, Wr, acc=None):
    """acc + sum_j X[j] @ Wr[:, j], for X (J, G, R, dh) and Wr (G, J, dh, d): the per-head products summed back
    into the model dimension (accumulated in place after the first)."""
    out = torch.bmm(X[0], Wr[:, 0]) if acc is None else torch.baddbmm(acc, X[0], Wr[:, 0])
    for j in range(1, X.shape[0]):
        out.baddbmm_(X[j], Wr[:, j])
    return out


def _heads_wgrad(X, A):
    """X[j]^T @ A for X (J, G, R, dh), A (G, R, d) -> (J, G, dh, d): the weight gradients of _heads_in."""
    J, G, R, _ = X.shape
    if G == 1:
        return torch.bmm(X[:, 0].transpose(1, 2), A[0].expand(J, R, A.shape[2])).unsqueeze(1)
    return torch.stack([torch.bmm(X[j].transpose(1, 2), A) for j in range(J)])


def icl_loss_and_grads(cfg, p, xs, ys, per_token=False, slice_last=True):
    """Loss and exact gradients of model.ICLTransformer + data.Task.loss for G chains at once, written out by hand.

    p: parameter name -> (G, *shape) (a chain's row may be a view into the flat SGLD buffer, or an expanded
    frozen tensor); xs (G, B, K, D), ys (G, B, K). Returns (loss (G,) or per token (G, K), grads name -> (G, *shape)),
    the gradient always of the mean loss. Every matrix product is a bmm over the chain dimension, so G chains are
    a few large products instead of G x (many small ones); on CPU call it with G = 1 per chain (cache-friendlier).
    Attention works head-major ((J, G, rows, dh) per-head projections), so no activation is ever permuted.
    With slice_last the last block computes queries, attention output, MLP and unembedding only at the K x-token
    rows (the loss reads nothing else) and the unembedding only for output channel 0: the same loss and gradients,
    about 1/6 fewer FLOPs. Tested against autograd on the nn.Module (tests/test_llc.py)."""
    G, B, K, D = xs.shape
    T, d, H, nl = 2 * K, cfg.d_model, cfg.n_head, cfg.n_layer
    dh, N, M = d // H, B * 2 * K, B * K
    scale = 1.0 / math.sqrt(dh)
    tr = lambda w: w.transpose(-1, -2)  # noqa: E731
    trc = lambda w: w.transpose(-1, -2).contiguous()  # noqa: E731  (bmm is faster with a contiguous right operand)
    tok = xs.new_zeros(G, B, K, 2, D + 1)  # data.to_tokens, with a chain dimension
    tok[..., 0, 1:] = xs
    tok[..., 1, 0] = ys
    tok = tok.view(G, N, D + 1)
    x = torch.bmm(tok, trc(p["token_embedding.weight"]))
    x.view(G, B, T, d).add_(tr(p["postn_embedding.weight"])[:, None, :T])
    mask = torch.full((T, T), float("-inf"), device=xs.device, dtype=xs.dtype).triu(1)
    saved = []
    for i in range(nl):  # block: y = x + attn(LN0 x); x <- x + (y + mlp(LN1 y))  (the doubled residual)
        W = lambda n: p[f"blocks.{i}.{n}"]  # noqa: E731
        last = slice_last and i == nl - 1
        Wqkv = W("attention.qkv.weight").view(G, H, 3, dh, d).transpose(1, 2)  # (G, 3, H, dh, d): rows q|k|v per head
        Wo = W("attention.out.weight")
        a, s0 = _ln(x, W("layer_norms.0.weight"), W("layer_norms.0.bias"))
        if not last:
            q, k, v = _heads_in(a, trc(Wqkv.reshape(G, 3 * H, dh, d))).view(3, H * G * B, T, dh)
            Tq, xr, aq = T, x, a
        else:
            k, v = _heads_in(a, trc(Wqkv[:, 1:].reshape(G, 2 * H, dh, d))).view(2, H * G * B, T, dh)
            aq = a.view(G, M, 2 * d)[:, :, :d]  # the x-token rows (a strided view)
            q = _heads_in(aq, trc(Wqkv[:, 0])).view(H * G * B, K, dh)
            Tq, xr = K, x.view(G, M, 2 * d)[:, :, :d]
        P = torch.baddbmm(mask[::T // Tq], q, tr(k), alpha=scale).softmax(-1)
        o = torch.bmm(P, v).view(H, G, B * Tq, dh)
        y = _heads_out(o, Wo.view(G, d, H, dh).permute(0, 2, 3, 1).contiguous(), xr)
        a2, s1 = _ln(y, W("layer_norms.1.weight"), W("layer_norms.1.bias"))
        r = torch.baddbmm(W("compute.0.bias").unsqueeze(1), a2, trc(W("compute.0.weight"))).relu_()
        m = torch.baddbmm(W("compute.2.bias").unsqueeze(1), r, trc(W("compute.2.weight")))
        x = xr + (y + m)
        saved.append((a, aq, s0, q, k, v, P, o, a2, s1, r, last, Wqkv, Wo))
    if not slice_last:
        x = x.view(G, M, 2 * d)[:, :, :d]
    f, sf = _ln(x, p["unembedding.0.weight"], p["unembedding.0.bias"])
    Wu0 = p["unembedding.1.weight"][:, 0]  # output channel 0 is the prediction
    pred = torch.baddbmm(p["unembedding.1.bias"][:, :1, None], f, Wu0.unsqueeze(2)).view(G, B, K)
    err = pred - ys
    loss_tok = (err * err).mean(1)
    loss = loss_tok if per_token else loss_tok.mean(1)

    g = {}  # ------------------------------------------------------------------ backward of the mean loss
    dpred = (err * (2.0 / (B * K))).view(G, M, 1)
    g["unembedding.1.weight"] = torch.zeros_like(p["unembedding.1.weight"])
    g["unembedding.1.weight"][:, 0] = torch.bmm(tr(f), dpred)[..., 0]
    g["unembedding.1.bias"] = torch.zeros_like(p["unembedding.1.bias"])
    g["unembedding.1.bias"][:, 0] = dpred.sum((1, 2))
    dx, g["unembedding.0.weight"], g["unembedding.0.bias"] = _ln_backward(
        torch.bmm(dpred, Wu0.unsqueeze(1)), p["unembedding.0.weight"], sf)
    if not slice_last:
        full = dx.new_zeros(G, N, d)
        full.view(G, M, 2 * d)[:, :, :d] = dx
        dx = full
    for i in reversed(range(nl)):
        pre = f"blocks.{i}."
        W = lambda n: p[pre + n]  # noqa: E731
        a, aq, s0, q, k, v, P, o, a2, s1, r, last, Wqkv, Wo = saved[i]
        Tq = q.shape[1]
        dxn = dx
        g[pre + "compute.2.weight"] = torch.bmm(tr(dxn), r)
        g[pre + "compute.2.bias"] = dxn.sum(1)
        dh_ = _aten.threshold_backward(torch.bmm(dxn, W("compute.2.weight")), r, 0)
        g[pre + "compute.0.weight"] = torch.bmm(tr(dh_), a2)
        g[pre + "compute.0.bias"] = dh_.sum(1)
        dy, g[pre + "layer_norms.1.weight"], g[pre + "layer_norms.1.bias"] = _ln_backward(
            torch.bmm(dh_, W("compute.0.weight")), W("layer_norms.1.weight"), s1)
        dy += dxn
        g[pre + "attention.out.weight"] = _heads_wgrad(o, dy).permute(1, 3, 0, 2).reshape(G, d, d)
        do = _heads_in(dy, Wo.view(G, d, H, dh).transpose(1, 2).contiguous()).view(H * G * B, Tq, dh)
        dS = torch._softmax_backward_data(torch.bmm(do, tr(v)), P, -1, P.dtype).mul_(scale)
        J = 3 if not last else 2  # the per-head projections computed at all T rows
        buf = torch.empty(J, H * G * B, T, dh, dtype=a.dtype, device=a.device)  # d(q|k|v) or d(k|v), head-major
        if not last:
            torch.bmm(dS, k, out=buf[0])
        torch.bmm(tr(dS), q, out=buf[J - 2])
        torch.bmm(tr(P), do, out=buf[J - 1])
        dproj = buf.view(J * H, G, N, dh)
        gw = _heads_wgrad(dproj, a).view(J, H, G, dh, d)
        Wrows = Wqkv[:, 3 - J:].reshape(G, J * H, dh, d)
        da = _heads_out(dproj, Wrows)
        if last:
            dq = torch.bmm(dS, k).view(H, G, M, dh)
            gw = torch.cat([_heads_wgrad(dq, aq).view(1, H, G, dh, d), gw])
            da.view(G, M, 2 * d)[:, :, :d].add_(_heads_out(dq, Wqkv[:, 0]))
        g[pre + "attention.qkv.weight"] = gw.permute(2, 1, 0, 3, 4).reshape(G, 3 * d, d)
        dx, g[pre + "layer_norms.0.weight"], g[pre + "layer_norms.0.bias"] = _ln_backward(
            da, W("layer_norms.0.weight"), s0)
        if last:
            dx.view(G, M, 2 * d)[:, :, :d] += dxn + dy
        else:
            dx += dxn
            dx += dy
    g["token_embedding.weight"] = torch.bmm(tr(dx), tok)
    g["postn_embedding.weight"] = torch.zeros_like(p["postn_embedding.weight"])  # (G, d, 2K_cfg): T columns used
    g["postn_embedding.weight"][:, :, :T] = tr(dx.view(G, B, T, d).sum(1))
    return loss, g
