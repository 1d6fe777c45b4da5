"""Analyse training runs: per-checkpoint metrics, essential dynamics, stages, figures and a report.

    python analyze.py out/tiny                              # outputs in out/tiny
    python analyze.py out/s0 out/s1 out/s2 --out=out/seeds  # seeds: mean ± std, outputs in --out (default: the first)
    python analyze.py out/tiny --eval_size=2048 --threads=2  # --key=value overrides of DEFAULTS, as for llc.py
Every bare argument is a run directory, except a .py file, which is a config file of key = value lines.
Per run (cached, only new checkpoints are evaluated): analysis.jsonl (a row per checkpoint), ed_outputs.f32 (the
raw outputs on the fixed ED batch, a float32 row per checkpoint) and analysis_meta.json (the settings; changing
them recomputes everything). Into the output directory: stages.json, summary.json, report.md, figures/*.png
(plots.py). Several runs share one stage detection (on the mean curve over their common steps) and one PCA
(each run centred on its own mean). Without llc.jsonl the stages come from the test loss; llc.jsonl rows whose
chains all diverged (llc_mean null) are left out; both with a warning, also in summary.json.
A language-model run (config task "lm", language.md §4-5) gets its own per-checkpoint evaluations
(lm_evaluator: per-position, bigram, n-gram, ICL, per-head previous-token / prefix-matching and K-composition
scores), essential dynamics on true-token logits and its own figures (plots.lm_figures); the --lm_* sizes default
to a few seconds per checkpoint on a CPU (the paper: 10,000 each).
Quicker on a CPU: --eval_size=2048; --hessian_probes=0 --lanczos_iters=0 skip the Hessian.
Specs: ../shared/spec/regression.md §8-9, llc-and-ed.md §3-5.
"""
import json, math, os, sys, time, warnings
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

import common
import data
import plots
from model import weight_norm
from stages import detect_stages

REFERENCE = Path(__file__).resolve().parent.parent / "shared" / "reference" / "paper_v1_seedmean.csv"


# --------------------------------------------------------------------------------- essential dynamics
def gram(mats, rows=None, cols=None, mem_bytes=2 ** 28):
    """G = X X^T in float64, X the row-wise stack of mats[i][rows[i]] (arrays or np.memmaps of equal width),
    summed over column chunks so only an (N x chunk) slab is ever in memory: any number of features."""
    rows = [np.arange(len(m)) for m in mats] if rows is None else rows
    N = sum(len(r) for r in rows)
    cols = np.arange(mats[0].shape[1]) if cols is None else np.asarray(cols)
    chunk, G = max(1, mem_bytes // (8 * N)), np.zeros((N, N))
    for i in range(0, len(cols), chunk):
        c = cols[i:i + chunk]
        Xc = np.concatenate([np.asarray(m[np.ix_(r, c)], dtype=np.float64) for m, r in zip(mats, rows)])
        G += Xc @ Xc.T
    return G


def pca_from_gram(G, k=4, groups=None):
    """Centred PCA from a Gram matrix (llc-and-ed.md §3.2): G_c = J G J, J = I - 11^T/N; scores U sqrt(L).
    With `groups` (a label per row, e.g. the run) each group is centred on its own mean, so that several
    seeds share one basis of their development rather than of their differences. Signs are fixed so that
    the last row's score is >= 0. Returns (scores (N, k), explained-variance ratios)."""
    g = np.zeros(len(G)) if groups is None else np.asarray(groups)
    Gc = np.array(G, dtype=np.float64)
    for lab in np.unique(g):  # J G J in O(N^2): subtract each group's mean row, then its mean column
        i = g == lab
        Gc[i] -= Gc[i].mean(0)
        Gc[:, i] -= Gc[:, i].mean(1, keepdims=True)
    lam, U = np.linalg.eigh(Gc)
    lam, U = lam[::-1].clip(0), U[:, ::-1]
    scores = U[:, :k] * np.sqrt(lam[:k])
    scores *= np.where(scores[-1] < 0, -1.0, 1.0)
    return scores, lam[:k] / (lam.sum() or 1.0)


def smooth_variable_sigma(y, sigmas, truncate=4.0):
    """Gaussian smoothing along axis 0 with a width per output point (llc-and-ed.md §3.3): output i is the
    centre value of a reflect-mode Gaussian filter of width sigmas[i] on the window i ± int(truncate*sigma+0.5)
    clipped to the array (so reflection happens only at the array ends). Weights sum to 1."""
    y, sigmas = np.asarray(y, float), np.asarray(sigmas, float)
    if len(sigmas) != len(y):
        raise ValueError(f"need one sigma per point: {len(sigmas)} sigmas for {len(y)} points")
    if (sigmas < 0).any():
        raise ValueError(f"sigmas must be >= 0, got min {sigmas.min()}")
    out = np.empty_like(y)
    for i, s in enumerate(sigmas):
        r = int(truncate * s + 0.5)
        lo, hi = max(0, i - r), min(len(y), i + r + 1)
        k = np.arange(-r, r + 1)
        w = np.exp(-0.5 * (k / max(s, 1e-12)) ** 2)
        idx = (i - lo + k) % (2 * (hi - lo))  # reflect about the window edges: d c b a | a b c d | d c b a
        idx = np.where(idx >= hi - lo, 2 * (hi - lo) - 1 - idx, idx)
        out[i] = np.tensordot(w / w.sum(), y[lo + idx], axes=1)
    return out


def osculating_circles(c):
    """Centres and radii of the osculating circles of a 2-D curve c (N, 2) at t = 1..N-2 (central differences,
    llc-and-ed.md §3.4). The centres trace the evolute; its cusps mark turns of the trajectory."""
    d1, d2 = (c[2:] - c[:-2]) / 2, c[2:] - 2 * c[1:-1] + c[:-2]
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    speed = np.linalg.norm(d1, axis=1) + 1e-300
    radius = 1.0 / (np.abs(cross) / speed ** 3 + 1e-12)
    tangent = d1 / speed[:, None]
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) * np.where(cross >= 0, 1.0, -1.0)[:, None]
    return c[1:-1] + radius[:, None] * normal, radius


