#!/usr/bin/env bash
# Set up, then run the whole test suite: lint, unit/property tests, doctests, docs build, and the library
# installed alone (`pip install .`, no extras) in a second environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
.venv/bin/ruff check pbs2p pbs2p_lab tests benchmarks scripts
.venv/bin/python -m pytest -q --durations=15 "$@"
bash scripts/check_core_install.sh
