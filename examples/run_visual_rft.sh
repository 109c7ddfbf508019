#!/usr/bin/env bash
""":"
# Visual-RFT main job. This file is both a bash script and a Python script, so both forms work:
#
#   bash examples/run_visual_rft.sh [CONFIG.yaml] [k=v ...]
#       starts torchrun itself, from NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT
#       (one node; on a machine without a GPU, 2 ranks over gloo);
#   torchrun --nproc_per_node N [--nnodes ... --node_rank ... --master_addr ...] \
#       examples/run_visual_rft.sh [CONFIG.yaml] [k=v ...]
#       torchrun runs its script argument with Python: the Python part below trains.
#
# With no CONFIG the built-in tiny default runs (examples/configs/tiny_cpu.yaml): an SFT format
# warm-up, then GRPO on a synthetic colour task, TP = 2 over 2 ranks. Outputs (metrics.jsonl,
# TensorBoard events, reward_curve.png, checkpoints/, hf_checkpoint/) go to trainer.output_dir.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  default_nproc=$(python3 -c "import torch; print(torch.cuda.device_count())")
else
  default_nproc=2
fi
exec torchrun \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC_PER_NODE:-$default_nproc}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29512}" \
  examples/run_visual_rft.sh "$@"
":"""
# Python part: what each torchrun rank runs: tools/train.py with the default config when none is given.
import os
import runpy
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
os.chdir(ROOT)
args = sys.argv[1:]
if args and args[0].endswith((".yaml", ".yml")):
    config, overrides = args[0], args[1:]
else:
    config, overrides = os.path.join("examples", "configs", "tiny_cpu.yaml"), args
sys.argv = [os.path.join(ROOT, "tools", "train.py"), "--config", config, *overrides]
runpy.run_path(sys.argv[0], run_name="__main__")
