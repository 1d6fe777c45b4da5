"""The task table (`TASKS`: per task its config defaults, model, data, evaluator, figures and stage
names; the scripts look a run's task up there and nowhere else) and the in-context linear regression
task: sampling, token layout, readout, Bayes baselines and metrics. Every random draw takes an
explicit torch.Generator. The language model (package lm/) is named in the table by its module path
and imported only when a config has task = "lm"."""
import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

import common
from fast import icl_loss_and_grads
from model import ICLConfig, weight_norm

OOD_SCALES = (3, 5, 10, 100)


DEFAULTS = dict(  # the regression task's config keys (train.py adds them to its own)
    D=4,              # input dimension; tokens have D+1 channels
    K=8,              # (x, y) pairs per context
    sigma2=0.125,     # noise variance of y = w.x + eps
    num_tasks=0,      # size M of the task prior; 0 = infinite (a fresh task per sequence)
    task_seed=0,      # draws the M tasks of a finite prior
    d_mlp=64,         # MLP width of the regression transformer
)


class Task:
    """The training distribution of a run: D, K, sigma2 and the task prior (M = num_tasks,
    0 = infinite)."""

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["D"], cfg["K"], cfg["sigma2"], cfg["num_tasks"], cfg["task_seed"])

    def __init__(self, D=4, K=8, sigma2=0.125, num_tasks=0, task_seed=0, input_scale=1.0):
        self.D, self.K, self.sigma2, self.num_tasks, self.task_seed = (
            D, K, sigma2, num_tasks, task_seed)
        self.input_scale, self.tasks = input_scale, None
        # the finite prior: M tasks drawn once, then sampled uniformly with replacement
        if num_tasks > 0:
            self.tasks = torch.randn(num_tasks, D,
                                     generator=torch.Generator().manual_seed(task_seed))

    # the hand-derived gradient of loss for stacked chains
    batched_grad = staticmethod(icl_loss_and_grads)

    def sample(self, gen, batch_size, device=None):
        """A fresh batch (xs, ys), drawn on the generator's device."""
        b = sample_batch(gen, batch_size, self.D, self.K, self.sigma2, self.tasks,
                         device or gen.device)
        # out of distribution: x -> g x with the same task, y = g w.x + noise
        if self.input_scale != 1.0:
            g = self.input_scale
            return g * b["xs"], g * (b["ys"] - b["noise"]) + b["noise"]
        return b["xs"], b["ys"]

    def refined(self, name):
        """The data distribution of a data-refined LLC: 'ood_inputs/<g>' (inputs scaled by g) or
        'tasks/<M>' (a prior of M tasks); the model and its loss stay the run's."""
        kind, _, value = name.partition("/")
        try:
            if kind == "ood_inputs":
                return Task(self.D, self.K, self.sigma2, self.num_tasks, self.task_seed,
                            float(value))
            if kind == "tasks":
                return Task(self.D, self.K, self.sigma2, int(value), self.task_seed)
        except ValueError:
            pass
        raise common.ConfigError(f"data_refine {name!r}: the regression task offers ood_inputs/<g> "
                                 f"(e.g. ood_inputs/{OOD_SCALES[0]}) and tasks/<M> (e.g. tasks/64)")

    def eval_batch(self, seed, batch_size):
        """A fixed, seeded batch with its tasks and noise (needed for the OOD metrics), always
        on CPU."""
        return sample_batch(torch.Generator().manual_seed(seed), batch_size, self.D, self.K,
                            self.sigma2, self.tasks)

    @staticmethod
    def loss(out, ys):
        """Mean squared error of the readout: the training loss and the loss the LLC is measured
        on."""
        return F.mse_loss(readout(out), ys)

    # the interface every task offers (lm.data.LMTask too)
    @staticmethod
    def model_input(xs, ys):
        """What the model is called on for a sampled batch: the interleaved tokens."""
        return to_tokens(xs, ys)

    @staticmethod
    def loss_per_token(out, ys):
        """(K,) the loss at each context position, averaged over the batch."""
        return per_token_mse(readout(out), ys)

    @staticmethod
    def loss_elements(out, ys):
        """(rows, K) the loss of every prediction (llc.py --token_rows)."""
        return (readout(out) - ys) ** 2

    def eval_data(self, seed, batch_size):
        """The eval batch with the baselines' predictions attached: they do not depend on the
        model."""
        batch = self.eval_batch(seed, batch_size)
        batch["baselines"] = regression_baselines(batch, self.sigma2, self.tasks)
        return batch

    def metrics(self, model, batch):
        dev = next(model.parameters()).device
        batch = {k: {b: t.to(dev) for b, t in v.items()} if isinstance(v, dict) else v.to(dev)
                 for k, v in batch.items()}
        return regression_metrics(model, batch, self.sigma2, self.tasks, batch.get("baselines"))


