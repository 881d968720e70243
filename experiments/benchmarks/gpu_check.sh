#!/usr/bin/env bash
# GPU readiness check, one prepared run for one GPU, sized to finish well under 8 minutes (not yet
# run on a GPU; each bench run is capped at 300 s):
# bf16-mixed PPO on SmolLM2-135M (VADER reward) under trainer=gpu (one process) and under
# trainer=fsdp2 (FSDP2Strategy, one process, rollout_gather=full), through bench_ppo.py. Each run
# prints seconds per iteration by phase, generated tokens/s, peak torch.cuda.max_memory_allocated
# of the timed iterations, and MFU against a bf16 matmul peak measured in the same run; the
# last lines compare the two.
#
#   bash experiments/benchmarks/gpu_check.sh [OUT_DIR]               # CUDA, SmolLM2-135M
#   bash experiments/benchmarks/gpu_check.sh --device cpu [OUT_DIR]  # CPU, tiny model: checks
#                                                                    # the script, not a number
# PYTHON=... picks the interpreter (an environment with CUDA torch and this project installed).
set -euo pipefail
cd "$(dirname "$0")/../.."

DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then
  DEVICE=$2
  shift 2
fi
OUT=${1:-outputs/gpu_check}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD

if [[ $DEVICE == cuda ]]; then
  COMMON=(--policy builtin:smollm2 --reward vader --device cuda --precision bf16-mixed
          --batch 64 --minibatch 16 --micro 16 --epochs 4 --new-tokens 48 --stop-token none
          --warmup 1 --iterations 4 --matmul-size 8192 --matmul-reps 10)
else
  COMMON=(--policy builtin:tiny --reward token_fraction target=e --device cpu --precision 32-true
          --batch 8 --minibatch 4 --epochs 2 --new-tokens 8 --warmup 1 --iterations 2
          --threads 1 --matmul-size 256)
fi

for run in gpu fsdp2; do
  if [[ $run == gpu ]]; then
    EXTRA=(--strategy single)
  else
    EXTRA=(--strategy fsdp2 --devices 1 --rollout-gather full)
  fi
  echo "== trainer=$run"
  timeout 300 "$PYTHON" experiments/benchmarks/bench_ppo.py "${COMMON[@]}" "${EXTRA[@]}" \
    --json "$OUT/$run.json" 2>"$OUT/$run.stderr" | tee "$OUT/$run.txt"
done

"$PYTHON" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("\n| trainer | s/iter | rollout s | experience s | update s | gen tok/s | peak alloc GiB "
      "| MFU | matmul peak TFLOP/s |")
print("|---|---|---|---|---|---|---|---|---|")
for run in ("gpu", "fsdp2"):
    result = json.loads((out / f"{run}.json").read_text())
    s = result["summary"]
    peak = s.get("peak_gpu_bytes")
    cells = [
        run, f"{s['iteration_s']:.3f}", f"{s['rollout_s']:.3f}", f"{s['experience_s']:.3f}",
        f"{s['update_s']:.3f}", f"{s['generated_tokens_per_s']:.0f}",
        "-" if peak is None else f"{peak / 2**30:.2f}",
        "-" if s.get("mfu") is None else f"{100 * s['mfu']:.2f}%",
        f"{result['matmul_peak']['flops'] / 1e12:.1f}",
    ]
    print("| " + " | ".join(cells) + " |")
EOF
