#!/usr/bin/env bash
# Time to quality: wall time each framework needs to raise the held-out gold score by +0.30 over
# the base policy (at a KL to it of at most 8 nats), TRL 1.12's PPO against ours.
#
# Every run trains SmolLM2-135M against VADER on the shipped sentiment prompts with the same
# rollout batch (16), response length (48 tokens, stop at eos), temperature (0.7), epochs (4)
# and one optimizer step per epoch (one minibatch of 16: both frameworks step 4 times per
# iteration), and saves its policy every SAVE_EVERY iterations together
# with the training wall time so far (model loading and saving excluded). Every saved policy,
# and the base, is then evaluated by the same rlhf-eval on the same NUM_EVAL_PROMPTS held-out
# prompts with the same sampling seed; ttq_table.py reads the first snapshot that reaches the
# target and draws gold vs wall time.
#
#   bash experiments/benchmarks/run_time_to_quality.sh OUT [ITERATIONS] [SAVE_EVERY]
#
# RUNS (default "trl ours_ppo ours_rloo ours_lora"), LR (3e-5; LoRA: LORA_LR 1e-4), SEED (0),
# NUM_EVAL_PROMPTS (300). Needs /tmp/trl-venv (setup_trl_venv.sh). Finished runs and evaluations
# are skipped. One job at a time, nothing else on the machine: the numbers are wall times.
set -euo pipefail
OUT=${1:?usage: run_time_to_quality.sh OUT [ITERATIONS] [SAVE_EVERY]}
ITERATIONS=${2:-16}
SAVE_EVERY=${3:-4}
TRL_PYTHON=${TRL_PYTHON:-/tmp/trl-venv/bin/python}
LR=${LR:-3e-5}
LORA_LR=${LORA_LR:-1e-4}
NUM_EVAL_PROMPTS=${NUM_EVAL_PROMPTS:-300}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
MODEL_DIR=$(python -c 'from rlhf_lightning.models import resolve_model_source as r; print(r("builtin:smollm2")[0])')
PRECISION=$(python -c 'from rlhf_lightning.hardware import resolve_precision as r; print(r("auto", "cpu"))')

W="--batch 16 --minibatch 16 --micro 8 --epochs 4 --new-tokens 48 --stop-token eos
   --temperature 0.7 --precision $PRECISION --device cpu --threads 2 --warmup 0
   --iterations $ITERATIONS --save-every $SAVE_EVERY --reward vader --seed ${SEED:-0}"

run() {  # name, command...
  local name=$1; shift
  if [ -f "$OUT/$name.json" ]; then echo "skip $name (done)"; return; fi
  echo "== $name: $(date -u +%H:%M:%S)"
  /usr/bin/time -v "$@" --save-dir "$OUT/$name" --json "$OUT/$name.json" \
    >"$OUT/$name.log" 2>&1 || { echo "$name failed, see $OUT/$name.log"; exit 1; }
  tail -1 "$OUT/$name.log"
}

OURS="python $HERE/bench_ppo.py --policy builtin:smollm2 $W"
RUNS=${RUNS:-trl ours_ppo ours_rloo ours_lora}
for name in $RUNS; do
  case $name in
    trl) run trl "$TRL_PYTHON" "$HERE/bench_trl.py" --model-dir "$MODEL_DIR" $W --lr "$LR" ;;
    ours_ppo) run $name $OURS --algorithm ppo --policy-lr "$LR" ;;
    ours_rloo) run $name $OURS --algorithm rloo --policy-lr "$LR" ;;
    ours_grpo) run $name $OURS --algorithm grpo --policy-lr "$LR" ;;
    ours_lora) run $name $OURS --algorithm ppo --lora 16 --policy-lr "$LORA_LR" ;;
    *) echo "unknown run $name"; exit 2 ;;
  esac
done

evaluate() {  # policy dir, output json
  [ -f "$2" ] && return
  echo "== eval $1: $(date -u +%H:%M:%S)"
  rlhf-eval "$1" --reference "$MODEL_DIR" --reward vader \
    --prompts "$REPO/experiments/sentiment/data/prompts_eval.jsonl" --num-prompts "$NUM_EVAL_PROMPTS" \
    --max-new-tokens 48 --stop-token eos --temperature 0.7 --batch-size 50 --seed 0 \
    --dtype float32 --device cpu --output "$2" >"$2.log" 2>&1 || { echo "eval failed: $2.log"; exit 1; }
}
evaluate "$MODEL_DIR" "$OUT/base_eval.json"
for name in $RUNS; do
  for d in "$OUT/$name"/iter_*; do evaluate "$d" "$d/eval.json"; done
done
python "$HERE/ttq_table.py" "$OUT" --runs "$RUNS"