def sample_batch(gen, batch_size, D, K, sigma2, tasks=None, device="cpu"):
    """Draw w, then xs, then noise (the reference order). Returns dict(xs (B,K,D), ys (B,K),
    ws, noise)."""
    B = batch_size
    if tasks is None:
        ws = torch.randn(B, D, generator=gen, device=device)
    else:
        ws = tasks.to(device)[torch.randint(len(tasks), (B,), generator=gen, device=device)]
    xs = torch.randn(B, K, D, generator=gen, device=device)
    noise = torch.randn(B, K, generator=gen, device=device) * math.sqrt(sigma2)
    ys = torch.einsum("bkd,bd->bk", xs, ws) + noise
    return dict(xs=xs, ys=ys, ws=ws, noise=noise)


def to_tokens(xs, ys):
    """(B,K,D), (B,K) -> (B, 2K, D+1): x-token [0, x], y-token [y, 0, ..., 0], alternating
    x1, y1, x2, ..."""
    B, K, D = xs.shape
    toks = xs.new_zeros(B, K, 2, D + 1)
    toks[:, :, 0, 1:] = xs
    toks[:, :, 1, 0] = ys
    return toks.view(B, 2 * K, D + 1)


def readout(out):
    """Prediction for y_k: output channel 0 at the x_k token."""
    return out[..., 0::2, 0]


def per_token_mse(pred, ys):
    """(K,) mean squared error at each context position, averaged over the batch."""
    return (pred - ys).pow(2).mean(0)


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


# -------------------------------------------------------------------------- restrictions of the LLC
# the unrestricted baseline, then the 21 component restrictions of the paper's L2H4 sweep
PAPER_RESTRICTIONS = {
    "all": "**", "token_embedding": "token_embedding.weight",
    "postn_embedding": "postn_embedding.weight",
    "embeddings": "token_embedding.weight,postn_embedding.weight",
    "unembedding.ln": "unembedding.0.*",
    "unembedding.linear": "unembedding.1.*", "unembedding": "unembedding.**",
    "embeddings+unembedding": "token_embedding.weight,postn_embedding.weight,unembedding.**",
    **{f"blocks.{b}.ln.{j}": f"blocks.{b}.layer_norms.{j}.*" for b in (0, 1) for j in (0, 1)},
    "block_lns": "blocks.*.layer_norms.**", "lns": "blocks.*.layer_norms.**,unembedding.0.*",
    **{f"{n}.mlp": f"{p}.compute.**"
       for n, p in (("blocks.0", "blocks.0"), ("blocks.1", "blocks.1"), ("blocks", "blocks.*"))},
    **{f"{n}.attention": f"{p}.attention.**"
       for n, p in (("blocks.0", "blocks.0"), ("blocks.1", "blocks.1"), ("blocks", "blocks.*"))},
    "blocks.0": "blocks.0.**", "blocks.1": "blocks.1.**",
}


def restriction_set(cfg, name, model):
    """{restriction: estimate_llc settings} of a named set: 'heads' (L<i>H<h>: one attention head's
    weights, element masks from model.head_masks), 'layers' (L<i>: one block), 'paper' (the task's
    component restrictions). Entries that match no parameter (a smaller or edited model) are left
    out and named in one warning; none matching: ConfigError."""
    shapes = {k: p.shape for k, p in model.named_parameters()}
    names = list(shapes)
    if name == "heads":  # model.head_masks must describe the (possibly edited) model's attention
        try:
            out = {f"L{i}H{h}": {"masks": model.head_masks(i, h)} for i in range(model.cfg.n_layer)
                   for h in range(model.cfg.n_head)}
            bad = [k for r in out.values() for k, m in r["masks"].items() if not (
                torch.is_tensor(m) and m.dtype == torch.bool and m.shape == shapes.get(k)
                and bool(m.any()))]
        except Exception as e:  # noqa: BLE001  an edited model: say what to update, no traceback
            bad = [f"{type(e).__name__}: {e}"]
        if bad:
            raise common.ConfigError(f"restrictions=heads: model.head_masks(layer, head) does not "
                                     f"fit this model's parameters ({bad[0]}); update it in "
                                     f"model.py after editing the attention")
        return out
    if name == "layers" or name == "paper" and kind(cfg).paper_restrictions:
        patterns = ({f"L{i}": f"blocks.{i}.**" for i in range(model.cfg.n_layer)}
                    if name == "layers" else kind(cfg).paper_restrictions)
        out, unmapped = {}, []
        for r, pattern in patterns.items():
            # a smaller model lacks some components, a fork may have renamed them: said, then
            # left out
            try:
                common.select_params(names, pattern)
                out[r] = {"include": pattern}
            except ValueError:
                unmapped.append(f"{r} ({pattern})")
        if not out:
            raise common.ConfigError(f"restrictions={name}: no restriction of the set matches "
                                     f"this model's parameters (renamed modules in model.py?): "
                                     f"{', '.join(names[:6])}, ...")
        if unmapped:
            warnings.warn(f"restrictions={name}: {len(unmapped)} of {len(patterns)} restrictions "
                          f"match no parameter of this model (a smaller or edited model.py) and "
                          f"are left out: {'; '.join(unmapped)}")
        return out
    raise common.ConfigError(f"restrictions must be heads, layers"
                             f"{', paper' if kind(cfg).paper_restrictions else ''} "
                             f"for this task; got {name!r}")


