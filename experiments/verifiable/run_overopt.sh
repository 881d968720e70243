#!/usr/bin/env bash
# Over-optimisation with an exact gold on chain_sum (README.md here, "Over-optimisation"):
# verifier-labelled pairs from the starting policy, three proxy reward models trained on 64, 160
# and all of them, GRPO without a KL term against each proxy (3 seeds), the plot.
#
#   bash experiments/verifiable/run_overopt.sh OUT [LANES]
#
# LANES (default 1) runs that many GRPO jobs side by side, one thread each when more than one.
# Finished steps are skipped, so a stopped study continues where it was (a GRPO run that did not
# finish starts again from scratch). The proxies' printed val/accuracy is on a tenth of the pairs
# split off by row, which share problems with training pairs; proxy_check.py measures them on
# held-out problems.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: run_overopt.sh OUT [LANES]}")
LANES=${2:-1}
[ "$LANES" -ge 1 ] 2>/dev/null || { echo "LANES: a whole number >= 1, not $LANES" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"

if [ ! -f "$OUT/pairs/pairs.jsonl" ]; then
  echo "== pairs: $(date -u +%H:%M:%S)"
  python "$HERE/make_pairs.py" --out "$OUT/pairs" --problems 384 --samples 8 \
    --pairs-per-problem 2 >"$OUT/pairs.log" 2>&1
fi

proxy() {  # name, max_train_rows (null: all), epochs
  [ -f "$OUT/$1/reward_model/reward_head.safetensors" ] && { echo "skip proxy $1"; return; }
  echo "== proxy $1: $(date -u +%H:%M:%S)"
  rlhf-train task=reward_model hydra.run.dir="$OUT/$1" trainer.enable_progress_bar=false \
    data.preferences.path="$OUT/pairs/pairs.jsonl" data.preferences.eval_path=null \
    data.preferences.on_bad_row=skip data.preferences.max_train_rows="$2" rm.max_epochs="$3" \
    >"$OUT/$1.log" 2>&1
  grep -o "val/accuracy = [0-9.]*" "$OUT/$1.log" | tail -1 || true
}
proxy rm_64 64 8
proxy rm_160 160 4
proxy rm_all null 2  # about 310 pairs (a tenth of the pairs is held out; empty answers skipped)

grpo() {  # proxy, seed
  local dir="$OUT/runs/$1_seed$2"
  [ -d "$dir/policy" ] && { echo "skip $1 seed $2"; return; }
  rm -rf "$dir"  # an unfinished run: its TensorBoard events would mix with the new run's
  echo "== GRPO against $1, seed $2: $(date -u +%H:%M:%S)"
  rlhf-train experiment=overopt_verifiable hydra.mode=RUN hydra.run.dir="$dir" seed="$2" \
    reward.path="$OUT/$1/reward_model" trainer.enable_progress_bar=false >"$dir.log" 2>&1
}
export -f grpo
export OUT
mkdir -p "$OUT/runs"
if [ "$LANES" -gt 1 ]; then export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; fi
for seed in 0 1 2; do for rm in rm_64 rm_160 rm_all; do echo "$rm $seed"; done; done |
  xargs -P "$LANES" -L 1 bash -c 'grpo "$0" "$1"' ||
  { echo "a GRPO job failed: see $OUT/runs/*.log" >&2; exit 1; }

python "$HERE/../overopt/plot.py" "$OUT/runs" --out "$OUT/plots" --gold-name "verifier accuracy"
