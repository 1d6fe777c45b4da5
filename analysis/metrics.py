"""What is measured at a checkpoint: the regression task's metrics (data.Task.metrics: losses
per position, the Bayes baselines, ICL and out-of-distribution scores); Hessian-vector products,
the Hutchinson trace and the top eigenvalues by Lanczos; the regression model's structure
statistics (LayerNorm collapse, embedding spectra, the effective unembedding); a model applied in
chunks."""
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from model import per_token_mse, readout, to_tokens, weight_norm


OOD_SCALES = (3, 5, 10, 100)


def ridge_predict(xs, ys, sigma2):
    """Bayes predictor for the Gaussian prior: ridge on the k-1 earlier pairs, all k solved at
    once."""
    B, K, D = xs.shape
    outer = xs.unsqueeze(-1) * xs.unsqueeze(-2)                           # (B,K,D,D)
    A = _exclusive_cumsum(outer) + sigma2 * torch.eye(D, dtype=xs.dtype, device=xs.device)
    b = _exclusive_cumsum(xs * ys.unsqueeze(-1))                          # (B,K,D)
    w_hat = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    return (w_hat * xs).sum(-1)


def dmmse_predict(xs, ys, tasks, sigma2, chunk_elems=2 ** 24):
    """Bayes predictor for a finite prior of M tasks: posterior mean over the tasks given the k-1
    earlier pairs. Vectorised over k and tasks; the batch is chunked so the (B,K,M) tensor stays
    bounded."""
    B, K, D = xs.shape
    step = max(1, chunk_elems // (K * len(tasks)))
    tasks = tasks.to(xs)
    out = []
    for i in range(0, B, step):
        x, y = xs[i:i + step], ys[i:i + step]
        sq = (y.unsqueeze(-1) - x @ tasks.T).pow(2) / (2 * sigma2)      # (b,K,M)
        post = torch.softmax(-_exclusive_cumsum(sq), dim=-1)
        out.append(((post @ tasks) * x).sum(-1))
    return torch.cat(out)


def _exclusive_cumsum(t):
    """Sum over the strictly earlier positions along dim 1 (position k sees 1..k-1)."""
    c = t.cumsum(1)
    return torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=1)


def regression_baselines(batch, sigma2, tasks=None):
    """The Bayes predictors' predictions on a fixed batch, dict(ridge=(B,K), dmmse=(B,K)). They do
    not depend on the model: an evaluator computes them once and passes them to regression_metrics
    (dMMSE costs B*K*M)."""
    ridge = ridge_predict(batch["xs"], batch["ys"], sigma2)
    return dict(ridge=ridge, dmmse=(ridge if tasks is None
                                    else dmmse_predict(batch["xs"], batch["ys"], tasks, sigma2)))


