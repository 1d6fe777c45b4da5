#!/usr/bin/env bash
# The GPU checks in one command (`bash .ci/gpu` runs this), for a machine with a CUDA device and
# torch + triton installed (about 6 minutes on an H200): the LLC tests with the compiled Triton
# kernel, CUDA graphs and the native mode on the GPU, then the complete GPU measurement,
# bench/bench.py --device=cuda (peak, train.py vs plain loops, SGLD vs plain loop and devinterp,
# the latter from peers/ when carried); at most 9 min. Output: $OUT (else gpu_out/).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
unset TRITON_INTERPRET
export OMP_NUM_THREADS=1
python -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__,
triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$out/versions.txt"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_llc.py tests/test_model.py 2>&1 \
    | tail -30 | tee "$out/pytest_gpu.txt"
peers=()
# devinterp's source (.ci/peers), run on this machine's python
[ -d peers ] && peers=(--devinterp_path=peers)
timeout 400 python bench/bench.py --device=cuda ${peers[@]+"${peers[@]}"} \
    --md="$out/bench_cuda.md" --json="$out/bench_cuda.json" 2>&1 \
    | tee "$out/bench_cuda.log" | tail -40