# ----------------------------------------------------------------------------------- the task table
@dataclass(frozen=True)
class TaskKind:
    """One task: everything train.py, llc.py and analyze.py need to know about it. The functions
    named by a string are 'module:function' (imported when first used) or, bare, a function of
    analyze.py (evaluator) or analysis/plots.py (figures)."""
    defaults: dict           # its own config keys and their defaults
                             # (train.py adds them to its own)
    model_config: type       # the model's config dataclass (its build() makes the model)
    task: type               # the data: from_config(cfg) -> sample, model_input, loss, ...
    prepare: Callable | None  # run config -> None: one-off data preparation before training
    paper_restrictions: dict  # the paper's component restrictions (--restrictions=paper) or {}
    evaluator: str           # analyze.py's per-checkpoint evaluator (never loaded by train, llc)
    figures: str             # the figure set
    stage_prefix: str        # stage names: LR1, LR2, ... / LM1, ...
    published_llc: str = ""  # llc.py --published: the paper's restatement of an estimate, if any


TASKS = {  # a TaskKind, or the 'module:attribute' of one (imported by kind() on first use)
    "regression": TaskKind(DEFAULTS, ICLConfig, Task, None, PAPER_RESTRICTIONS,
                           "regression_evaluator", "regression_figures", "LR"),
    "lm": "lm.data:KIND",  # the language model: lm/ is never imported for a regression run
}


def resolve(name):
    """The object a task-table string 'module:attribute' names, importing the module."""
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def kind(cfg) -> TaskKind:
    """The table row of a run config (a dict, or a run directory)."""
    cfg = cfg if isinstance(cfg, dict) else common.load_run(cfg)
    name = cfg.get("task", "regression")
    if not isinstance(name, str) or name not in TASKS:
        raise common.ConfigError(f"task must be one of {', '.join(TASKS)}; got {name!r}")
    row = TASKS[name]
    return resolve(row) if isinstance(row, str) else row


def model_config(cfg):
    mc = kind(cfg).model_config
    return mc(**{k: cfg[k] for k in mc.__dataclass_fields__ if k in cfg})


def build_model(cfg, seed):
    """The run config's model with the seeded initial weights of the reference code."""
    return model_config(cfg).build(seed)


def task_for(cfg):
    """The data distribution of a run (a config dict or a run directory)."""
    cfg = cfg if isinstance(cfg, dict) else common.load_run(cfg)
    return kind(cfg).task.from_config(cfg)


def load_model(out_dir, step: int):
    """The run's model with the parameters of checkpoint `step`, on CPU, in eval mode."""
    model = model_config(common.load_run(out_dir)).build()
    params = common.load_params(out_dir, step)
    missing = set(dict(model.named_parameters())) ^ set(params)
    if missing:
        raise common.CheckpointError(f"{common.ckpt_path(out_dir, step)} does not match the "
                                     f"run's model: {sorted(missing)}")
    model.load_state_dict(params, strict=False)  # strict=False only because buffers are not saved
    return model.eval()


class RunLoss:
    """A task's loss as loss_fn(params, (inputs, targets)) for the LLC estimator, with the task's
    hand-derived batched gradient when it has one (the estimator uses it only after checking it
    against autograd)."""

    def __init__(self, model, task, per_token=False):
        self.model, self.task, self.per_token = model, task, per_token
        self.batched_grad = None
        if getattr(task, "batched_grad", None) is not None:
            self.batched_grad = lambda p, batch: task.batched_grad(model.cfg, p, *batch,
                                                                   per_token=per_token)

    def __call__(self, params, batch):
        out = functional_call(self.model, params, (self.task.model_input(*batch),))
        return (self.task.loss_per_token if self.per_token else self.task.loss)(out, batch[1])
