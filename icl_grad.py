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


def _split_heads(t, B, Tq, H):
    """(G, B*Tq, H*dh) -> (G*B*H, Tq, dh), a copy."""
    G, _, d = t.shape
    return t.view(G, B, Tq, H, d // H).transpose(2, 3).reshape(G * B * H, Tq, d // H)


def _merge_heads(t, G, B, H):
    """(G*B*H, Tq, dh) -> (G, B*Tq, H*dh), a copy."""
    _, Tq, dh = t.shape
    return t.view(G, B, H, Tq, dh).transpose(2, 3).reshape(G, B * Tq, H * dh)


def icl_loss_and_grads(cfg, p, xs, ys, per_token=False, slice_last=True):
    """Loss and exact gradients of model.ICLTransformer + data.Task.loss for G chains at once, written out by hand.

    p: parameter name -> (G, *shape) (a chain's row may be a view into the flat SGLD buffer, or an expanded
    frozen tensor); xs (G, B, K, D), ys (G, B, K). Returns (loss (G,) or per token (G, K), grads name -> (G, *shape)),
    the gradient always of the mean loss. Every matrix product is a bmm over the chain dimension, so G chains are
    a few large products instead of G x (many small ones); on CPU call it with G = 1 per chain (cache-friendlier).
    With slice_last the last block computes queries, attention output, MLP and unembedding only at the K x-token
    rows (the loss reads nothing else) and the unembedding only for output channel 0: the same loss and gradients,
    about 1/6 fewer FLOPs. Tested against autograd on the nn.Module (tests/test_llc.py)."""
    G, B, K, D = xs.shape
    T, d, H, nl = 2 * K, cfg.d_model, cfg.n_head, cfg.n_layer
    dh, N, M = d // H, B * 2 * K, B * K
    scale = 1.0 / math.sqrt(dh)
    tr = lambda w: w.transpose(1, 2)  # noqa: E731
    tok = xs.new_zeros(G, B, K, 2, D + 1)  # data.to_tokens, with a chain dimension
    tok[..., 0, 1:] = xs
    tok[..., 1, 0] = ys
    tok = tok.view(G, N, D + 1)
    x = torch.bmm(tok, tr(p["token_embedding.weight"]))
    x.view(G, B, T, d).add_(tr(p["postn_embedding.weight"])[:, None, :T])
    mask = torch.full((T, T), float("-inf"), device=xs.device, dtype=xs.dtype).triu(1)
    saved = []
    for i in range(nl):  # block: y = x + attn(LN0 x); x <- x + (y + mlp(LN1 y))  (the doubled residual)
        W = lambda n: p[f"blocks.{i}.{n}"]  # noqa: E731
        last = slice_last and i == nl - 1
        a, s0 = _ln(x, W("layer_norms.0.weight"), W("layer_norms.0.bias"))
        if not last:
            qkv = torch.bmm(a, tr(W("attention.qkv.weight")))  # rows of qkv: [q_h, k_h, v_h] per head h
            q, k, v = qkv.view(G, B, T, H, 3, dh).permute(4, 0, 1, 3, 2, 5).reshape(3, G * B * H, T, dh)
            Tq, xr = T, x
        else:
            Wqkv = W("attention.qkv.weight").view(G, H, 3, dh, d)
            kv = torch.bmm(a, tr(Wqkv[:, :, 1:].reshape(G, 2 * d, d)))
            k, v = kv.view(G, B, T, H, 2, dh).permute(4, 0, 1, 3, 2, 5).reshape(2, G * B * H, T, dh)
            a_x = a.view(G, M, 2 * d)[:, :, :d]  # the x-token rows (a strided view)
            q = _split_heads(torch.bmm(a_x, tr(Wqkv[:, :, 0].reshape(G, d, d))), B, K, H)
            Tq, xr = K, x.view(G, M, 2 * d)[:, :, :d]
        P = torch.baddbmm(mask[::T // Tq], q, tr(k), alpha=scale).softmax(-1)
        o = _merge_heads(torch.bmm(P, v), G, B, H)
        y = torch.baddbmm(xr, o, tr(W("attention.out.weight")))
        a2, s1 = _ln(y, W("layer_norms.1.weight"), W("layer_norms.1.bias"))
        r = torch.baddbmm(W("compute.0.bias").unsqueeze(1), a2, tr(W("compute.0.weight"))).relu_()
        m = torch.baddbmm(W("compute.2.bias").unsqueeze(1), r, tr(W("compute.2.weight")))
        x = xr + (y + m)
        saved.append((a, s0, q, k, v, P, o, a2, s1, r, last))
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
        a, s0, q, k, v, P, o, a2, s1, r, last = saved[i]
        dxn = dx
        g[pre + "compute.2.weight"] = torch.bmm(tr(dxn), r)
        g[pre + "compute.2.bias"] = dxn.sum(1)
        dh_ = _aten.threshold_backward(torch.bmm(dxn, W("compute.2.weight")), r, 0)
        g[pre + "compute.0.weight"] = torch.bmm(tr(dh_), a2)
        g[pre + "compute.0.bias"] = dh_.sum(1)
        dy, g[pre + "layer_norms.1.weight"], g[pre + "layer_norms.1.bias"] = _ln_backward(
            torch.bmm(dh_, W("compute.0.weight")), W("layer_norms.1.weight"), s1)
        dy += dxn
        g[pre + "attention.out.weight"] = torch.bmm(tr(dy), o)
        do = _split_heads(torch.bmm(dy, W("attention.out.weight")), B, q.shape[1], H)
        dS = torch._softmax_backward_data(torch.bmm(do, tr(v)), P, -1, P.dtype).mul_(scale)
        if not last:
            buf = torch.empty(3, G * B * H, T, dh, dtype=a.dtype, device=a.device)
            torch.bmm(dS, k, out=buf[0])
            torch.bmm(tr(dS), q, out=buf[1])
            torch.bmm(tr(P), do, out=buf[2])
            dqkv = buf.view(3, G, B, H, T, dh).permute(1, 2, 4, 3, 0, 5).reshape(G, N, 3 * d)
            g[pre + "attention.qkv.weight"] = torch.bmm(tr(dqkv), a)
            da = torch.bmm(dqkv, W("attention.qkv.weight"))
        else:
            Wqkv = W("attention.qkv.weight").view(G, H, 3, dh, d)
            buf = torch.empty(2, G * B * H, T, dh, dtype=a.dtype, device=a.device)
            torch.bmm(tr(dS), q, out=buf[0])
            torch.bmm(tr(P), do, out=buf[1])
            dkv = buf.view(2, G, B, H, T, dh).permute(1, 2, 4, 3, 0, 5).reshape(G, N, 2 * d)
            dq = _merge_heads(torch.bmm(dS, k), G, B, H)
            gw = torch.empty(G, H, 3, dh, d, dtype=a.dtype, device=a.device)
            gw[:, :, 0] = torch.bmm(tr(dq), a.view(G, M, 2 * d)[:, :, :d]).view(G, H, dh, d)
            gw[:, :, 1:] = torch.bmm(tr(dkv), a).view(G, H, 2, dh, d)
            g[pre + "attention.qkv.weight"] = gw.view(G, 3 * d, d)
            da = torch.bmm(dkv, Wqkv[:, :, 1:].reshape(G, 2 * d, d))
            da.view(G, M, 2 * d)[:, :, :d].baddbmm_(dq, Wqkv[:, :, 0].reshape(G, d, d))
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
