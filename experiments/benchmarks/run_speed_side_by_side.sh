#!/usr/bin/env bash
# Time per iteration and peak memory: rlhf_lightning vs TRL 1.12 in one script run, interleaved.
#
# The reward-model workload: SmolLM2-135M policy, the same SmolLM2 reward model (a 1-logit head, since
# TRL feeds it the policy's token ids), batch 8, minibatch 4, micro-batch 4, 4 epochs, 48-token
# responses that never stop early; each framework with its own value model (TRL: a separate
# SmolLM2; ours: the default value head on the policy trunk). Each round runs every variant once,
# back to back, so that the paired ratios compare runs that saw the same machine state; the
# table reports medians over the rounds (speed drifts by up to 30% between processes here).
#
#   bash experiments/benchmarks/run_speed_side_by_side.sh OUT [ROUNDS]
#
# Environment: VARIANTS (default "trl ours ours_copy"):
#   trl               TRL 1.12, four models
#   ours              rlhf_lightning defaults (shared trunk)
#   ours_copy         + rollouts from a bf16 copy of the policy (--sampling-dtype bfloat16)
#   ours_compile      + torch.compile of the training forward (2 untimed warm-up iterations)
#   ours_copy_compile + both
#   ours_4models      + a separate critic from the reward model (TRL's four models)
# PRECISION (32-true; or bf16-mixed), ITERATIONS (3 timed per run), TIMING_RM
# (/tmp/smollm2-timing-rm, from make_timing_rm.py), TRL_PYTHON (/tmp/trl-venv/bin/python, from
# setup_trl_venv.sh). Finished runs are skipped, so the script resumes where it stopped.
# Nothing else may run on the machine meanwhile. Ends with speed_table.py's table.
set -euo pipefail
OUT=${1:?usage: run_speed_side_by_side.sh OUT [ROUNDS]}
ROUNDS=${2:-3}
VARIANTS=${VARIANTS:-trl ours ours_copy}
PRECISION=${PRECISION:-32-true}
ITERATIONS=${ITERATIONS:-3}
TIMING_RM=${TIMING_RM:-/tmp/smollm2-timing-rm}
TRL_PYTHON=${TRL_PYTHON:-/tmp/trl-venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
MODEL_DIR=$(python -c 'from rlhf_lightning.models import resolve_model_source as r; print(r("builtin:smollm2")[0])')

W="--batch 8 --minibatch 4 --micro 4 --epochs 4 --new-tokens 48 --stop-token none
   --precision $PRECISION --device cpu --threads 2 --iterations $ITERATIONS"
OURS="python $HERE/bench_ppo.py --policy builtin:smollm2 $W --reward learned path=$TIMING_RM"
COPY="--sampling-dtype bfloat16"
COMPILE="--compile --warmup 2"  # iterations 1-2 compile (no-grad and training graphs, then dynamic shapes)

run() {  # result name, command...
  local name=$1; shift
  if [ -f "$OUT/$name.json" ]; then echo "skip $name (done)"; return; fi
  echo "== $name: $(date -u +%H:%M:%S)"
  /usr/bin/time -v "$@" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1 \
    || { echo "$name failed, see $OUT/$name.log"; exit 1; }
}

for round in $(seq 1 "$ROUNDS"); do
  for variant in $VARIANTS; do
    name=${variant}_r$round
    case $variant in
      trl) run "$name" "$TRL_PYTHON" "$HERE/bench_trl.py" --model-dir "$MODEL_DIR" $W --warmup 1 --reward rm ;;
      ours) run "$name" $OURS --warmup 1 ;;
      ours_copy) run "$name" $OURS $COPY --warmup 1 ;;
      ours_compile) run "$name" $OURS $COMPILE ;;
      ours_copy_compile) run "$name" $OURS $COPY $COMPILE ;;
      ours_4models) run "$name" $OURS --critic "$TIMING_RM" --warmup 1 ;;
      *) echo "unknown variant $variant"; exit 2 ;;
    esac
  done
done
python "$HERE/speed_table.py" "$OUT"
