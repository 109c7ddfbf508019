#!/usr/bin/env bash
# Install megatron_vrft and what it needs on a fresh machine.
#   bash tools/install.sh          # runtime + demo dependencies
#   bash tools/install.sh test     # also the test dependencies (pytest, hypothesis, triton, ...)
# torch goes first and pinned: an unpinned torch requirement resolves to the newest CUDA build
# (several GB) on a machine without a GPU. torchvision is never installed: its PyPI wheel links
# CUDA libraries and breaks transformers' image processing on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
extras=demo
[ "${1:-}" = "test" ] && extras=demo,test

if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==${TORCH_VERSION}"
fi
# megatron-core 0.17+ requires Python >= 3.12; 0.16.1 is the version verified on 3.11.
if $PY -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then
  MCORE="megatron-core==0.16.1"
else
  MCORE="megatron-core>=0.16.1"
fi
$PY -m pip install -q "$MCORE" "transformers==5.23.0"
MEGATRON_VRFT_BUILD_CUDA=${MEGATRON_VRFT_BUILD_CUDA:-0} $PY -m pip install -q --no-build-isolation -e ".[${extras}]"
if $PY -c "import torchvision" 2>/dev/null; then
  echo "warning: torchvision is installed; it breaks transformers' CPU image processing" >&2
fi
