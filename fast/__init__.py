"""The optional fast paths, each checked against its plain counterpart before use and skipped, with
one warning, when the check fails: the hand-derived gradient of the regression transformer
(grad.py, vs autograd; as the chains' gradient: native.py) and the fused Triton SGLD update and
CUDA-graph step (kernels.py, vs the torch update and the eager step). Imports nothing from the
project; sgld.py runs without it."""
from fast.grad import batched_grad_mismatch, icl_loss_and_grads  # noqa: F401
from fast.native import NATIVE_GRADIENTS  # noqa: F401
from fast.kernels import cuda_graph_step, sgld_update_triton, triton, triton_update_ok  # noqa: F401
