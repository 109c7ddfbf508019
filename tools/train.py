"""Train a policy with Visual-RFT (GRPO, with an optional SFT format warm-up) or the SFT baseline.

    torchrun --nproc_per_node N tools/train.py --config RUN.yaml [dotted.key=value ...]
    python tools/train.py --config RUN.yaml [...]       # one process
    python tools/train.py --help-config                 # every config field

Usually started through examples/run_visual_rft.sh. Writes metrics.jsonl, TensorBoard events,
reward_curve.png, checkpoints/ and hf_checkpoint/ into trainer.output_dir. A config, data or path
error prints one line and exits with 2.
"""

import logging
import os
import sys

from megatron_vrft import cli


def train_main(args) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s"
    )
    cfg = cli.load_run_config(args)
    cli.quiet_libraries()
    import torch
    import torch.distributed as dist

    from megatron_vrft.distributed.parallel_state import init_distributed
    from megatron_vrft.trainer.loop import train

    if not torch.cuda.is_available():
        # Ranks share the CPU cores; more threads than cores per rank only adds contention.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    init_distributed(cfg.parallel.backend)
    try:
        result = train(cfg)
        if dist.get_rank() == 0:
            fm = result.final_metrics
            shown = {k: v for k, v in fm.items() if k.startswith(("reward/", "eval/")) and isinstance(v, float)}
            print(
                f"\ntrained {result.steps} steps; final: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(shown.items()))
            )
            print(
                f"outputs: {result.output_dir}/metrics.jsonl, {result.files.get('reward_curve', '-')}, "
                f"HF checkpoint {result.hf_checkpoint}"
            )
    finally:
        dist.destroy_process_group()
    return cli.EXIT_OK


def main(argv=None) -> int:
    return cli.run(train_main, cli.config_parser(__doc__), argv, report=lambda: os.environ.get("RANK", "0") == "0")


if __name__ == "__main__":
    sys.exit(main())
