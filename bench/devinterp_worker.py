"""bench.py's devinterp column, run in devinterp's environment:
`python bench/devinterp_worker.py SPEC OUT ROOT` (SPEC: the torch.save'd checkpoint, data and
settings; OUT: the JSON it writes; ROOT: the folder of model.py).
It imports only torch, devinterp and the project's model.py (which imports only torch): that venv
holds nothing else of the project's dependencies.
One call per chain: devinterp's LLCEstimator raises at the first NaN loss, which ends the whole
estimate, where ours and the plain loop go on and count that chain as diverged. Each call gets its
chain's seed of the one-call run (seed=[s]): the chains of num_chains=C, seed=seed."""
import json
import re
import sys
import time
import warnings

warnings.filterwarnings("ignore")  # from here on, the imports below' included
from importlib.metadata import version  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from devinterp.optim.sgld import SGLD  # noqa: E402
from devinterp.slt.sampler import estimate_learning_coeff_with_summary  # noqa: E402

sys.path.insert(0, sys.argv[3])
from model import ICLConfig  # noqa: E402

s = torch.load(sys.argv[1], weights_only=True)
torch.set_num_threads(s["threads"])
dev = torch.device(s["device"])
model = ICLConfig(**s["model_cfg"]).build(0)
model.load_state_dict(s["state_dict"])
model.to(dev)
tokens, ys = s["tokens"].to(dev), s["ys"].to(dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None


class Rows(Dataset):  # whole minibatches at once (__getitems__): devinterp's cheapest data path
    def __len__(self):
        return len(ys)

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx, device=dev)
        return tokens[idx], ys[idx]


def chain(seed):
    """(LLC, steps run) of one chain; on a NaN loss devinterp stops: (NaN, steps to that draw)."""
    try:
        res = estimate_learning_coeff_with_summary(
            model, loader, evaluate=lambda m, b: F.mse_loss(m(b[0])[..., 0::2, 0], b[1]),
            sampling_method=SGLD,
            optimizer_kwargs=dict(lr=s["epsilon"], localization=s["gamma"], nbeta=s["nbeta"]),
            num_chains=1, num_draws=s["draws"], num_burnin_steps=s["burnin"],
            init_loss=s["init_loss"], seed=[seed], device=dev, verbose=False)
        return float(res["llc-chain/0"]), s["burnin"] + s["draws"]
    except RuntimeError as e:
        nan = re.fullmatch(r"NaN detected in loss at chain \d+, draw (\d+)", str(e))
        if nan is None:
            raise
        return float("nan"), s["burnin"] + int(nan[1]) + 1


torch.manual_seed(s["seed"])
loader = DataLoader(Rows(), batch_size=s["batch"], shuffle=True, drop_last=True,
                    collate_fn=lambda b: b)
sync()
t = time.perf_counter()
chains = [chain(seed) for seed in s["chain_seeds"]]
sync()
wall = time.perf_counter() - t
with open(sys.argv[2], "w") as f:
    json.dump(dict(wall=wall, steps=sum(n for _, n in chains), version=version("devinterp"),
                   torch=torch.__version__, per_chain=[llc for llc, _ in chains]), f)
