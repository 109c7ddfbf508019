"""Evaluate a checkpoint, or completions, against a dataset: accuracy, COCO/LVIS box mAP, grounding IoU.

    python tools/evaluate.py --config RUN.yaml --checkpoint HF_DIR --output-dir OUT [k=v ...]
    python tools/evaluate.py --checkpoint RUN/checkpoints [k=v ...]     # the run's own config.json
    torchrun --nproc_per_node N tools/evaluate.py --config RUN.yaml --checkpoint HF_DIR --output-dir OUT
    python tools/evaluate.py --config RUN.yaml --predictions preds.jsonl [--output metrics.json] [k=v ...]

``--checkpoint``: an HF checkpoint (e.g. a run's ``hf_checkpoint/``, with its tokenizer), or a
Megatron distributed checkpoint (a training checkpoint ``checkpoints/step_N``, a run's
``checkpoints/`` folder for its latest, or ``tools/convert_checkpoint.py`` output, at any TP/PP;
its tokenizer comes from the config's ``model.hf_path``, or the built-in tiny one) generates
one answer per record of the config's ``data`` section (greedy unless ``--temperature``), batched,
with a rollout engine (``--engine``: vLLM where installed with CUDA, else transformers), records
dealt over the torchrun ranks; ``OUT/predictions.jsonl`` is appended as it goes, so a rerun skips
records already answered. Unreadable images are listed and counted; the rest are evaluated. Writes
``OUT/metrics.json``, ``OUT/report.md`` and ``OUT/examples.png`` (predictions drawn on the images).

``preds.jsonl``: one JSON object per line, ``{"source_id": ..., "completion": "<think>..</think><answer>..</answer>"}``
(the ids of the records the run config's ``data`` section yields). Boxes in completions are read in
``data.coord_space``; ground truth is mapped into that space with the Qwen2-VL image processor's
resize (``data.min_pixels`` / ``data.max_pixels``), exactly as during training. A record without a
prediction counts as an empty answer and is reported; a prediction for an unknown id is an error.

The work is library code: records, ground truths, engine and sampling come from
``megatron_vrft.builders``, the checkpoint from ``megatron_vrft.models.checkpoints``, generation
and scoring from ``megatron_vrft.eval`` (``predictions.generate_predictions``,
``evaluate.score_predictions``). The records are read once, under ``data.on_error``, before anything
is generated: a bad annotation stops the run up front, naming the record.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from megatron_vrft import builders, cli
from megatron_vrft.eval.evaluate import score_predictions
from megatron_vrft.eval.predictions import (
    PREDICTIONS_FILE,
    generate_predictions,
    merge_prediction_parts,
    read_predictions,
)

# bad input met while reading data, predictions or a checkpoint: reported as one line, exit 2
# (ConfigError and DataError are ValueErrors)
BAD_INPUT = (ValueError, FileNotFoundError)


def print_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        if not isinstance(value, dict):
            print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")


def read_eval_data(cfg, protocol: str):
    """The records (read once, under ``data.on_error``), their ground truths in the model's box
    space and the scoring options: everything scoring needs, checked before any generation."""
    records = builders.build_records(cfg.data)
    ground_truths = builders.build_eval_ground_truths(cfg.data, records)
    options = builders.eval_score_options(cfg.data, cfg.reward, records, protocol=protocol)
    return records, ground_truths, options


def main(argv=None) -> int:
    parser = cli.config_parser(__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--predictions", type=Path, help="JSONL of {source_id, completion}")
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="HF or Megatron checkpoint directory (or a run's checkpoints/ folder) to generate with",
    )
    parser.add_argument("--output-dir", type=Path, help="with --checkpoint: predictions, metrics, report, PNG")
    parser.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--protocol", choices=("coco", "lvis"), default="coco", help="detection protocol")
    parser.add_argument("--output", type=Path, help="write the metrics as JSON here")
    return cli.run(evaluate_main, parser, argv, report=lambda: os.environ.get("RANK", "0") == "0")


def evaluate_main(args) -> int:
    if args.predictions is None and args.checkpoint is None:
        raise cli.UserError("one of --predictions or --checkpoint is required")
    if args.config is None and args.checkpoint is not None:
        # a checkpoint inside a run directory: the run's own config (its data section is evaluated)
        if (found := cli.find_run_config(args.checkpoint)) is None:
            raise cli.UserError(f"--config RUN.yaml is required (no run config.json beside {args.checkpoint})")
        args.config = str(found)
        if os.environ.get("RANK", "0") == "0":
            print(f"config: {found} (the run's)", file=sys.stderr)
    cfg = cli.load_run_config(args)
    cli.quiet_libraries()
    if args.checkpoint is not None:
        return evaluate_checkpoint(cfg, args)
    with cli.reported_as_user_errors(*BAD_INPUT):
        predictions = read_predictions(args.predictions)
        records, ground_truths, options = read_eval_data(cfg, args.protocol)
        metrics = score_predictions(
            cfg.data.task, [r.source_id for r in records], ground_truths, predictions, **options
        )
    print_metrics(metrics)
    if args.output:
        args.output.write_text(json.dumps(metrics, indent=2, default=float))
    return 0


def evaluate_checkpoint(cfg, args) -> int:
    import torch
    import torch.distributed as dist

    from megatron_vrft.eval.visualize import draw_prediction_grid, markdown_report
    from megatron_vrft.models.checkpoints import open_checkpoint, resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as err:
        raise cli.UserError(f"--checkpoint {err}") from err
    out_dir = args.output_dir or (checkpoint.parent / "evaluation")
    if "RANK" in os.environ:  # under torchrun: records dealt over the ranks
        from megatron_vrft.distributed.parallel_state import init_distributed

        init_distributed("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    d = cfg.data
    with cli.reported_as_user_errors(*BAD_INPUT):
        # the records once, under data.on_error: a bad annotation raises here, before generation
        records, ground_truths, options = read_eval_data(cfg, args.protocol)
        opened = open_checkpoint(checkpoint)
        tokenizer = builders.build_checkpoint_tokenizer(cfg.model, opened.tokenizer_dir)
        processor = builders.build_processor(tokenizer, d)
        # unreadable images are skipped here, and count as missing predictions when scored
        examples = builders.build_examples(d, processor, records, on_error="skip", report=False)
        usable = {e.source_id for e in examples}
        unusable = [r.source_id for r in records if r.source_id not in usable]
        if unusable and rank == 0:
            shown = ", ".join(unusable[:5]) + (", ..." if len(unusable) > 5 else "")
            print(
                f"warning: {len(unusable)} records could not be used and are not evaluated "
                f"(counted as missing predictions): {shown}",
                file=sys.stderr,
            )
        if records.skips.total and rank == 0:
            print(f"warning: skipped while reading the data: {records.skips.summary()}", file=sys.stderr)
        engine_name = builders.resolve_engine(cfg.rollout, name=args.engine)
        engine = builders.build_engine(
            engine_name,
            cfg.rollout,
            d,
            opened.arch,
            tokenizer,
            device=builders.default_device(),
            dtype=torch.float32,
            seed=cfg.trainer.seed,
        )
        engine.update_weights(opened.weights)
        sampling = builders.build_eval_sampling(cfg.rollout, tokenizer, temperature=args.temperature)
        generate_predictions(
            engine,
            examples,
            sampling,
            out_dir,
            rank=rank,
            world=world,
            batch_size=args.batch_size,
            seed=cfg.trainer.seed,
            progress=True,
        )
    if world > 1:
        dist.barrier()
        if rank == 0:
            merge_prediction_parts(out_dir, world)
        dist.barrier()
    if rank != 0:
        dist.destroy_process_group()
        return 0
    with cli.reported_as_user_errors(ValueError):  # e.g. an output dir holding answers to another dataset
        predictions = read_predictions(out_dir / PREDICTIONS_FILE)
        metrics = score_predictions(d.task, [r.source_id for r in records], ground_truths, predictions, **options)
    metrics["num_evaluated"] = len(predictions)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    (out_dir / "report.md").write_text(markdown_report(metrics, title=f"{d.task}: {checkpoint}"))
    shown = examples[:8]
    draw_prediction_grid(
        out_dir / "examples.png",
        [e.images[0] for e in shown],
        [predictions.get(e.source_id, "") for e in shown],
        [e.ground_truth for e in shown],
        task=d.task,
    )
    print_metrics(metrics)
    print(f"wrote {out_dir}/metrics.json, report.md, examples.png, predictions.jsonl")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
