"""Run the reward/eval pipeline (data -> rollout -> rewards -> advantages -> loss -> eval).

    python tools/run_reward_eval.py --config examples/configs/synthetic_detection.yaml [key=value ...]
    python tools/run_reward_eval.py --help-config
"""

import argparse
import logging
import sys

from megatron_vrft.config import ConfigError, describe_config, load_config
from megatron_vrft.trainer.reward_eval import run_reward_eval
from megatron_vrft.trainer.report import format_sweep_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(describe_config()))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = run_reward_eval(cfg)
    print(f"\n== {result.task}: {result.num_examples} examples, group size {cfg.rollout.num_generations} ==")
    print(format_sweep_table(result))
    print(f"model rollout: mean reward {result.model_rollout['reward_mean']:.3f} "
          f"over {result.model_rollout['num_prompts']} prompts")
    print("GRPO loss on the model: " + ", ".join(f"{k}={v:.4g}" for k, v in result.loss.items()
                                                 if k in ("loss", "pg_loss", "kl_loss", "grad_norm")))
    print("outputs: " + ", ".join(result.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
