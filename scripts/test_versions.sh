#!/usr/bin/env bash
# The library at other versions of torchao and transformers than constraints.txt pins: a separate
# .venv-versions with those two changed (torch and everything else still from constraints.txt, so torch stays
# the 2.13.0 CPU build; tokenizers and huggingface_hub as that transformers needs), then the tests of the torchao and transformers interplay (quantize_, TorchAoConfig,
# save_pretrained / from_pretrained, checkpoint checks, torch.compile).
#   bash scripts/test_versions.sh                      # the second versions below
#   TORCHAO_VERSION=0.18.0 TRANSFORMERS_VERSION=5.24.0 bash scripts/test_versions.sh   # any other pair
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCHAO_VERSION=${TORCHAO_VERSION:-0.17.0}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.21.1}
TESTS=(tests/library/test_quantize.py tests/library/test_interop.py tests/library/test_compile_and_save.py
       tests/reliability/test_checkpoints.py)

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# transformers brings its own ranges of tokenizers and huggingface_hub: those two are left to pip as well
grep -v -i -E '^(torchao|transformers|tokenizers|huggingface_hub)==' constraints.txt >"$constraints"
printf 'torchao==%s\ntransformers==%s\n' "$TORCHAO_VERSION" "$TRANSFORMERS_VERSION" >>"$constraints"

start=$SECONDS
rm -rf .venv-versions
"$PYTHON" -m venv .venv-versions
.venv-versions/bin/python -m pip install --quiet --upgrade pip
.venv-versions/bin/python -m pip install --quiet -c "$constraints" -e . pytest hypothesis
.venv-versions/bin/python -c "import torch, torchao, transformers
print(f'torch {torch.__version__}, torchao {torchao.__version__}, transformers {transformers.__version__}')"
installed=$((SECONDS - start))
status=0
TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 .venv-versions/bin/python -m pytest -q -p no:cacheprovider "${TESTS[@]}" || status=$?
echo "test_versions: torchao $TORCHAO_VERSION, transformers $TRANSFORMERS_VERSION: install ${installed} s," \
     "tests $((SECONDS - start - installed)) s, pytest exit $status"
exit $status
