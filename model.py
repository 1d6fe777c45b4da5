"""The paper's two models: the in-context regression transformer (L2H4, `ICLTransformer`) and the attention-only
language model (L2W256, `LMTransformer`). Module creation order follows the reference code, so `build_model(cfg,
seed)` gives its initial weights; attention is a plain masked softmax so that torch.func.vmap covers every op."""
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

    def build(self):
        return ICLTransformer(self)


class Attention(nn.Module):
    def __init__(self, cfg: ICLConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        T = 2 * cfg.K
        # additive causal mask, log(tril(1)) as in the reference; a buffer (not a parameter, not saved)
        self.register_buffer("mask", torch.full((T, T), float("-inf")).triu(1), persistent=False)

    def forward(self, x):
        B, T, d = x.shape
        H = self.n_head
        # rows of qkv are interleaved per head: [q_h, k_h, v_h] for h = 0..H-1 (the reference layout)
        q, k, v = self.qkv(x).view(B, T, H, -1).transpose(1, 2).chunk(3, dim=-1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + self.mask[:T, :T]
        y = att.softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: ICLConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.compute = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_mlp), nn.ReLU(), nn.Linear(cfg.d_mlp, cfg.d_model))
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
        self.postn_embedding = nn.Linear(2 * cfg.K, cfg.d_model, bias=False)  # used as a (2K, d) table
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.unembedding = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.D + 1))

    def head_masks(self, layer, head):
        """{parameter name: bool mask} of one attention head's weights: its interleaved [q_h, k_h, v_h] rows of qkv and
        its columns of the output projection (refined LLCs sample only these)."""
        a, dh = self.blocks[layer].attention, self.cfg.d_model // self.cfg.n_head
        qkv, out = torch.zeros_like(a.qkv.weight, dtype=torch.bool), torch.zeros_like(a.out.weight, dtype=torch.bool)
        qkv[3 * dh * head:3 * dh * (head + 1)] = out[:, dh * head:dh * (head + 1)] = True
        return {f"blocks.{layer}.attention.qkv.weight": qkv, f"blocks.{layer}.attention.out.weight": out}

    def forward(self, tokens):
        T = tokens.shape[-2]
        x = self.token_embedding(tokens) + self.postn_embedding.weight.T[:T]
        for block in self.blocks:
            x = x + block(x)  # the block already contains x: the paper's doubled residual, x <- 2x + a + m
        return self.unembedding(x)


def build_model(cfg, seed: int) -> nn.Module:
    """Seed, then build on CPU in the reference's module order: the paper's exact initial weights."""
    torch.manual_seed(seed)
    return cfg.build()


def weight_norm(params) -> float:
    """Global L2 norm over an iterable of tensors (the paper's `weight/norm`)."""
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))


# ------------------------------------------------------------------------------------ the language model
@dataclass
class LMConfig:
    """The paper's L2W256 (language.md §1): attention-only, 2 layers of 8 heads x 32, vocabulary 5,000."""
    vocab_size: int = 5000
    n_ctx: int = 1024
    n_layer: int = 2
    n_head: int = 8
    d_model: int = 256
    init_std: float = -1.0  # < 0: TransformerLens' "gpt2" init, 0.8 / sqrt(d_model) (= 0.05 at d_model 256)

    def build(self):
        return LMTransformer(self)


class LMAttention(nn.Module):
    """Causal multi-head attention with biases; shortformer positions enter the query and key inputs only.
    Head h owns rows h*d_head:(h+1)*d_head of q, k and v (and the same columns of o)."""

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
        q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in (self.q(qk_in), self.k(qk_in), self.v(x)))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + self.mask[:T, :T]).softmax(dim=-1)
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
    """tokens (B, T) int64 -> logits (B, T, vocab): pre-LN, attention only, untied embeddings; shortformer positions
    (pos_embed added to the query and key inputs only, never the residual stream). positions=False drops them (the
    position-ablated loss); return_attention=True also returns each layer's (B, H, T, T) pattern."""

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
        for m in self.modules():  # every weight matrix N(0, std^2), biases 0; LayerNorms keep (1, 0)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def head_masks(self, layer, head):
        """{parameter name: bool mask} of one attention head: its rows of q, k, v (weights and biases) and its columns
        of o (o's bias is shared by the heads)."""
        a, dh, p = self.blocks[layer].attn, self.cfg.d_model // self.cfg.n_head, f"blocks.{layer}.attn."
        masks = {}
        for name, t in ((f"{x}.{w}", getattr(a, x).get_parameter(w)) for x in "qkvo" for w in ("weight", "bias")):
            if name != "o.bias":
                m = torch.zeros_like(t, dtype=torch.bool)
                (m[:, dh * head:dh * (head + 1)] if name == "o.weight" else m[dh * head:dh * (head + 1)]).fill_(True)
                masks[p + name] = m
        return masks

    def forward(self, tokens, positions=True, return_attention=False):
        x, patterns = self.residual(tokens, positions, keep_patterns=return_attention)
        logits = self.unembed(self.ln_final(x))
        return (logits, patterns) if return_attention else logits

    def residual(self, tokens, positions=True, keep_patterns=True):
        """The residual stream entering the final LN, and the attention pattern of every layer (no unembedding:
        the cheap path for head scores). Patterns not kept are freed layer by layer (B x H x T x T each)."""
        T = tokens.shape[-1]
        x = self.embed(tokens)
        pos = self.pos_embed[:T] if positions else None
        patterns = []
        for block in self.blocks:
            x, att = block(x, pos)
            if keep_patterns:
                patterns.append(att)
        return x, patterns
