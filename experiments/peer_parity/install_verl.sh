#!/usr/bin/env bash
# Installs verl's core algorithms, the peer of tests/experiments/test_peer_parity_verl.py, into
# the active Python environment: it only adds packages, every one already installed keeps its
# version (torch's CPU build included).
#
#   bash experiments/peer_parity/install_verl.sh
#
# verl goes in without its dependencies (vLLM-era pins of transformers, wandb, pandas, ...):
# `verl.trainer.ppo.core_algos` and `verl.trainer.ppo.rollout_corr_helper` import only ray,
# tensordict, codetiming and orjson beyond what the project installs. tensordict is held to the
# range verl declares. The installed packages are passed as constraints, so pip picks versions
# of these four (and of their dependencies) that fit what is there instead of swapping it.
# pip then lists verl's undeclared dependencies and its transformers pin as conflicts: expected,
# nothing the imports above need.
set -euo pipefail

VERL_VERSION="${VERL_VERSION:-0.9.1}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
python -m pip freeze --exclude-editable | grep -v '^#' > "$constraints"

python -m pip install -q --no-deps "verl==${VERL_VERSION}"
python -m pip install -q -c "$constraints" ray "tensordict>=0.8.0,<=0.10.0,!=0.9.0" codetiming orjson
python -c "import verl.trainer.ppo.core_algos, verl.trainer.ppo.rollout_corr_helper, torch; \
print('verl', __import__('verl').__version__, 'with torch', torch.__version__)"
