"""analyze.py's per-checkpoint evaluator of a language-model run (data.TASKS["lm"].evaluator names
it)."""
import data
from lm import eval as lm_eval
from model import weight_norm

SUMMARY_KEYS = ("loss", "loss_pos_ablated", "icl", "bigram", "ngram/3", "weight_norm")


def evaluator(out_dir, cfg, opt, dev):
    """analyze.Evaluator's fields (a dict) for an LM run: per-position, position-ablated, bigram,
    n-gram and ICL scores, per-head previous-token / prefix-matching scores, K-composition (layer 0
    -> 1), positional and weight norms; the ED features are the true-token logits
    (lm.eval.true_token_logits). On the CPU."""
    task = data.task_for(cfg)
    meta = {k: opt[k] for k in ("eval_seed", "lm_rows", "lm_ed", "lm_head_seqs", "lm_bigram_seqs",
                                "lm_ngrams")}
    tokens = task.eval_data(opt["eval_seed"], opt["lm_rows"])
    meta["width"] = min(opt["lm_ed"], len(tokens))

    def setup():
        table, tok, seed = task.bigram_table(), task.tokenizer(), opt["eval_seed"]
        fixed = dict(table=table, seed=seed, bigram_entropy=lm_eval.bigram_entropy(
            table, tokens, opt["lm_bigram_seqs"], seed))
        fixed["ngrams"] = {n: lm_eval.ngram_sequences(lambda w: tok.encode(w).ids, task.words(), n,
                                                      opt["lm_ngrams"], bos=task.bos,
                                                      space_id=task.meta["space_id"])
                           for n in (2, 3, 4)}

        def evaluate(model):
            model = model.cpu()
            row = checkpoint_metrics(model, tokens, opt, fixed)
            return row, lm_eval.true_token_logits(model, tokens, meta["width"], seed).numpy()
        return evaluate
    return dict(meta=meta, setup=setup, summary_keys=SUMMARY_KEYS, final=True)


def checkpoint_metrics(model, tokens, opt, fixed):
    """One checkpoint's analysis.jsonl metrics; `fixed` holds the run's bigram table, its entropy,
    the n-gram sequences and the seed."""
    pp = lm_eval.per_position_loss(model, tokens)
    ab = lm_eval.position_ablated_loss(model, tokens)
    row = {"loss": float(pp.mean()), "loss_pos_ablated": float(ab.mean()),
           **{f"loss/{k}": float(pp[k]) for k in lm_eval.EVAL_POSITIONS if k < len(pp)},
           "icl": lm_eval.icl_score(pp), "bigram_entropy": fixed["bigram_entropy"],
           "bigram": lm_eval.bigram_score(model, tokens, fixed["table"], opt["lm_bigram_seqs"],
                                          fixed["seed"])}
    for n, seqs in fixed["ngrams"].items():
        row[f"ngram/{n}"] = None
        if len(seqs):
            row[f"ngram/{n}"] = lm_eval.ngram_score(pp, lm_eval.ngram_loss(model, seqs), n)
    for key, fn in (("prev_token", lm_eval.previous_token_scores),
                    ("prefix", lm_eval.prefix_matching_scores)):
        row.update(_per_head(key, fn(model, opt["lm_head_seqs"], fixed["seed"])))
    if len(model.blocks) >= 2:
        S = lm_eval.k_composition_scores(model)
        row.update({f"kcomp/{a}-{b}": float(S[a, b]) for a in range(S.shape[0])
                    for b in range(S.shape[1])})
    row.update(pos_norms=lm_eval.positional_norms(model).tolist(),
               weight_norm=float(weight_norm(model.parameters())))
    return row


def _per_head(key, S):
    """{key/L<a>H<b>: score} of a (layers, heads) score matrix."""
    return {f"{key}/L{a}H{b}": float(S[a, b]) for a in range(S.shape[0]) for b in range(S.shape[1])}
