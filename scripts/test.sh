#!/usr/bin/env bash
# Set up, then run the whole test suite (lint, unit/property tests, doctests, docs build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
.venv/bin/ruff check pbs2p tests benchmarks
.venv/bin/python -m pytest -q "$@"
