"""The paper's in-context regression transformer (L2H4, `ICLTransformer`) and its token layout
(to_tokens, readout); the language model (L2W256) is lm/model.py's. Module creation order
follows the reference code, so `cfg.build(seed)` gives its initial weights; attention is a plain
masked softmax so that torch.func.vmap covers every op."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ICLConfig:
    D: int = 4          # input dimension; tokens have D+1 channels
    K: int = 8          # (x, y) pairs per sequence; the context is 2K tokens
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_mlp: int = 64

    def build(self, seed=None):
        """The model; with a seed, torch seeded first: the reference's initial weights."""
        if seed is not None:
            torch.manual_seed(seed)
        return ICLTransformer(self)


class Attention(nn.Module):
    def __init__(self, cfg: ICLConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        T = 2 * cfg.K
        # additive causal mask, log(tril(1)) as in the reference; a buffer (not a parameter, not
        # saved)
        self.register_buffer("mask", torch.full((T, T), float("-inf")).triu(1), persistent=False)

    def forward(self, x):
        B, T, d = x.shape
        H = self.n_head
        # rows of qkv are interleaved per head: [q_h, k_h, v_h] for h = 0..H-1 (the reference
        # layout)
        q, k, v = self.qkv(x).view(B, T, H, -1).transpose(1, 2).chunk(3, dim=-1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + self.mask[:T, :T]
        y = att.softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: ICLConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.compute = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_mlp), nn.ReLU(),
                                     nn.Linear(cfg.d_mlp, cfg.d_model))
        self.layer_norms = nn.ModuleList([nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)])

    def forward(self, x):
        x = x + self.attention(self.layer_norms[0](x))
        return x + self.compute(self.layer_norms[1](x))


class ICLTransformer(nn.Module):
    """tokens (B, 2K, D+1) -> outputs (B, 2K, D+1); the prediction for y_k is channel 0 at x_k."""

    def __init__(self, cfg: ICLConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Linear(cfg.D + 1, cfg.d_model, bias=False)
        # used as a (2K, d) table
        self.postn_embedding = nn.Linear(2 * cfg.K, cfg.d_model, bias=False)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.unembedding = nn.Sequential(nn.LayerNorm(cfg.d_model),
                                         nn.Linear(cfg.d_model, cfg.D + 1))

    def head_masks(self, layer, head):
        """{parameter name: bool mask} of one attention head's weights: its interleaved [q_h, k_h,
        v_h] rows of qkv and its columns of the output projection (refined LLCs sample only these).
        """
        a, dh = self.blocks[layer].attention, self.cfg.d_model // self.cfg.n_head
        qkv = torch.zeros_like(a.qkv.weight, dtype=torch.bool)
        out = torch.zeros_like(a.out.weight, dtype=torch.bool)
        qkv[3 * dh * head:3 * dh * (head + 1)] = out[:, dh * head:dh * (head + 1)] = True
        p = f"blocks.{layer}.attention"
        return {f"{p}.qkv.weight": qkv, f"{p}.out.weight": out}

    def forward(self, tokens):
        T = tokens.shape[-2]
        x = self.token_embedding(tokens) + self.postn_embedding.weight.T[:T]
        for block in self.blocks:
            # the block already contains x: the paper's doubled residual, x <- 2x + a + m
            x = x + block(x)
        return self.unembedding(x)


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


def weight_norm(params) -> float:
    """Global L2 norm over an iterable of tensors (the paper's `weight/norm`)."""
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
