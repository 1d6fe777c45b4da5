import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from model import ICLConfig, ICLTransformer, weight_norm


@pytest.mark.parametrize("K,count", [(8, 51_717), (16, 52_741)])
def test_parameter_count(K, count):
    assert sum(p.numel() for p in ICLTransformer(ICLConfig(K=K)).parameters()) == count


def test_init_norms_match_the_paper():
    want = [24.909348, 24.930702, 24.898283, 24.974403, 24.943701]  # regression.md §4, seeds 0-4
    got = [weight_norm(ICLConfig().build(s).parameters()) for s in range(5)]
    assert got == pytest.approx(want, abs=1e-5)


def test_positional_init_range_depends_on_K():
    for K in (8, 16):
        w = ICLConfig(K=K).build(0).postn_embedding.weight
        assert w.shape == (64, 2 * K) and w.abs().max() <= (2 * K) ** -0.5


def test_doubled_residual():
    """With every sublayer output zeroed, the stream entering the final LN is 2^L times the
    embedding."""
    cfg = ICLConfig()
    m = cfg.build(0)
    with torch.no_grad():
        for b in m.blocks:
            b.attention.out.weight.zero_()
            b.compute[2].weight.zero_()
            b.compute[2].bias.zero_()
    seen = {}
    m.unembedding[0].register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0]))
    tokens = torch.randn(3, 16, 5)
    m(tokens)
    emb = m.token_embedding(tokens) + m.postn_embedding.weight.T
    torch.testing.assert_close(seen["x"], 4.0 * emb)


def test_causal():
    m = ICLConfig().build(1)
    a = torch.randn(2, 16, 5)
    b = a.clone()
    b[:, 9:] = torch.randn(2, 7, 5)
    torch.testing.assert_close(m(a)[:, :9], m(b)[:, :9])
    assert not torch.allclose(m(a)[:, 9:], m(b)[:, 9:])


def test_attention_uses_per_head_interleaved_qkv():
    """Rows of qkv are [q_0, k_0, v_0, q_1, ...] (the reference layout), checked against a slow
    loop."""
    torch.manual_seed(0)
    cfg = ICLConfig()
    att = cfg.build(0).blocks[0].attention
    x = torch.randn(2, 16, 64)
    W = att.qkv.weight.view(4, 3, 16, 64)  # head, (q k v), d_head, d_model
    heads = []
    for h in range(4):
        q, k, v = (x @ W[h, i].T for i in range(3))
        s = q @ k.transpose(1, 2) / 4.0
        s = s.masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
        heads.append(s.softmax(-1) @ v)
    torch.testing.assert_close(att(x), torch.cat(heads, -1) @ att.out.weight.T)


def test_vmap_over_stacked_models_matches_loop():
    models = [ICLConfig().build(s) for s in range(3)]
    params, buffers = stack_module_state(models)
    base = ICLTransformer(ICLConfig()).to("meta")
    tokens = torch.randn(3, 4, 16, 5)

    def f(p, b, t):
        return functional_call(base, (p, b), (t,))

    out = vmap(f)(params, buffers, tokens)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(tokens[i]), atol=1e-5, rtol=1e-5)
