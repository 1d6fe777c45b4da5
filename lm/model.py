"""The paper's attention-only language model (L2W256, `LMTransformer`), initialised as
TransformerLens' "gpt2" init: `cfg.build(seed)` seeds, then builds it. Attention is a
plain masked softmax so that torch.func.vmap covers every op."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class LMConfig:
    """The paper's L2W256 (language.md §1): attention-only, 2 layers of 8 heads x 32, vocabulary
    5,000."""
    vocab_size: int = 5000
    n_ctx: int = 1024
    n_layer: int = 2
    n_head: int = 8
    d_model: int = 256
    init_std: float = -1.0  # < 0: TransformerLens' "gpt2" init, 0.8 / sqrt(d_model) (0.05 at 256)

    def build(self, seed=None):
        """The model; with a seed, torch seeded first."""
        if seed is not None:
            torch.manual_seed(seed)
        return LMTransformer(self)


class LMAttention(nn.Module):
    """Causal multi-head attention with biases; shortformer positions enter the query and key inputs
    only. Head h owns rows h*d_head:(h+1)*d_head of q, k and v (and the same columns of o)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))
        mask = torch.full((cfg.n_ctx, cfg.n_ctx), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, pos=None):
        B, T, d = x.shape
        H = self.n_head
        qk_in = x if pos is None else x + pos  # V never sees the positions
        heads = (self.q(qk_in), self.k(qk_in), self.v(x))
        q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in heads)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + self.mask[:T, :T]
        att = scores.softmax(dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, d)), att


class LMBlock(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.attn = LMAttention(cfg)

    def forward(self, x, pos=None):
        a, att = self.attn(self.ln(x), pos)
        return x + a, att


class LMTransformer(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, vocab): pre-LN, attention only, untied embeddings;
    shortformer positions (pos_embed added to the query and key inputs only, never the residual
    stream). positions=False drops them (the position-ablated loss); return_attention=True also
    returns each layer's (B, H, T, T) pattern."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.blocks = nn.ModuleList([LMBlock(cfg) for _ in range(cfg.n_layer)])
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size)
        std = cfg.init_std if cfg.init_std > 0 else 0.8 / math.sqrt(cfg.d_model)
        nn.init.normal_(self.pos_embed, std=std)
        for m in self.modules():  # every weight matrix N(0, std^2), biases 0; LayerNorms: (1, 0)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def head_masks(self, layer, head):
        """{parameter name: bool mask} of one attention head: its rows of q, k, v (weights and
        biases) and its columns of o (o's bias is shared by the heads)."""
        a, dh = self.blocks[layer].attn, self.cfg.d_model // self.cfg.n_head
        rows = slice(dh * head, dh * (head + 1))
        masks = {}
        for x in "qkvo":
            for w in ("weight", "bias"):
                if (x, w) == ("o", "bias"):
                    continue
                m = torch.zeros_like(getattr(a, x).get_parameter(w), dtype=torch.bool)
                (m[:, rows] if x == "o" else m[rows]).fill_(True)
                masks[f"blocks.{layer}.attn.{x}.{w}"] = m
        return masks

    def forward(self, tokens, positions=True, return_attention=False):
        x, patterns = self.residual(tokens, positions, keep_patterns=return_attention)
        logits = self.unembed(self.ln_final(x))
        return (logits, patterns) if return_attention else logits

    def residual(self, tokens, positions=True, keep_patterns=True):
        """The residual stream entering the final LN, and the attention pattern of every layer (no
        unembedding: the cheap path for head scores). Patterns not kept are freed layer by layer
        (B x H x T x T each)."""
        T = tokens.shape[-1]
        x = self.embed(tokens)
        pos = self.pos_embed[:T] if positions else None
        patterns = []
        for block in self.blocks:
            x, att = block(x, pos)
            if keep_patterns:
                patterns.append(att)
        return x, patterns
