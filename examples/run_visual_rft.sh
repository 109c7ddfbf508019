#!/usr/bin/env bash
# Visual-RFT main job.
#
#   bash examples/run_visual_rft.sh                       # the three built-in synthetic tasks
#   bash examples/run_visual_rft.sh CONFIG.yaml [k=v ...] # one config, with overrides
#
# Today this runs the reward/eval pipeline (data -> Qwen2-VL preprocessing -> rollout -> rewards ->
# GRPO advantages and loss on the model -> evaluation) on one process; reports, metrics.json and
# plots go to each config's trainer.output_dir. The multi-rank GRPO trainer (torchrun, one node to
# many) replaces the body of this script when it lands; the config files stay the same.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# Triton kernels run interpreted on machines without a GPU.
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  export TRITON_INTERPRET=1
fi
if [ $# -gt 0 ]; then
  exec python3 tools/run_reward_eval.py --config "$@"
fi
for task in classification detection grounding; do
  python3 tools/run_reward_eval.py --config "examples/configs/synthetic_${task}.yaml"
done
echo "reports: outputs/synthetic_{classification,detection,grounding}/report.md"
