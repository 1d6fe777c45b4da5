import math

import pytest
import torch
import torch.nn as nn

from analysis.metrics import dmmse_predict, regression_metrics, ridge_predict
from data import Task, per_token_mse, readout, sample_batch, to_tokens


def test_token_layout_and_readout_by_hand():
    xs = torch.tensor([[[1., 2., 3.], [4., 5., 6.]]])  # B=1, K=2, D=3
    ys = torch.tensor([[7., 8.]])
    want = torch.tensor([[[0, 1, 2, 3], [7, 0, 0, 0], [0, 4, 5, 6], [8, 0, 0, 0]]],
                        dtype=torch.float)
    assert torch.equal(to_tokens(xs, ys), want)
    out = torch.arange(16.).view(1, 4, 4)  # the prediction for y_k is channel 0 at the x_k token
    assert torch.equal(readout(out), torch.tensor([[0., 8.]]))


def test_sample_batch_shapes_and_noise():
    g = torch.Generator().manual_seed(0)
    b = sample_batch(g, 4096, 4, 16, 4.0, tasks=torch.zeros(1, 4))
    assert b["xs"].shape == (4096, 16, 4) and b["ys"].shape == (4096, 16)
    # w = 0: y is pure noise with variance sigma2 = 4 (std of the variance estimate ~
    # 4*sqrt(2/65536) = 0.02)
    assert b["ys"].mean().item() == pytest.approx(0, abs=0.05)
    assert b["ys"].var().item() == pytest.approx(4.0, abs=0.1)
    b = sample_batch(g, 8, 4, 3, 0.0, tasks=torch.arange(1., 5.).view(1, 4))
    torch.testing.assert_close(b["ys"], b["xs"] @ torch.arange(1., 5.))


def test_finite_prior_draws_from_its_tasks():
    t = Task(num_tasks=16, task_seed=3)
    b = t.eval_batch(0, 512)
    dist = (b["ws"][:, None] - t.tasks[None]).abs().sum(-1)
    assert (dist.min(1).values == 0).all()
    assert len(torch.unique(dist.argmin(1))) > 10
    assert torch.equal(Task(num_tasks=16, task_seed=3).tasks, t.tasks)


def test_same_seed_same_data():
    t = Task()
    a, b = t.eval_batch(5, 64), t.eval_batch(5, 64)
    assert torch.equal(a["xs"], b["xs"]) and torch.equal(a["ys"], b["ys"])
    assert not torch.equal(a["xs"], t.eval_batch(6, 64)["xs"])


def test_reference_losses_monte_carlo():
    """regression.md §7: zero predictor D + sigma2 = 4.125; ridge mean over K=8 = 1.6615 (both +-
    0.01). With these sample sizes the Monte Carlo standard errors are ~0.003 and ~0.002."""
    t = Task()
    b = t.eval_batch(0, 1_000_000)
    assert b["ys"].pow(2).mean().item() == pytest.approx(4.125, abs=0.01)
    b = t.eval_batch(1, 200_000)
    tok = per_token_mse(ridge_predict(b["xs"], b["ys"], 0.125), b["ys"])
    assert tok.mean().item() == pytest.approx(1.6615, abs=0.01)
    want = torch.tensor([4.108, 3.201, 2.300, 1.488, 0.895, 0.570, 0.409, 0.321])
    torch.testing.assert_close(tok, want, atol=0.04, rtol=0)


def _ridge_loop(xs, ys, s2):
    B, K, D = xs.shape
    out = torch.zeros(B, K, dtype=xs.dtype)
    for b in range(B):
        for k in range(K):
            X, y = xs[b, :k], ys[b, :k]
            w = torch.linalg.inv(X.T @ X + s2 * torch.eye(D, dtype=xs.dtype)) @ (X.T @ y)
            out[b, k] = xs[b, k] @ w
    return out


def _dmmse_loop(xs, ys, tasks, s2):
    B, K, D = xs.shape
    out = torch.zeros(B, K, dtype=xs.dtype)
    for b in range(B):
        for k in range(K):
            logp = torch.stack([-sum((ys[b, j] - w @ xs[b, j]) ** 2 for j in range(k)) / (2 * s2)
                                if k else torch.tensor(0., dtype=xs.dtype) for w in tasks])
            out[b, k] = xs[b, k] @ (torch.softmax(logp, 0) @ tasks)
    return out


def test_vectorised_baselines_equal_loops():
    b = sample_batch(torch.Generator().manual_seed(0), 6, 3, 5, 0.25)
    xs, ys = b["xs"].double(), b["ys"].double()
    torch.testing.assert_close(ridge_predict(xs, ys, 0.25), _ridge_loop(xs, ys, 0.25))
    tasks = torch.randn(7, 3, dtype=torch.double)
    torch.testing.assert_close(dmmse_predict(xs, ys, tasks, 0.25), _dmmse_loop(xs, ys, tasks, 0.25))
    # chunking over the batch changes nothing
    torch.testing.assert_close(dmmse_predict(xs, ys, tasks, 0.25, chunk_elems=1),
                               _dmmse_loop(xs, ys, tasks, 0.25))


def test_baseline_edge_cases():
    t = Task(num_tasks=5, task_seed=1)
    b = t.eval_batch(0, 32)
    assert torch.equal(ridge_predict(b["xs"], b["ys"], 0.125)[:, 0], torch.zeros(32))
    # with no context the dMMSE estimate is the mean of the tasks
    torch.testing.assert_close(dmmse_predict(b["xs"], b["ys"], t.tasks, 0.125)[:, 0],
                               b["xs"][:, 0] @ t.tasks.mean(0))
    # M = 1: dMMSE always predicts with that task
    one = Task(num_tasks=1, task_seed=2)
    b = one.eval_batch(0, 16)
    torch.testing.assert_close(dmmse_predict(b["xs"], b["ys"], one.tasks, 0.125),
                               b["xs"] @ one.tasks[0])


class RidgeModel(nn.Module):
    """A 'transformer' whose channel-0 output at each x-token is the ridge prediction: checks the
    metric plumbing."""

    def __init__(self, s2):
        super().__init__()
        self.s2, self.p = s2, nn.Parameter(torch.ones(3))

    def forward(self, tokens):
        xs, ys = tokens[:, 0::2, 1:], tokens[:, 1::2, 0]
        out = torch.zeros_like(tokens)
        out[:, 0::2, 0] = ridge_predict(xs, ys, self.s2)
        return out


def test_regression_metrics_on_a_ridge_model():
    t = Task()
    b = t.eval_batch(0, 4096)
    m = regression_metrics(RidgeModel(0.125), b, 0.125)
    assert m["delta_ridge"] == 0 and m["delta_dmmse"] == 0
    assert m["loss"] == pytest.approx(1.66, abs=0.05)
    assert m["icl_1_4"] == pytest.approx(m["loss/4"] - m["loss/1"])
    assert m["icl_4_8"] < 0 and m["icl_1_4"] < -2
    assert m["weight_norm"] == pytest.approx(math.sqrt(3))
    # mean of the spec's E[yhat_k^2] for ridge
    assert m["pred_norm"] == pytest.approx(2.57, abs=0.1)
    # scaled tasks are out of distribution for ridge's prior too: the loss grows with g
    assert m["loss"] < m["ood_tasks/3"] < m["ood_tasks/10"] < m["ood_tasks/100"]
    assert m["ood_inputs/3"] < m["ood_tasks/3"]  # scaled inputs are more informative about w
