#!/usr/bin/env bash
# GRPO on chain_sum: rlhf_lightning (experiment=verifiable_family algorithm=grpo) and TRL's
# GRPOTrainer (experiments/benchmarks/trl_grpo.py) at the same sizes, seeds 0-2, one run at a
# time on the whole machine, gradient checkpointing on in both (TRL's default). Then every TRL
# checkpoint is scored on the held-out problems by rlhf-eval, as rlhf_lightning scores its own.
#   bash experiments/verifiable/run_side_by_side.sh [OUT=outputs/side_by_side] [TRL_VENV=/tmp/trl-venv]
set -euo pipefail
OUT=${1:-outputs/side_by_side}
TRL_PY=${2:-/tmp/trl-venv}/bin/python
SEEDS=${SEEDS:-0 1 2}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
MODEL_DIR=$(python -c 'from rlhf_lightning.models import resolve_model_source as r; print(r("builtin:smollm2")[0])')
python experiments/benchmarks/export_prompts.py reasoning_gym_chain_sum --out "$OUT/prompts"
for seed in $SEEDS; do
  /usr/bin/time -v -o "$OUT/ours_s$seed.time" rlhf-train experiment=verifiable_family \
      algorithm=grpo seed=$seed policy.gradient_checkpointing=true hydra.mode=RUN \
      hydra.run.dir="$OUT/ours_s$seed" > "$OUT/ours_s$seed.log" 2>&1
  /usr/bin/time -v -o "$OUT/trl_s$seed.time" "$TRL_PY" experiments/benchmarks/trl_grpo.py \
      --model-dir "$MODEL_DIR" --prompts "$OUT/prompts/train.jsonl" --out "$OUT/trl_s$seed" \
      --seed $seed --save-at 16 32 > "$OUT/trl_s$seed.log" 2>&1
done
for seed in $SEEDS; do
  for step in 16 32; do
    rlhf-eval "$OUT/trl_s$seed/step$step" --reference none --data reasoning_gym_chain_sum \
        --reward reasoning_gym --temperature 0.7 --stop-token $'\n' --max-new-tokens 16 \
        --seed $seed --samples "$OUT/trl_s$seed/heldout_step$step.jsonl" \
        > "$OUT/trl_s$seed/eval_step$step.log" 2>&1
  done
done