def cusp_candidates(curve, skip=8, top=3):
    """Checkpoint indices of the sharpest evolute cusps and of the sharpest points of a 2-D curve (N, 2).

    Cusps: among every `skip`-th osculating centre, the smallest centre displacement per unit displacement
    of the curve itself (llc-and-ed.md §3.4 uses the bare centre displacement; dividing by the curve's own
    step keeps a trajectory that has not started moving from counting as a cusp). Sharp points: the smallest
    radii. Indices refer to rows of `curve`."""
    centres, radii = osculating_circles(curve)
    idx = np.arange(0, len(centres), skip)
    moved = np.linalg.norm(np.diff(curve[1:-1][idx], axis=0), axis=1)
    ratio = np.linalg.norm(np.diff(centres[idx], axis=0), axis=1) / np.maximum(moved, 1e-300)
    return dict(cusps=[int(idx[i]) + 1 for i in np.argsort(ratio)[:top]],
                sharp=[int(i) + 1 for i in np.argsort(radii)[:top]])


def essential_dynamics(runs, mats, steps, sigma_max, ycols=None, k=4):
    """Joint PCA of all runs' output trajectories (common steps), the variant on the columns `ycols` only (the
    regression's y-predictions; None: no variant), smoothing, evolutes of the first run's smoothed PC pairs and
    their cusps (as steps)."""
    keep = set(steps)
    sel = [np.array([r["ed_row"] for r in rows if r["step"] in keep]) for rows in runs]
    groups = np.repeat(np.arange(len(sel)), [len(s) for s in sel])
    k = min(k, len(groups))
    scores, evr = pca_from_gram(gram(mats, sel), k, groups)
    n, cuts = len(steps), np.cumsum([len(s) for s in sel])[:-1]
    scores_y, evr_y = (None, np.zeros(0)) if ycols is None else pca_from_gram(gram(mats, sel, cols=ycols), k, groups)
    smax = sigma_max if sigma_max >= 0 else 300 * n / 5000
    smoothed = [smooth_variable_sigma(s, np.linspace(0.1, max(0.1, smax), n)) for s in np.split(scores, cuts)]
    skip = 8 if n >= 80 else max(1, n // 10)
    cusps, evolutes = {}, {}
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        if max(i, j) < scores.shape[1] and n >= 3:
            pair = f"PC{i + 1}-PC{j + 1}"
            evolutes[pair] = osculating_circles(smoothed[0][:, [i, j]])[0]
            if n >= 3 + skip:
                c = cusp_candidates(smoothed[0][:, [i, j]], skip=skip)
                cusps[pair] = {key: [steps[t] for t in v] for key, v in c.items()}
    return dict(scores=np.split(scores, cuts), smoothed=smoothed, evr=evr, evr_y=evr_y, cusps=cusps,
                evolutes=evolutes, scores_y=None if scores_y is None else np.split(scores_y, cuts),
                steps=np.array(steps))


# ------------------------------------------------------------------------------------------- Hessian
def make_hvp(model, loss_of_output, inputs):
    """Hessian-vector products of the loss over the flattened parameters. The gradient is built once with its
    graph (create_graph), so each product is one backward pass through it (retain_graph), not a fresh
    grad-of-grad. The returned function takes and returns CPU vectors whatever the model's device."""
    names, ps = zip(*[(n, p.detach()) for n, p in model.named_parameters()])
    w0 = torch.cat([p.reshape(-1) for p in ps]).requires_grad_(True)
    chunks = torch.split(w0, [p.numel() for p in ps])
    out = functional_call(model, {n: c.view_as(p) for n, c, p in zip(names, chunks, ps)}, (inputs,))
    g, = torch.autograd.grad(loss_of_output(out), w0, create_graph=True)
    return (lambda v: torch.autograd.grad(g, w0, v.to(w0), retain_graph=True)[0].detach().cpu()), w0.numel()


def hutchinson_trace(hvp, n, probes, gen):
    """Hutchinson estimate with Rademacher probes: returns (mean of v^T H v, per-probe values)."""
    vals = [float(torch.dot(v, hvp(v))) for v in
            (torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1 for _ in range(probes))]
    return float(np.mean(vals)), vals


def lanczos_top(hvp, n, iters, k, gen):
    """Top-k (largest algebraic) eigenvalues by Lanczos with full re-orthogonalisation (float64 basis)."""
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


# ------------------------------------------------------------------------------ per-checkpoint analysis
def structure_stats(params, n_layer):
    """LN collapse (fraction of |gamma| < 0.1 per LN), embedding spectra sigma^2/sum and the effective
    unembedding (the final LN's affine folded into output row 0): regression.md §8.2."""
    lns = {f"b{i + 1}-{k}": f"blocks.{i}.layer_norms.{j}"
           for i in range(n_layer) for j, k in enumerate(("attn", "mlp"))}
    lns["unembed"] = "unembedding.0"
    row = {f"ln_collapse/{n}": float((params[p + ".weight"].abs() < 0.1).float().mean()) for n, p in lns.items()}
    for name, key in (("tok_spec", "token_embedding.weight"), ("pos_spec", "postn_embedding.weight")):
        s2 = torch.linalg.svdvals(params[key].double()) ** 2
        row[name] = (s2 / s2.sum()).tolist()
    gamma, beta = params["unembedding.0.weight"], params["unembedding.0.bias"]
    W, b = params["unembedding.1.weight"], params["unembedding.1.bias"]
    row["unembed_w"] = (gamma * W[0]).tolist()
    row["unembed_b"] = float(W[0] @ beta + b[0])
    return row


class Chunked(torch.nn.Module):
    """`model` applied to `chunk` sequences at a time (0: all at once); the same parameters. On a CPU small
    chunks keep the activations in cache."""

    def __init__(self, model, chunk):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, x):
        return torch.cat([self.model(c) for c in x.split(self.chunk)]) if self.chunk else self.model(x)


