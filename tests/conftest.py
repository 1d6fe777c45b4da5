"""Test set-up: one torch thread (tiny models run 10x slower with two busy threads on these
machines) and, without a GPU, the Triton interpreter, which must be switched on before any kernel
module is imported (with a GPU the kernel tests run the compiled kernel on it)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)

REFERENCE = ROOT / "reference"


@pytest.fixture
def reference_dir():
    """The repository's reference/ folder (the paper's stored curves; committed, so never skipped).
    """
    return REFERENCE
