"""The baselines bench.py measures the SGLD sampler against: a straightforward one-chain-at-a-time nn.Module
loop, and the peer library devinterp 1.3.2, run by the python of its own virtual environment (as
`python bench_baselines.py <spec.pt>`, so that its torch and ours never meet in one process)."""
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import common
from data import Task, to_tokens
from model import ICLConfig, build_model

HERE = os.path.dirname(os.path.abspath(__file__))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def plain_chains(model, task, xs, ys, L0, *, epsilon, gamma, nbeta, chains, burnin, draws, batch, seed, device):
    """The straightforward sampler: one chain at a time, a deep copy of the nn.Module, autograd, a per-tensor
    SGLD update; minibatches are per-chain shuffles of the fixed set. Returns (per-chain LLC, loss trace)."""
    n = xs.shape[0]
    a, b, c = epsilon * nbeta / 2, epsilon * gamma / 2, math.sqrt(epsilon)
    trace = np.zeros((chains, draws))
    for ch in range(chains):
        m = copy.deepcopy(model).to(device)
        ps = list(m.parameters())
        w0 = [p.detach().clone() for p in ps]
        gen = torch.Generator(device=device).manual_seed(common.derive_seed(seed, 7, ch))
        perm, pos = None, n
        for t in range(burnin + draws):
            if pos + batch > n:
                perm, pos = torch.randperm(n, generator=gen, device=device), 0
            idx = perm[pos:pos + batch]
            pos += batch
            bx, by = xs[idx], ys[idx]
            loss = task.loss(m(to_tokens(bx, by)), by)
            m.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p, p0 in zip(ps, w0):
                    p.add_(-a * p.grad - b * (p - p0) + c * torch.randn(p.shape, generator=gen, device=device))
            if t >= burnin:
                trace[ch, t - burnin] = loss.item()
    return nbeta * (trace.mean(1) - L0), trace


def devinterp_worker(spec_path, out_path):
    """Run inside devinterp's virtual environment: estimate_learning_coeff_with_summary on the spec's model and
    data; the loader fetches whole batches (Dataset.__getitems__), the cheapest data path devinterp allows."""
    import warnings
    warnings.filterwarnings("ignore")
    spec = torch.load(spec_path, weights_only=False)
    torch.set_num_threads(spec["threads"])
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    from torch.utils.data import DataLoader, Dataset
    device = torch.device(spec["device"])
    model = build_model(ICLConfig(**spec["model_cfg"]), 0)
    model.load_state_dict(spec["state_dict"], strict=False)
    model.to(device)
    xs, ys = spec["xs"].to(device), spec["ys"].to(device)
    task = Task()

    class Batched(Dataset):
        def __len__(self):
            return len(ys)

        def __getitem__(self, i):
            return xs[i], ys[i]

        def __getitems__(self, idx):
            idx = torch.as_tensor(idx, device=device)
            return xs[idx], ys[idx]

    torch.manual_seed(spec["seed"])
    loader = DataLoader(Batched(), batch_size=spec["batch"], shuffle=True, drop_last=True, collate_fn=lambda b: b)

    def evaluate(m, batch):
        bx, by = batch
        return task.loss(m(to_tokens(bx, by)), by)
    sync(device)
    t, cpu = time.perf_counter(), time.process_time()
    res = estimate_learning_coeff_with_summary(
        model, loader, evaluate=evaluate, sampling_method=SGLD,
        optimizer_kwargs=dict(lr=spec["epsilon"], localization=spec["gamma"], nbeta=spec["nbeta"]),
        num_chains=spec["chains"], num_draws=spec["draws"], num_burnin_steps=spec["burnin"],
        init_loss=spec["init_loss"], seed=spec["seed"], device=device, verbose=False)
    sync(device)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    from importlib.metadata import version
    per_chain = [float(res[f"llc-chain/{i}"]) for i in range(spec["chains"])]
    out = dict(wall=wall, cpu=cpu, llc_mean=float(res["llc/mean"]), per_chain=per_chain,
               trace=np.asarray(res["loss/trace"]).tolist(), version=version("devinterp"), torch=torch.__version__)
    with open(out_path, "w") as f:
        json.dump(out, f)


def run_devinterp(cfg, device, sd, xs, ys, L0, seed, threads):
    """devinterp's estimate_learning_coeff_with_summary in its own environment: (result dict, None) or (None, why
    it was skipped)."""
    py, path = cfg["devinterp_python"], cfg["devinterp_path"]
    if path:  # devinterp's source on this python's path (machines that cannot pip install; see .ci/peers)
        py = py if py and os.path.exists(py) else sys.executable
        path = os.path.abspath(path)
    if not (py and os.path.exists(py)):
        return None, f"devinterp skipped: no python at {py!r} (set --devinterp_python or $DEVINTERP_PYTHON)"
    env = {**os.environ, **common.tune_malloc(), "OMP_NUM_THREADS": str(threads)}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    probe = subprocess.run([py, "-c", "import devinterp, torch; print(torch.__version__)"], capture_output=True,
                           text=True, env=env)
    if probe.returncode != 0:
        return None, f"devinterp skipped: {py} cannot import devinterp ({probe.stderr.strip()[-200:]})"
    with tempfile.TemporaryDirectory(prefix="bench_devinterp_") as tmp:
        spec = dict(state_dict=sd, model_cfg=dict(ICLConfig().__dict__), xs=xs.cpu(), ys=ys.cpu(), init_loss=L0,
                    epsilon=cfg["epsilon"], gamma=cfg["gamma"], nbeta=cfg["nbeta"], chains=cfg["chains"],
                    burnin=cfg["burnin"], draws=cfg["draws"], batch=cfg["batch"], seed=seed,
                    threads=threads, device=str(device))
        torch.save(spec, os.path.join(tmp, "spec.pt"))
        proc = subprocess.run([py, os.path.join(HERE, "bench_baselines.py"), os.path.join(tmp, "spec.pt")],
                              env=env, cwd=HERE, capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"devinterp failed: {proc.stderr.strip()[-800:]}"
        with open(os.path.join(tmp, "spec.pt.json")) as f:
            return json.load(f), None


if __name__ == "__main__":
    devinterp_worker(sys.argv[1], sys.argv[1] + ".json")
