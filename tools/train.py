"""Train a policy with Visual-RFT (GRPO, with an optional SFT format warm-up) or the SFT baseline.

    torchrun --nproc_per_node N tools/train.py --config RUN.yaml [dotted.key=value ...]
    python tools/train.py --config RUN.yaml [...]       # one process
    python tools/train.py --help-config                 # every config field

Usually started through examples/run_visual_rft.sh. Writes metrics.jsonl, TensorBoard events,
reward_curve.png, checkpoints/ and hf_checkpoint/ into trainer.output_dir.
"""

import argparse
import logging
import os
import socket
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def _init_distributed(backend: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # a plain `python tools/train.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)

    from megatron_vrft.config import ConfigError, describe_config, load_config

    if args.help_config:
        print("\n".join(describe_config()))
        return 0
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        # Ranks share the CPU cores; more threads than cores per rank only adds contention.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    _init_distributed(cfg.parallel.backend)
    from megatron_vrft.trainer.loop import train

    try:
        result = train(cfg)
    except ConfigError as err:
        if dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    if dist.get_rank() == 0:
        fm = result.final_metrics
        shown = {k: v for k, v in fm.items() if k.startswith(("reward/", "eval/")) and isinstance(v, float)}
        print(f"\ntrained {result.steps} steps; final: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(shown.items())))
        print(f"outputs: {result.output_dir}/metrics.jsonl, {result.files.get('reward_curve', '-')}, "
              f"HF checkpoint {result.hf_checkpoint}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
