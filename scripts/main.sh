#!/usr/bin/env bash
# Set up, then compress the built-in real model (SmolLM2-135M) and print FP vs compressed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
.venv/bin/pbs2p run "$@"
