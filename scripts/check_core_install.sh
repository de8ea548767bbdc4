#!/usr/bin/env bash
# `pip install .` without extras into a fresh .venv-core, then run the library there (scripts/core_smoke.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .venv-core
"$PYTHON" -m venv .venv-core
.venv-core/bin/python -m pip install --quiet --upgrade pip
.venv-core/bin/python -m pip install --quiet -c constraints.txt .
echo "installed: $(.venv-core/bin/python -m pip list --format=freeze | tr '\n' ' ')"
cd "$(mktemp -d)"  # import the installed package, not the checkout
TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 "$OLDPWD/.venv-core/bin/python" "$OLDPWD/scripts/core_smoke.py"
