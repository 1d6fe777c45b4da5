"""Refined LLCs: element masks (a known answer, frozen elements never move), named restriction sets
on both models, data-refined rows, and the devinterp-style call (an nn.Module, a loss, a DataLoader,
nbeta="default")."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import data
import llc
import sgld
from lm.model import LMConfig
from model import ICLConfig

CLI = ["--num_chains=2", "--num_draws=6", "--num_burnin=2", "--batch_size=8", "--n=32",
       "--trace_points=4"]


def linear_network(rank_deficient, n=1000, d_in=4, h=3, d_out=5, seed=0):
    """y = A B x + noise with A frozen, B's first two rows sampled (the mask), the other row frozen:
    the loss is quadratic in the free weights. Returns the model fitted exactly over them, its data
    and the mask."""
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(d_out, h, generator=g), torch.randn(h, d_in, generator=g)
    if rank_deficient:
        A[:, 1] = 2 * A[:, 0]  # rank(A[:, S]) = 1 for S = rows {0, 1} of B
    x = torch.randn(n, d_in, generator=g)
    y = x @ B.T @ A.T + 0.3 * torch.randn(n, d_out, generator=g)
    S = torch.tensor([True, True, False])
    # least squares over the free rows: T = y - x B_~S^T A_~S^T = x B_S^T A_S^T, i.e. vec(T) = (A_S
    # kron x) vec(B_S^T)
    T = (y - x @ B[~S].T @ A[:, ~S].T).double()
    design = torch.kron(A[:, S].double(), x.double())
    sol = torch.linalg.lstsq(design, T.T.reshape(-1, 1), driver="gelsd").solution
    model = torch.nn.Sequential(torch.nn.Linear(d_in, h, bias=False),
                                torch.nn.Linear(h, d_out, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(A)
        model[0].weight.copy_(B)
        model[0].weight[S] = sol.float().view(int(S.sum()), d_in)
    mask = torch.zeros(h, d_in, dtype=torch.bool)
    mask[S] = True
    return model, (x, y), mask, int(torch.linalg.matrix_rank(A[:, S])) * d_in


def exact_stationary_llc(model, batch, mask, eps, gamma, nbeta):
    """E[nbeta (L - L(w*))] under the discrete SGLD chain's exact (Gaussian) stationary law on a
    quadratic loss: per Hessian eigenvalue l, k = nbeta l + gamma and variance 1 / (k (1 - eps k /
    4))."""
    w0 = model[0].weight.detach()
    free = w0[mask].double()

    def loss(v):
        W = w0.double().clone()
        W[mask] = v
        return F.mse_loss(batch[0].double() @ W.T @ model[1].weight.double().T, batch[1].double())
    lam = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, free)).clamp(min=0)
    k = nbeta * lam + gamma
    return float((0.5 * nbeta * lam / (k * (1 - eps * k / 4))).sum())


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_masked_llc_of_a_linear_network_is_rank_times_input_dim_over_two(rank_deficient):
    """Freeze A at w* and sample a row-slice S of B: the model is linear in the free weights, so
    lambda = rank(A[:, S]) * d_in / 2; the estimate must match the chain's exact stationary mean
    within 4 standard errors, and the true value within that plus the (computed) discretisation and
    localisation bias."""
    model, (x, y), mask, twice_lam = linear_network(rank_deficient)
    eps, gamma, nbeta = 1e-4, 1.0, 1000 / math.log(1000)
    r = llc.estimate_llc(model, None, (x, y), loss=lambda out, b: F.mse_loss(out, b[1]),
                         masks={"0.weight": mask}, epsilon=eps, gamma=gamma, nbeta=nbeta,
                         num_chains=4, num_draws=3000, num_burnin=1000, seed=1)
    true, expected = twice_lam / 2, exact_stationary_llc(model, (x, y), mask, eps, gamma, nbeta)
    print(f"\nlinear network, rank-deficient={rank_deficient}: "
          f"llc {r['llc_mean']:.3f} +- {r['llc_se']:.3f}, "
          f"true {true}, expected with SGLD bias {expected:.3f}")
    assert r["num_params"] == int(mask.sum())
    assert abs(r["llc_mean"] - expected) < 4 * r["llc_se"]
    assert abs(r["llc_mean"] - true) < 4 * r["llc_se"] + abs(expected - true)


@pytest.mark.parametrize("mode", ["native", "loop", "vmap"])
def test_masked_elements_never_move(mode):
    """Frozen elements never move: recorded bit-exactly at every step in the native mode (the
    autograd modes build the masked tensors from w* alone by construction); every mode samples only
    the free elements."""
    w0 = {"a": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
          "b": torch.ones(2)}
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 1:3] = True
    w0["a"][mask] = 0.0  # the free elements at the minimum of their quadratic: a positive LLC
    seen = []

    def loss_fn(p, batch):
        return 0.5 * (p["a"] ** 2).sum() + (p["b"] ** 2).sum()

    def batched_grad(p, batch):  # the native path: plain tensors, recorded
        seen.append(p["a"].clone())
        losses = 0.5 * (p["a"] ** 2).sum((1, 2)) + (p["b"] ** 2).sum(1)
        return losses, {"a": p["a"], "b": 2 * p["b"]}
    if mode == "native":
        loss_fn.batched_grad = batched_grad
    r = llc.estimate_llc(loss_fn, w0, (torch.zeros(1, 1),), masks={"a": mask}, epsilon=1e-2,
                         gamma=1.0, nbeta=10.0, num_chains=3, num_draws=20, chain_mode=mode)
    assert r["num_params"] == 2 and r["chain_mode"] == mode
    if mode == "native":
        assert len(seen) == 20 + 1  # every step, plus the check against autograd
        for a in seen[1:]:
            # b is not sampled: never moves either
            assert torch.equal(a[:, ~mask], w0["a"][~mask].expand(3, -1))
        assert not torch.equal(seen[-1][:, mask], w0["a"][mask].expand(3, -1))
    assert r["llc_mean"] > 0


def test_masks_are_checked():
    w0 = {"a": torch.zeros(2, 2)}
    for masks, msg in (({"a": torch.ones(3, dtype=torch.bool)}, "mask 'a'"),
                       ({"z": torch.ones(1, dtype=torch.bool)}, "mask 'z'"),
                       ({"a": torch.zeros(2, 2, dtype=torch.bool)}, "mask 'a'")):
        with pytest.raises(ValueError, match=msg):
            llc.estimate_llc(lambda p, b: (p["a"] ** 2).sum(), w0, (torch.zeros(1, 1),),
                             masks=masks, epsilon=1e-3, gamma=1.0, nbeta=10.0, num_chains=1,
                             num_draws=2)


def test_head_masks_cover_each_head_once():
    for cfg in (ICLConfig(d_model=16, d_mlp=8, n_head=4),
                LMConfig(vocab_size=20, n_ctx=8, n_layer=2, n_head=2, d_model=8)):
        model = cfg.build(0)
        for layer in range(cfg.n_layer):
            heads = [model.head_masks(layer, h) for h in range(cfg.n_head)]
            for name in heads[0]:
                total = sum(m[name].int() for m in heads)
                assert total.max() == 1  # no element in two heads
                if not name.endswith("o.bias"):
                    assert total.min() == 1  # every element of the head weights in one head


@pytest.fixture
def two_layer_run(tmp_path):
    cfg = dict(task="regression", D=4, K=4, sigma2=0.125, num_tasks=0, task_seed=0, n_layer=2,
               n_head=2, d_model=8, d_mlp=8, seed=0)
    common.atomic_write(tmp_path / "config.json", json.dumps(cfg))
    for step in (0, 10):
        common.save_checkpoint(tmp_path, step, data.build_model(cfg, step))
    return tmp_path


def test_restriction_sets_write_a_row_per_checkpoint_and_restriction(two_layer_run, capsys):
    """--restrictions=paper: the 22 rows per checkpoint (the baseline equals a plain llc.py row at
    the same seed); heads: the element-masked heads; a resumed sweep adds only what is missing; a
    bad set is a usage error."""
    run = two_layer_run
    llc.main([str(run), *CLI, "--restrictions=paper"])
    rows = common.read_jsonl(run / "llc_paper.jsonl")
    first = [r["restriction"] for r in rows[:3]]
    assert len(rows) == 2 * 22 and first == ["all", "token_embedding", "postn_embedding"]
    assert {r["restriction_set"] for r in rows} == {"paper"}
    llc.main([str(run), *CLI, "--out=plain.jsonl"])
    timing = {"wall_time", "sample_time", "restriction", "restriction_set"}
    for plain in common.read_jsonl(run / "plain.jsonl"):
        base = next(r for r in rows if r["step"] == plain["step"] and r["restriction"] == "all")
        assert ({k: v for k, v in base.items() if k not in timing}
                == {k: v for k, v in plain.items() if k not in timing})
    # L(w*) reused: the same rows
    llc.main([str(run), *CLI, "--include=blocks.1.**", "--out=block1.jsonl"])
    for alone in common.read_jsonl(run / "block1.jsonl"):
        sweep = next(r for r in rows
                     if r["step"] == alone["step"] and r["restriction"] == "blocks.1")
        assert ({k: v for k, v in sweep.items() if k not in timing | {"include"}}
                == {k: v for k, v in alone.items() if k not in timing | {"include"}})
    llc.main([str(run), *CLI, "--restrictions=heads", "--steps=10"])
    heads = common.read_jsonl(run / "llc_heads.jsonl")
    assert [r["restriction"] for r in heads] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    # q, k, v rows and o columns of a head
    assert {r["num_params"] for r in heads} == {3 * 4 * 8 + 8 * 4}
    # resumed: step 0's four heads only
    llc.main([str(run), *CLI, "--restrictions=heads"])
    resumed = [(r["step"], r["restriction"]) for r in common.read_jsonl(run / "llc_heads.jsonl")]
    assert resumed[4:] == [(0, "L0H0"), (0, "L0H1"), (0, "L1H0"), (0, "L1H1")]
    capsys.readouterr()
    for bad in (["--restrictions=neurons"], ["--restrictions=heads", "--include=blocks.**"]):
        with pytest.raises(SystemExit) as e:
            llc.main([str(run), *CLI, *bad])
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_a_fork_whose_head_masks_no_longer_fit_gets_a_usage_error(two_layer_run, monkeypatch,
                                                                  capsys):
    """An edited attention without an updated model.head_masks: --restrictions=heads is one line and
    exit 2, whether head_masks raises or returns masks of the wrong shape or type; nothing is
    written."""
    import model as model_py
    real = model_py.ICLTransformer.head_masks
    for broken in (lambda self, i, h: {"blocks.0.attention.qkv.weight":
                                       torch.ones(3, 3, dtype=torch.bool)},
                   lambda self, i, h: self.blocks[i].attention.heads[h],
                   lambda self, i, h: {k: m.float() for k, m in real(self, i, h).items()}):
        monkeypatch.setattr(model_py.ICLTransformer, "head_masks", broken)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            llc.main([str(two_layer_run), *CLI, "--restrictions=heads"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "head_masks" in err, err
    assert not (two_layer_run / "llc_heads.jsonl").exists()


def test_data_refined_rows(two_layer_run):
    run = two_layer_run
    llc.main([str(run), *CLI, "--data_refine=ood_inputs/10", "--steps=10"])
    llc.main([str(run), *CLI, "--data_refine=tasks/4", "--steps=10"])
    llc.main([str(run), *CLI, "--steps=10"])
    files = ("llc_data-ood_inputs-10.jsonl", "llc_data-tasks-4.jsonl", "llc.jsonl")
    (ood,), (few,), (base,) = (common.read_jsonl(run / f) for f in files)
    assert ood["data_refine"] == "ood_inputs/10" and few["data_refine"] == "tasks/4"
    assert "data_refine" not in base
    assert ood["init_loss"] > 10 * base["init_loss"]  # inputs x10: far out of distribution
    xs, ys = data.Task(K=4).refined("ood_inputs/10").sample(torch.Generator().manual_seed(0), 4096)
    assert 9.5 < xs.std() < 10.5
    with pytest.raises(common.ConfigError, match="ood_inputs"):
        data.Task().refined("bigger")


def test_devinterp_style_call_with_a_module_a_dataloader_and_default_nbeta():
    """An nn.Module, loss(output, batch), a DataLoader of dict batches and nbeta='default' (B / ln
    B): a linear regression with d = 6 weights has lambda = d / 2."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 6, generator=g)
    y = x @ torch.randn(6, generator=g) + 0.1 * torch.randn(4096, generator=g)
    model = torch.nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"input_ids": x[i], "labels": y[i]}
    loader = torch.utils.data.DataLoader(Rows(), batch_size=256, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    r = llc.estimate_llc(model, None, loader,
                         loss=lambda out, b: F.mse_loss(out[:, 0], b["labels"]), nbeta="default",
                         epsilon=1e-4, gamma=1.0, num_chains=4, num_draws=1000, num_burnin=200,
                         n=4096)
    assert r["nbeta"] == pytest.approx(256 / math.log(256))
    assert r["batch_size"] == 256 and r["n"] == 4096
    assert abs(r["llc_mean"] - 3.0) < 4 * r["llc_se"] + 0.3, r["llc_mean"]
    with pytest.raises(ValueError, match="loss="):
        llc.estimate_llc(model, None, loader, epsilon=1e-4, gamma=1.0, nbeta=1.0)
