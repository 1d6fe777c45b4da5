#!/bin/bash
# The whole job of results/L2H4-s0-500k on a 2-core machine, resumable from whatever is there:
# training on core 0 (train.py resumes bit for bit), the five step-0 models, and on core 1 the
# preset study as its checkpoints appear, then (once the study is final) step 0 of the five seeds,
# the coverage runs and the sweep. Every part appends rows as they are done; rerun this script
# after any interruption. Logs: out/train_L2H4-s0.log, out/study.log.
#
#     bash results/L2H4-s0-500k/pipeline.sh          # from the repository root, in the background
set -u
cd "$(dirname "$0")/../.."
mkdir -p out
export OMP_NUM_THREADS=1
RUN=out/L2H4-s0
DEST=results/L2H4-s0-500k
last() { python -c "import common; print((common.list_checkpoints('$RUN') or [-1])[-1])"; }

training() { pgrep -f "train.py configs/L2H4.py --out_dir=$RUN" > /dev/null; }
if [ "$(last)" -lt 499999 ] && ! training; then
  taskset -c 0 python train.py configs/L2H4.py --out_dir="$RUN" >> out/train_L2H4-s0.log 2>&1 &
fi
for s in 0 1 2 3 4; do  # step 0 of the paper's five seeds (a second each)
  [ -e "out/init-s$s/checkpoints/step_0000000.safetensors" ] || taskset -c 1 python train.py \
    configs/L2H4.py --seed=$s --stop_at=0 --out_dir="out/init-s$s" >> out/study.log 2>&1
done
study() {
  nice -n 5 taskset -c 1 python "$DEST/study.py" --run="$RUN" --inits=out/init-s --dest="$DEST" \
    --budget=100000 --ckpt_batch=1 "$@" >> out/study.log 2>&1
}
until [ -e "$DEST/choice.json" ]; do  # the study's rows, each as its checkpoint appears
  study --parts=study
  [ -e "$DEST/choice.json" ] || sleep 120
done
until [ "$(last)" -ge 499999 ] && ! training
do  # the sweep over the checkpoints there so far, a few at a time, so new ones join the order
  study --parts=study,seeds,sweep --budget=1200
  sleep 10
done
study --parts=study,seeds,sweep  # the last checkpoints
