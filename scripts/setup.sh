#!/usr/bin/env bash
# Create .venv (once) and install pbs2p with the lab and test tools, at the exact versions of
# constraints.txt (torch 2.13.0, the CPU build). PBS2P_EXTRAS=lab installs without the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${PBS2P_EXTRAS:-dev}]"
