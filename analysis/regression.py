"""The regression task's evaluator for analyze.py (data.TASKS names it): its metrics on an eval
set, the structure statistics and the Hessian at every checkpoint, and the essential-dynamics
features."""
from pathlib import Path

import numpy as np
import torch

import data
from analysis.metrics import (Chunked, hutchinson_trace, lanczos_top, make_hvp,
                              regression_baselines, regression_metrics, structure_stats)
from model import to_tokens

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "paper_v1_seedmean.csv"


def evaluator(out_dir, cfg, opt, dev):
    """Behavioural metrics on the eval set, structure statistics, Hessian trace / top eigenvalues;
    the ED features are the full outputs on the fixed ED batch (its variant: the y-predictions
    only)."""
    hb = opt["hessian_batch"] if opt["hessian_batch"] > 0 else 1024 if dev.type == "cuda" else 256
    chunk = opt["chunk"] if opt["chunk"] >= 0 else 0 if dev.type == "cuda" else 256
    meta = {k: opt[k] for k in ("eval_size", "eval_seed", "ed_batch", "hessian_probes",
                                "lanczos_iters", "top_eigs")}
    B, T, C = opt["ed_batch"], 2 * cfg["K"], cfg["D"] + 1
    meta.update(hessian_batch=min(hb, B), width=B * T * C)

    def setup():
        task = data.task_for(cfg)
        batch = {k: v.to(dev)
                 for k, v in task.eval_batch(opt["eval_seed"], opt["eval_size"]).items()}
        # model-independent: once per run
        base = regression_baselines(batch, task.sigma2, task.tasks)
        ed = {k: v.to(dev) for k, v in task.eval_batch(opt["eval_seed"] + 1, B).items()}
        tokens, hb = to_tokens(ed["xs"], ed["ys"]), meta["hessian_batch"]

        def evaluate(model):
            model = model.to(dev)
            params = {k: v.detach().cpu() for k, v in model.named_parameters()}
            row = {**regression_metrics(Chunked(model, chunk), batch, task.sigma2, task.tasks,
                                             baselines=base),
                   **structure_stats(params, cfg["n_layer"])}
            if opt["hessian_probes"] > 0 or opt["lanczos_iters"] > 0:
                hvp, n = make_hvp(model, lambda o: task.loss(o, ed["ys"][:hb]), tokens[:hb])
                gen = torch.Generator().manual_seed(opt["eval_seed"])
                if opt["hessian_probes"] > 0:
                    tr, probes = hutchinson_trace(hvp, n, opt["hessian_probes"], gen)
                    row.update(hessian_trace=tr, hessian_trace_probes=probes)
                if opt["lanczos_iters"] > 0:
                    row["hessian_eigs"] = lanczos_top(hvp, n, opt["lanczos_iters"],
                                                      opt["top_eigs"], gen)
                del hvp  # frees the retained graph
            with torch.no_grad():
                return row, Chunked(model, chunk)(tokens).float().cpu().numpy()
        return evaluate
    h = max(cfg["K"] // 2, 1)
    # the step axes agree with the reference's
    paper = cfg["K"] == 8 and cfg.get("max_steps") == 500_000
    return dict(meta=meta, setup=setup,
                summary_keys=("loss", "delta_ridge", "pred_norm", f"icl_1_{h}", "weight_norm",
                              "ln_collapse/unembed", "hessian_trace"),
                ed_cols=np.arange(B * T * C).reshape(B, T, C)[:, 0::2, 0].ravel(),
                reference=np.genfromtxt(REFERENCE, delimiter=",", names=True) if paper else None)
