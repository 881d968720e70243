#!/usr/bin/env bash
# Create the TRL venv for bench_trl.py (default /tmp/trl-venv; pass another path as $1).
# TRL >= 1.13 has no PPO trainer, so trl is pinned to 1.12.0 (trl.experimental.ppo).
# torch is installed first so pip takes the local CPU build instead of a multi-GB CUDA one.
set -euo pipefail

VENV=${1:-/tmp/trl-venv}
TRL_VERSION=1.12.0
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION=5.23.0  # the version rlhf_lightning runs on (docs/environment.md)

# Fail early if the pinned trl cannot be fetched (checks the registry, installs nothing).
CHECK_DIR=$(mktemp -d)
trap 'rm -rf "$CHECK_DIR"' EXIT
pip download --no-deps --quiet "trl==${TRL_VERSION}" -d "$CHECK_DIR"
echo "trl ${TRL_VERSION} is available"

python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==${TORCH_VERSION}"
"$VENV/bin/pip" install --quiet "trl==${TRL_VERSION}" "transformers==${TRANSFORMERS_VERSION}" \
    accelerate datasets vaderSentiment reasoning-gym  # bench_trl.py --reward vader; trl_grpo.py
"$VENV/bin/pip" check
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401

print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
echo "TRL venv ready: $VENV"
