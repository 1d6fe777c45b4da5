"""The task table (`TASKS`: per task its config defaults, model, data, evaluator, figures and stage
names; the scripts look a run's task up there and nowhere else) and the in-context linear regression
task: sampling and its loss (its metrics: analysis/metrics.py). Every random draw takes an
explicit torch.Generator. The language model (package lm/) is named in the table by its module path
and imported only when a config has task = "lm"."""
import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

import common
from fast import icl_loss_and_grads
from analysis.metrics import OOD_SCALES, regression_baselines, regression_metrics
from model import ICLConfig, per_token_mse, readout, to_tokens

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


# ----------------------------------------------------------------------------------- the task table
@dataclass(frozen=True)
class TaskKind:
    """One task: everything train.py, llc.py and analyze.py need to know about it. The functions
    named by a string are 'module:function' (imported when first used) or, bare, a function of
    analysis/plots.py (figures)."""
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
                           "analysis.regression:evaluator", "regression_figures", "LR"),
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
    params = common.check_params(common.load_params(out_dir, step), model,
                                 common.ckpt_path(out_dir, step))
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
