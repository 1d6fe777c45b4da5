"""Forks of any shape: model.py edits the project has never seen (monkeypatched here, as a fork
edits the file) -- new parameters of several shapes (0-dim included), a changed activation, a
renamed MLP, an added layer. With no flag train.py and llc.py run plain autograd and say nothing; a
paper config's fast path checks itself, falls back with one warning and gives the same numbers;
named restriction sets and analyze.py's structure statistics name what they cannot map instead of
dropping it or raising."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import analyze
from analysis import metrics
from analysis.restrictions import restriction_set
import common
import data
import llc
import model as model_py
import train
from conftest import ROOT
from test_analyze import FAST
from test_refined import CLI
from test_train import SMALL

PAPER = data.PAPER_RESTRICTIONS

# checkpoints 0, 1, 2
RUN = [*SMALL, "--n_layer=2", "--d_model=8", "--d_mlp=8", "--stop_at=2", "--device=cpu"]
TIMING = {"wall_time", "sample_time"}


def wrap_init(monkeypatch, cls, after):
    """cls.__init__ followed by after(self, cfg): modules built after the original ones leave its
    initial weights."""
    init = cls.__init__

    def __init__(self, cfg):
        init(self, cfg)
        after(self, cfg)
    monkeypatch.setattr(cls, "__init__", __init__)


def new_parameters(monkeypatch):
    """A 0-dim gate on the attention branch, a vector scale and a matrix mixing the MLP's output."""
    def add(self, cfg):
        self.gate = nn.Parameter(torch.tensor(0.9))
        self.scale = nn.Parameter(torch.ones(cfg.d_model))
        self.mix = nn.Parameter(torch.eye(cfg.d_model) + 0.1)

    def forward(self, x):
        x = x + self.gate * self.attention(self.layer_norms[0](x))
        return x + self.compute(self.layer_norms[1](x) * self.scale) @ self.mix
    wrap_init(monkeypatch, model_py.Block, add)
    monkeypatch.setattr(model_py.Block, "forward", forward)
    return ["blocks.0.gate", "blocks.1.scale", "blocks.1.mix"]


def gelu(monkeypatch):
    def swap(self, cfg):
        self.compute[1] = nn.GELU()
    wrap_init(monkeypatch, model_py.Block, swap)
    return []


def renamed_mlp(monkeypatch):
    """compute -> mlp: the paper set's three MLP restrictions no longer map."""
    def rename(self, cfg):
        self.mlp = self.compute
        del self.compute

    def forward(self, x):
        x = x + self.attention(self.layer_norms[0](x))
        return x + self.mlp(self.layer_norms[1](x))
    wrap_init(monkeypatch, model_py.Block, rename)
    monkeypatch.setattr(model_py.Block, "forward", forward)
    return ["blocks.1.mlp.0.weight"]


def added_layer(monkeypatch):
    """An extra residual LayerNorm + Linear between the blocks and the unembedding."""
    def add(self, cfg):
        self.extra = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.d_model))

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.postn_embedding.weight.T[:tokens.shape[-2]]
        for block in self.blocks:
            x = x + block(x)
        return self.unembedding(x + self.extra(x))
    wrap_init(monkeypatch, model_py.ICLTransformer, add)
    monkeypatch.setattr(model_py.ICLTransformer, "forward", forward)
    return ["extra.0.weight", "extra.1.bias"]


FORKS = {f.__name__: f for f in (new_parameters, gelu, renamed_mlp, added_layer)}


def test_the_defaults_are_autograd_and_the_paper_configs_turn_the_fast_paths_on():
    """train.py and llc.py default to plain autograd; the paper's configs choose auto (the
    hand-derived gradient once it matched autograd, else autograd with one warning). The committed
    results/L2H4-s0-40k rows were made with auto: native_loop, and loop at step 3, where the check
    fell back; an explicit native_loop would refuse it."""
    assert train.DEFAULTS["fast_grad"] == "False" and llc.DEFAULTS["chain_mode"] == "autograd"
    for name in ("L2H4", "L2H4K16", "L2H4M64"):
        assert common.configure(train.DEFAULTS,
                                [str(ROOT / "configs" / f"{name}.py")])["fast_grad"] == "auto"
    for name in ("llc_v1", "llc_v2", "llc_cpu", "llc_quick"):
        assert common.configure(llc.DEFAULTS,
                                [str(ROOT / "configs" / f"{name}.py")])["chain_mode"] == "auto"
    modes = {r["step"]: r["chain_mode"]
             for r in common.read_jsonl(ROOT / "results/L2H4-s0-40k/llc.jsonl")}
    assert {s for s, m in modes.items() if m != "native_loop"} == {3} and modes[3] == "loop"


def trained(tmp_path, name, *extra):
    """A fork's run trained to step 2 by train.py (its config and parameters as train.py saved
    them)."""
    cfg = common.configure(train.DEFAULTS, [*RUN, f"--out_dir={tmp_path / name}", *extra],
                           train.CHOICES)
    train.train(cfg)
    return tmp_path / name, cfg


def rows(run, name, *extra):
    llc.main([str(run), *CLI, "--steps=2", "--device=cpu", f"--out={name}.jsonl", *extra])
    (row,) = common.read_jsonl(run / f"{name}.jsonl")
    return row


def untimed(row):
    return {k: v for k, v in row.items() if k not in TIMING}


