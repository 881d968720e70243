#!/usr/bin/env bash
# Over-optimisation study: train three proxy reward models of different strength, run PPO
# without a KL penalty against each (experiment=overopt), and plot gold and proxy vs sqrt(KL).
#
#   bash experiments/overopt/run.sh OUT
#
# Proxies (MiniLM reward models on the shipped sentiment pairs): 100 pairs x 10 epochs, 400
# pairs x 4 epochs, all pairs x 1 epoch (the main job's). Finished steps are skipped.
set -euo pipefail
OUT=${1:?usage: run.sh OUT}
HERE=$(cd "$(dirname "$0")" && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"

proxy() {  # name, max_train_rows (null: all), epochs
  [ -f "$OUT/$1/reward_model/reward_head.safetensors" ] && { echo "skip proxy $1"; return; }
  echo "== proxy $1: $(date -u +%H:%M:%S)"
  rlhf-train task=reward_model hydra.run.dir="$OUT/$1" data.preferences.max_train_rows="$2" \
    rm.max_epochs="$3" trainer.enable_progress_bar=false >"$OUT/$1.log" 2>&1
  grep -o "val/accuracy = [0-9.]*" "$OUT/$1.log" | tail -1 || true
}
proxy rm_100 100 10
proxy rm_400 400 4
proxy rm_all null 1

if [ ! -d "$OUT/sweep" ]; then
  echo "== sweep: $(date -u +%H:%M:%S)"
  rlhf-train -m experiment=overopt hydra.sweep.dir="$OUT/sweep" trainer.enable_progress_bar=false \
    reward.path="$OUT/rm_100/reward_model,$OUT/rm_400/reward_model,$OUT/rm_all/reward_model" \
    >"$OUT/sweep.log" 2>&1
fi
python "$HERE/plot.py" "$OUT/sweep" --out "$OUT/plots" --gold-name "gold score (VADER)"