def evaluate_run(out_dir, opt):
    """Evaluate every checkpoint not yet in out_dir/analysis.jsonl; returns (rows sorted by step, ED memmap).
    The cache logic is shared; what is measured comes from regression_evaluator or lm_evaluator."""
    out_dir = Path(out_dir)
    cfg = common.load_run(out_dir)
    dev = torch.device(opt["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta, setup = (lm_evaluator if cfg.get("task") == "lm" else regression_evaluator)(out_dir, cfg, opt, dev)
    cache, ed_path, meta_path = (out_dir / f for f in ("analysis.jsonl", "ed_outputs.f32", "analysis_meta.json"))
    stale = meta_path.exists() and json.loads(meta_path.read_text()) != meta
    rows = [] if stale else common.read_jsonl(cache)
    need = len(rows) * meta["width"] * 4  # the ED row is appended before its cache row
    if stale or (ed_path.stat().st_size if ed_path.exists() else 0) < need:
        warnings.warn(f"{out_dir}: analysis settings changed or ed_outputs.f32 is incomplete; "
                      "re-evaluating every checkpoint")
        cache.unlink(missing_ok=True)
        rows, need = [], 0
    common.atomic_write(meta_path, json.dumps(meta))
    with open(ed_path, "ab") as f:  # drop the tail of a torn append
        f.truncate(need)
    done = {r["step"] for r in rows}
    todo = [s for s in common.list_checkpoints(out_dir) if s not in done]
    if todo:
        evaluate, t0 = setup(), time.time()  # the once-per-run state (eval sets, baselines, n-gram lists)
        for i, step in enumerate(todo):
            try:
                model = common.load_model(out_dir, step).to(dev)
            except common.CheckpointError as e:
                warnings.warn(f"skipping step {step}: {e}")
                continue
            metrics, feats = evaluate(model)
            row = {"step": step, **metrics, "ed_row": len(rows)}
            with open(ed_path, "ab") as f:
                f.write(np.asarray(feats, dtype=np.float32).ravel().tobytes())
                f.flush()
                os.fsync(f.fileno())
            common.append_jsonl(cache, row)
            rows.append(row)
            el = time.time() - t0
            print(f"\ranalyze {out_dir.name}: step {step} [{i + 1}/{len(todo)}] {el / (i + 1):.1f}s/ckpt "
                  f"ETA {el / (i + 1) * (len(todo) - i - 1):.0f}s   ", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    X = np.memmap(ed_path, dtype=np.float32, mode="r").reshape(-1, meta["width"]) if rows else None
    return sorted(rows, key=lambda r: r["step"]), X


def regression_evaluator(out_dir, cfg, opt, dev):
    """(cache settings, setup): setup() returns model -> (metrics, ED features). Behavioural metrics on the eval
    set, structure statistics, Hessian trace / top eigenvalues, and the full outputs on the fixed ED batch."""
    hb = opt["hessian_batch"] if opt["hessian_batch"] > 0 else 1024 if dev.type == "cuda" else 256
    chunk = opt["chunk"] if opt["chunk"] >= 0 else 0 if dev.type == "cuda" else 256
    meta = {k: opt[k] for k in ("eval_size", "eval_seed", "ed_batch", "hessian_probes", "lanczos_iters",
                                "top_eigs")}
    meta.update(hessian_batch=min(hb, opt["ed_batch"]), width=opt["ed_batch"] * 2 * cfg["K"] * (cfg["D"] + 1))

    def setup():
        task = common.run_task(out_dir)
        batch = {k: v.to(dev) for k, v in task.eval_batch(opt["eval_seed"], opt["eval_size"]).items()}
        base = data.regression_baselines(batch, task.sigma2, task.tasks)  # model-independent: once per run
        ed = {k: v.to(dev) for k, v in task.eval_batch(opt["eval_seed"] + 1, opt["ed_batch"]).items()}
        tokens, hb = data.to_tokens(ed["xs"], ed["ys"]), meta["hessian_batch"]

        def evaluate(model):
            params = {k: v.detach().cpu() for k, v in model.named_parameters()}
            row = {**data.regression_metrics(Chunked(model, chunk), batch, task.sigma2, task.tasks, baselines=base),
                   **structure_stats(params, cfg["n_layer"])}
            if opt["hessian_probes"] > 0 or opt["lanczos_iters"] > 0:
                hvp, n = make_hvp(model, lambda o: data.Task.loss(o, ed["ys"][:hb]), tokens[:hb])
                gen = torch.Generator().manual_seed(opt["eval_seed"])
                if opt["hessian_probes"] > 0:
                    tr, probes = hutchinson_trace(hvp, n, opt["hessian_probes"], gen)
                    row.update(hessian_trace=tr, hessian_trace_probes=probes)
                if opt["lanczos_iters"] > 0:
                    row["hessian_eigs"] = lanczos_top(hvp, n, opt["lanczos_iters"], opt["top_eigs"], gen)
                del hvp  # frees the retained graph
            with torch.no_grad():
                return row, Chunked(model, chunk)(tokens).float().cpu().numpy()
        return evaluate
    return meta, setup


def lm_evaluator(out_dir, cfg, opt, dev):
    """regression_evaluator for a language-model run (language.md §4): per-position, position-ablated, bigram,
    n-gram and ICL scores, per-head previous-token / prefix-matching scores, K-composition (layer 0 -> 1),
    positional and weight norms; the ED features are the true-token logits (lm_eval.true_token_logits). CPU."""
    import lm_eval
    task = common.run_task(out_dir)
    meta = {k: opt[k] for k in ("eval_seed", "lm_rows", "lm_ed", "lm_head_seqs", "lm_bigram_seqs",
                                "lm_ngrams")}
    tokens = task.eval_data(opt["eval_seed"], opt["lm_rows"])
    meta["width"] = min(opt["lm_ed"], len(tokens))

    def setup():
        table, tok, seed = task.bigram_table(), task.tokenizer(), opt["eval_seed"]
        H2 = lm_eval.bigram_entropy(table, tokens, opt["lm_bigram_seqs"], seed)
        seqs = {n: lm_eval.ngram_sequences(lambda w: tok.encode(w).ids, task.words(), n, opt["lm_ngrams"],
                                           bos=task.bos, space_id=task.meta["space_id"]) for n in (2, 3, 4)}

        def evaluate(model):
            model = model.cpu()
            pp, ab = lm_eval.per_position_loss(model, tokens), lm_eval.position_ablated_loss(model, tokens)
            row = {"loss": float(pp.mean()), "loss_pos_ablated": float(ab.mean()),
                   **{f"loss/{k}": float(pp[k]) for k in lm_eval.EVAL_POSITIONS if k < len(pp)},
                   "icl": lm_eval.icl_score(pp), "bigram_entropy": H2,
                   "bigram": lm_eval.bigram_score(model, tokens, table, opt["lm_bigram_seqs"], seed)}
            for n, sq in seqs.items():
                row[f"ngram/{n}"] = lm_eval.ngram_score(pp, lm_eval.ngram_loss(model, sq), n) if len(sq) else None
            for key, fn in (("prev_token", lm_eval.previous_token_scores), ("prefix", lm_eval.prefix_matching_scores)):
                S = fn(model, opt["lm_head_seqs"], seed)
                row.update({f"{key}/L{a}H{b}": float(S[a, b]) for a in range(S.shape[0]) for b in range(S.shape[1])})
            if len(model.blocks) >= 2:
                S = lm_eval.k_composition_scores(model)
                row.update({f"kcomp/{a}-{b}": float(S[a, b]) for a in range(S.shape[0]) for b in range(S.shape[1])})
            row.update(pos_norms=lm_eval.positional_norms(model).tolist(),
                       weight_norm=float(weight_norm(model.parameters())))
            return row, lm_eval.true_token_logits(model, tokens, meta["width"], seed).numpy()
        return evaluate
    return meta, setup


def read_llc(out_dir):
    """(llc.jsonl rows with a finite llc_mean, the last per step, sorted; the steps whose chains all diverged,
    llc_mean null, and that have no finite row). ([], []) when the file is absent."""
    rows, diverged = {}, set()
    for r in common.read_jsonl(Path(out_dir) / "llc.jsonl"):
        v = r.get("llc_mean")
        if isinstance(v, (int, float)) and math.isfinite(v):
            rows[r["step"]] = r
        else:
            diverged.add(r["step"])
    return [rows[s] for s in sorted(rows)], sorted(diverged - set(rows))


def table(runs, key, steps):
    """(runs, steps[, width]) float array of one metric over the given steps; NaN where a run lacks it or has
    null (also inside a list; shorter lists are padded)."""
    vals = [[by.get(s) for s in steps] for by in ({r["step"]: r.get(key) for r in rows} for rows in runs)]
    width = max((len(v) for row in vals for v in row if isinstance(v, list)), default=None)
    if width is None:
        return np.array([[np.nan if v is None else v for v in row] for row in vals], dtype=float)
    return np.array([[(v or []) + [None] * (width - len(v or [])) for v in row] for row in vals], dtype=float)


def tables(runs, steps, keys=None):
    """{key: table(runs, key, steps)} for `keys` (default: every key of the rows but step and ed_row)."""
    keys = keys or dict.fromkeys(k for rows in runs for r in rows for k in r if k not in ("step", "ed_row"))
    return {k: table(runs, k, steps) for k in keys}


# ------------------------------------------------------------------------------------ summary and main
LM_SUMMARY_KEYS = ("loss", "loss_pos_ablated", "icl", "bigram", "ngram/3", "weight_norm")
SUMMARY_KEYS = ("loss", "delta_ridge", "pred_norm", "icl_1_{h}", "weight_norm", "ln_collapse/unembed",
                "hessian_trace")


def stage_changes(det, steps, M, llc_steps, L, K, keys=SUMMARY_KEYS):
    """For each stage, the seed-mean value of each metric (`keys`) at its first and last checkpoint."""
    series = [(k.format(h=max(K // 2, 1)), steps, M) for k in keys] + [("llc_mean", llc_steps, L)]
    out = []
    for s in det["stages"]:
        ch = {}
        for key, st, T in series:
            if len(st) and key in T:
                v = np.nanmean(T[key], 0)
                i0, i1 = (int(np.argmin(np.abs(np.log1p(st) - np.log1p(t)))) for t in (s["start"], s["end"]))
                ch["llc" if key == "llc_mean" else key] = dict(start=float(v[i0]), end=float(v[i1]),
                                                               delta=float(v[i1] - v[i0]))
        out.append({**s, "metrics": ch})
    return out


STAGE_RULE = dict(alpha=0.05, slope_frac=0.1, min_change_frac=0.05, min_log_len=0.25, flat_frac=0.05)
DEFAULTS = dict(  # the options, --key=value; a value keeps the default's type
    out="",               # output directory (default: the first run directory)
    eval_size=8192,       # eval-set sequences for the metrics
    eval_seed=0,          # seeds the eval set (ED/Hessian batch: seed+1)
    ed_batch=1024,        # sequences in the fixed ED batch
    hessian_batch=-1,     # first sequences of the ED batch used (-1: 1024 on a GPU, 256 on a CPU)
    hessian_probes=2,     # Hutchinson probes (0: no trace)
    lanczos_iters=10,     # Lanczos iterations (0: no eigenvalues)
    top_eigs=3,           # top Hessian eigenvalues reported
    chunk=-1,             # sequences per forward pass (0: the whole batch; -1: 256 on a CPU, 0 on a GPU)
    ed_sigma_max=-1.0,    # end of the smoothing-σ ramp (-1: 300·N/5000)
    lm_rows=256,          # LM: held-out rows evaluated (the paper: 10,000 x 1,024 tokens)
    lm_ed=256,            # LM: ED features, one true-token logit per row (at most lm_rows; the paper: 10,000)
    lm_head_seqs=200,     # LM: synthetic sequences per head score (the paper: 10,000)
    lm_bigram_seqs=256,   # LM: positions for the bigram score and entropy (the paper: 5,000 / 10,000)
    lm_ngrams=1000,       # LM: n-gram sequences per n = 2, 3, 4
    threads=0,            # torch threads (0: torch's default)
    device="",            # evaluation device (default: cuda if available, else cpu)
    **STAGE_RULE)         # the stage rule's thresholds, see detect_stages


def split_runs(argv):
    """(run directories, the rest for common.configure). configure reads every bare argument as a config file;
    here a bare argument is a run directory unless it ends in .py, or is the value of a preceding `--key`
    written without `=` (as configure reads it: any key but a boolean one takes the next argument)."""
    runs, rest = [], []
    for arg in argv:
        prev = rest[-1] if rest else ""
        value = prev.startswith("--") and "=" not in prev and not isinstance(DEFAULTS.get(prev[2:]), bool)
        (rest if arg.startswith("--") or arg.endswith(".py") or value else runs).append(arg)
    return runs, rest


def main(argv=None):
    """Analyse the runs named in argv (see the module docstring); returns the summary also written to
    <out>/summary.json. A bad option raises common.ConfigError before any work starts."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):  # configure has no help of its own; argparse used to give one here
        options = "\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items())
        print(f"{__doc__}\nOptions (DEFAULTS; comments in analyze.py):\n{options}")
        return None
    run_dirs, rest = split_runs(argv)
    opt = common.configure(DEFAULTS, rest)
    if not run_dirs:
        raise common.ConfigError("give one or more run directories: python analyze.py out/<run> [--key=value ...]")
    if opt["threads"] > 0:
        torch.set_num_threads(opt["threads"])
    out = Path(opt["out"] or run_dirs[0])
    evals = [evaluate_run(d, opt) for d in run_dirs]
    runs, mats = [r for r, _ in evals], [m for _, m in evals]
    empty = [d for d, r in zip(run_dirs, runs) if not r]
    if empty:
        raise SystemExit(f"analyze.py: no checkpoints in {empty}")
    cfg, warn = common.load_run(run_dirs[0]), []
    lm = cfg.get("task") == "lm"
    steps = sorted(set.intersection(*[{r["step"] for r in rows} for rows in runs]))
    llcs, diverged = zip(*[read_llc(d) for d in run_dirs])
    for d, bad in zip(run_dirs, diverged):
        if bad:
            warn.append(f"{d}/llc.jsonl: all chains diverged (llc_mean null) at step(s) {bad}: left out of the "
                        "stage detection and the LLC curves")
    llc_steps = sorted(set.intersection(*[{r["step"] for r in rows} for rows in llcs]))
    L = tables(llcs, llc_steps, ("llc_mean", "llc_std", "llc_se", "rhat", "llc_per_chain"))
    if len(llc_steps) >= 5:
        n = np.isfinite(L["llc_mean"]).sum(0)
        sig, se = np.nanmean(L["llc_mean"], 0), np.sqrt(np.nansum(L["llc_se"] ** 2, 0)) / n
        sig_steps, se = llc_steps, np.where(np.isnan(L["llc_se"]).all(0), np.nan, se)
    else:
        warn.append(f"no usable llc.jsonl (fewer than 5 common LLC estimates in {run_dirs}): stages are "
                    "detected on the test loss instead")
        sig_steps, sig, se, llc_steps = steps, np.nanmean(table(runs, "loss", steps), 0), None, []
    for w in warn:
        warnings.warn(w)
    det = detect_stages(sig_steps, sig, se, **{k: opt[k] for k in STAGE_RULE})
    det["signal"] = "llc" if llc_steps else "loss"
    common.atomic_write(out / "stages.json", json.dumps(det, indent=1))
    if lm:
        ed = essential_dynamics(runs, mats, steps, opt["ed_sigma_max"])
    else:
        B, T, C = opt["ed_batch"], 2 * cfg["K"], cfg["D"] + 1
        ycols = np.arange(B * T * C).reshape(B, T, C)[:, 0::2, 0].ravel()
        ed = essential_dynamics(runs, mats, steps, opt["ed_sigma_max"], ycols)
    ref = None
    if not lm and cfg["K"] == 8 and cfg.get("max_steps") == 500_000 and REFERENCE.exists():
        ref = np.genfromtxt(REFERENCE, delimiter=",", names=True)
    M = tables(runs, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN columns (missing metrics)
        figs = (plots.lm_figures if lm else plots.all_figures)(out / "figures", steps, M, llc_steps, L, llcs[0],
                                                               diverged[0], det, ed, cfg, ref)
        stages = stage_changes(det, steps, M, llc_steps, L, cfg["K"], LM_SUMMARY_KEYS if lm else SUMMARY_KEYS)
    summary = dict(runs=[str(d) for d in run_dirs], signal=det["signal"], warnings=warn, n_checkpoints=len(steps),
                   boundaries=det["boundaries"], stages=stages, detector=dict(params=det["params"], gp=det["gp"]),
                   llc_diverged_steps=list(diverged),
                   essential_dynamics=dict(explained_variance=ed["evr"].tolist(),
                                           explained_variance_y=ed["evr_y"].tolist(), cusps=ed["cusps"]),
                   figures=[str(f.relative_to(out)) for f in figs])
    if lm:
        last = {k: v[:, -1].mean() for k, v in M.items() if v.ndim == 2}
        summary["final"] = {k: float(v) for k, v in last.items() if math.isfinite(v)}
    common.atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    plots.write_report(out / "report.md", summary, figs)
    print(f"analyze.py: {len(det['stages'])} stages on {det['signal']}, boundaries {det['boundaries']}; "
          f"wrote {out}/stages.json, summary.json, report.md, figures/", file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (common.ConfigError, FileNotFoundError) as e:  # bad options, or a run directory that is not a run
        sys.exit(f"analyze.py: {e}")