@pytest.mark.parametrize("fork", FORKS)
def test_a_fork_trains_and_estimates_with_plain_autograd_and_no_warning(
        fork, tmp_path, monkeypatch):
    """No flag: train.py trains the fork and llc.py writes rows, both without a single warning; the
    rows are --chain_mode=vmap's exactly (the default's choice at this size) and the one-chain
    loop's up to rounding. A paper config's fast paths (train.py --fast_grad=auto, llc.py
    --chain_mode=auto) fail their check against autograd, say so once each, and give the very same
    weights and rows."""
    names = FORKS[fork](monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        run, cfg = trained(tmp_path, "default")
        default = rows(run, "default")
    params = common.load_params(run, 2)
    assert set(names) <= set(params) and (
        fork != "gelu" or isinstance(data.load_model(run, 2).blocks[0].compute[1], nn.GELU))
    assert (default["chain_mode"] == "vmap"
            and default["num_params"] == sum(p.numel() for p in params.values()))
    assert np.isfinite(default["llc_mean"])
    assert untimed(rows(run, "vmap", "--chain_mode=vmap")) == untimed(default)
    loop = rows(run, "loop", "--chain_mode=loop")
    np.testing.assert_allclose(loop["loss_trace"], default["loss_trace"], rtol=1e-5)
    np.testing.assert_allclose(loop["llc_per_chain"], default["llc_per_chain"], rtol=1e-3,
                               atol=1e-4)

    with pytest.warns(UserWarning, match="hand-derived gradient disagrees") as rec:
        fast_run, _ = trained(tmp_path, "fast", "--fast_grad=auto")
        auto = rows(run, "auto", "--chain_mode=auto")
    assert len([w for w in rec if "disagrees" in str(w.message)]) == 2  # train.py once, llc.py once
    assert all(torch.equal(p, common.load_params(fast_run, 2)[k]) for k, p in params.items())
    assert untimed(auto) == untimed(default)


@pytest.mark.parametrize("fork", FORKS)
def test_named_restriction_sets_and_structure_stats_of_a_fork(fork, monkeypatch):
    """The paper set keeps every restriction it can map and names, in one warning, those it cannot
    (the renamed MLP's three); structure_stats computes every statistic (none of their parameters
    were touched)."""
    FORKS[fork](monkeypatch)
    cfg = common.configure(train.DEFAULTS, RUN)
    model = data.build_model(cfg, 0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        paper = restriction_set("paper", model, PAPER)
        layers = restriction_set("layers", model, PAPER)
        stats = metrics.structure_stats({k: v.detach() for k, v in model.named_parameters()}, 2)
    lost = {"blocks.0.mlp", "blocks.1.mlp", "blocks.mlp"} if fork == "renamed_mlp" else set()
    assert set(paper) == set(data.PAPER_RESTRICTIONS) - lost and len(paper) == 22 - len(lost)
    assert list(layers) == ["L0", "L1"]
    assert {"ln_collapse/b2-mlp", "tok_spec", "unembed_w", "unembed_b"} <= set(stats)
    if lost:
        (w,) = rec
        assert "3 of 22" in str(w.message) and all(f"{r} (" in str(w.message) for r in lost)
    else:
        assert not rec


def test_a_renamed_mlp_says_which_paper_restrictions_it_dropped_in_llc_py(tmp_path, monkeypatch):
    """llc.py --restrictions=paper on the renamed MLP: one warning naming the three, then their 19
    rows."""
    renamed_mlp(monkeypatch)
    run, _ = trained(tmp_path, "run")
    with pytest.warns(UserWarning, match=r"3 of 22 restrictions .*blocks\.0\.mlp "
                                         r"\(blocks\.0\.compute\.\*\*\)"):
        llc.main([str(run), *CLI, "--num_chains=1", "--num_draws=2", "--num_burnin=0", "--steps=2",
                  "--device=cpu", "--restrictions=paper"])
    got = [r["restriction"] for r in common.read_jsonl(run / "llc_paper.jsonl")]
    assert len(got) == 19 and "blocks.0.mlp" not in got and "blocks.0.attention" in got


def test_renamed_blocks_a_usage_error_for_layers_and_structure_stats_skip_by_name(
        tmp_path, monkeypatch, capsys):
    """blocks -> layers: --restrictions=layers maps nothing (one line, exit 2, nothing written); the
    paper set keeps its embedding and unembedding restrictions; structure_stats skips the block LNs,
    naming them, and computes the rest; analyze.py runs on such a fork end to end."""
    def rename(self, cfg):
        self.layers = self.blocks
        del self.blocks

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.postn_embedding.weight.T[:tokens.shape[-2]]
        for block in self.layers:
            x = x + block(x)
        return self.unembedding(x)
    wrap_init(monkeypatch, model_py.ICLTransformer, rename)
    monkeypatch.setattr(model_py.ICLTransformer, "forward", forward)
    run, cfg = trained(tmp_path, "run")
    with pytest.raises(common.ConfigError, match="no restriction of the set matches"):
        restriction_set("layers", data.build_model(cfg, 0), PAPER)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        llc.main([str(run), *CLI, "--restrictions=layers"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (run / "llc_layers.jsonl").exists()
    with pytest.warns(UserWarning, match="restrictions=paper: 14 of 22"):
        assert "unembedding" in restriction_set("paper", data.build_model(cfg, 0), PAPER)
    params = common.load_params(run, 2)
    with pytest.warns(UserWarning, match=r"ln_collapse/b1-attn "
                                         r"\(blocks\.0\.layer_norms\.0\.weight\)"):
        stats = metrics.structure_stats(params, 2)
    assert (not any(k.startswith("ln_collapse/b") for k in stats)
            and {"ln_collapse/unembed", "unembed_w"} <= set(stats))
    with pytest.warns(UserWarning):
        summary = analyze.main([str(run), *FAST])
    assert summary and len(common.read_jsonl(run / "analysis.jsonl")) == 3
