#!/usr/bin/env bash
# Copies devinterp and the pure-Python packages its sampler imports (cloudpickle, tqdm) from the
# python that has them (default: the devinterp virtual environment) into peers/ at the repository
# root, which git ignores (`.ci/peers` runs this). For a machine that cannot pip install (the GPU
# machine): carry peers/ there and run `bench/bench.py --devinterp_path=peers` (.ci/gpu does);
# bench's devinterp worker then runs on that machine's python and torch, importing only devinterp
# and model.py besides.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${DEVINTERP_PYTHON:-/work/venvs/devinterp/bin/python}"
rm -rf peers && mkdir peers
for m in devinterp cloudpickle tqdm; do
    pkg="$("$py" -c "import $m, os; print(os.path.dirname($m.__file__))")"
    # the metadata too: bench reports devinterp's version
    cp -r "$pkg" "$(dirname "$pkg")/$m"-*.dist-info peers/
done
find peers -name __pycache__ -prune -exec rm -rf {} +
"$py" -c "import importlib.metadata as md; print('peers/: devinterp', md.version('devinterp'))"