@torch.no_grad()
def regression_metrics(model, batch, sigma2, tasks=None, baselines=None):
    """The paper's behavioural metrics on one fixed batch, as a flat dict (the keys are listed in
    the README): losses per position, distances to the Bayes baselines (`baselines`, else computed
    here), prediction norm, ICL scores, out-of-distribution losses and the weight norm."""
    xs, ys, noise = batch["xs"], batch["ys"], batch["noise"]
    K = xs.shape[1]

    def predict(x, y):
        return readout(model(to_tokens(x, y)))

    pred = predict(xs, ys)
    tok = per_token_mse(pred, ys)
    base = regression_baselines(batch, sigma2, tasks) if baselines is None else baselines
    h = max(K // 2, 1)
    m = {"loss": tok.mean().item()}
    m.update({f"loss/{k + 1}": v for k, v in enumerate(tok.tolist())})
    m["delta_ridge"] = (pred - base["ridge"]).pow(2).mean().item()
    m["delta_dmmse"] = (pred - base["dmmse"]).pow(2).mean().item()
    m["pred_norm"] = pred.pow(2).mean().item()
    m[f"icl_1_{h}"] = (tok[h - 1] - tok[0]).item()
    m[f"icl_{h}_{K}"] = (tok[K - 1] - tok[h - 1]).item()
    signal = ys - noise
    for g in OOD_SCALES:
        # both OOD variants have targets g*w.x + eps; they differ in the inputs shown
        y_g = g * signal + noise
        m[f"ood_inputs/{g}"] = F.mse_loss(predict(g * xs, y_g), y_g).item()
        m[f"ood_tasks/{g}"] = F.mse_loss(predict(xs, y_g), y_g).item()
    m["weight_norm"] = weight_norm(model.parameters())
    return m


def make_hvp(model, loss_of_output, inputs):
    """Hessian-vector products of the loss over the flattened parameters. The gradient is built once
    with its graph (create_graph), so each product is one backward pass through it (retain_graph),
    not a fresh grad-of-grad. The returned function takes and returns CPU vectors whatever the
    model's device."""
    names, ps = zip(*[(n, p.detach()) for n, p in model.named_parameters()])
    w0 = torch.cat([p.reshape(-1) for p in ps]).requires_grad_(True)
    chunks = torch.split(w0, [p.numel() for p in ps])
    out = functional_call(model, {n: c.view_as(p) for n, c, p in zip(names, chunks, ps)}, (inputs,))
    g, = torch.autograd.grad(loss_of_output(out), w0, create_graph=True)
    return (lambda v: torch.autograd.grad(g, w0, v.to(w0),
                                          retain_graph=True)[0].detach().cpu()), w0.numel()


def hutchinson_trace(hvp, n, probes, gen):
    """Hutchinson estimate with Rademacher probes: returns (mean of v^T H v, per-probe values)."""
    vals = [float(torch.dot(v, hvp(v))) for v in
            (torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1 for _ in range(probes))]
    return float(np.mean(vals)), vals


def lanczos_top(hvp, n, iters, k, gen):
    """Top-k (largest algebraic) eigenvalues by Lanczos with full re-orthogonalisation
    (float64 basis)."""
    iters = min(iters, n)
    V, alpha, beta = [], [], []
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    v /= v.norm()
    for j in range(iters):
        V.append(v)
        w = hvp(v.float()).double()
        alpha.append(float(w @ v))
        Q = torch.stack(V)
        for _ in range(2):  # full re-orthogonalisation, twice
            w = w - Q.T @ (Q @ w)
        b = float(w.norm())
        if b < 1e-10 or j == iters - 1:
            break
        beta.append(b)
        v = w / b
    T = np.diag(alpha) + np.diag(beta[:len(alpha) - 1], 1) + np.diag(beta[:len(alpha) - 1], -1)
    return np.linalg.eigvalsh(T)[::-1][:k].tolist()


def structure_stats(params, n_layer):
    """LN collapse (fraction of |gamma| < 0.1 per LN), embedding spectra sigma^2/sum and the
    effective unembedding (the final LN's affine folded into output row 0). A statistic whose
    parameters an edited model lacks (renamed or removed) or has in another shape is left out, named
    in a warning."""
    def spectrum(M):
        s2 = torch.linalg.svdvals(M.double()) ** 2
        return (s2 / s2.sum()).tolist()
    lns = {f"b{i + 1}-{k}": f"blocks.{i}.layer_norms.{j}"
           for i in range(n_layer) for j, k in enumerate(("attn", "mlp"))}
    lns["unembed"] = "unembedding.0"
    stats = [(f"ln_collapse/{n}", [p + ".weight"], lambda g: float((g.abs() < 0.1).float().mean()))
             for n, p in lns.items()]
    stats += [("tok_spec", ["token_embedding.weight"], spectrum),
              ("pos_spec", ["postn_embedding.weight"], spectrum)]
    unembed = ["unembedding.0.weight", "unembedding.0.bias",
               "unembedding.1.weight", "unembedding.1.bias"]
    stats += [("unembed_w", unembed, lambda gamma, beta, W, b: (gamma * W[0]).tolist()),
              ("unembed_b", unembed, lambda gamma, beta, W, b: float(W[0] @ beta + b[0]))]
    row, skipped = {}, []
    for name, keys, stat in stats:
        lacks = [k for k in keys if k not in params]
        try:
            if not lacks:
                row[name] = stat(*(params[k] for k in keys))
        except (IndexError, RuntimeError) as e:  # another shape
            lacks = [f"{type(e).__name__}: {e}"]
        if lacks:
            skipped.append(f"{name} ({', '.join(lacks)})")
    if skipped:
        warnings.warn(f"analyze.py: structure statistics left out (model.py renamed or changed "
                      f"their parameters): {'; '.join(skipped)}")
    return row


class Chunked(torch.nn.Module):
    """`model` applied to `chunk` sequences at a time (0: all at once); the same parameters. On a
    CPU small chunks keep the activations in cache."""

    def __init__(self, model, chunk):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, x):
        return (torch.cat([self.model(c) for c in x.split(self.chunk)]) if self.chunk
                else self.model(x))

