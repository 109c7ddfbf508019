"""Evaluate a checkpoint, or completions, against a dataset: accuracy, COCO/LVIS box mAP, grounding IoU.

    python tools/evaluate.py --config RUN.yaml --checkpoint HF_DIR --output-dir OUT [k=v ...]
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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from megatron_vrft.config import ConfigError, load_config
from megatron_vrft.data import (
    build_image_processor,
    compute_resized_size,
    ground_truth_in_model_space,
    load_records,
    read_image_size,
)
from megatron_vrft.eval.evaluate import evaluate_completions


def read_predictions(path: Path) -> dict[str, str]:
    predictions: dict[str, str] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                source_id, completion = str(row["source_id"]), row["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: expected {{\"source_id\", \"completion\"}}: {exc}") from exc
            if source_id in predictions:
                raise ValueError(f"{path}:{line_no}: duplicate prediction for {source_id!r}")
            predictions[source_id] = completion if isinstance(completion, str) else ""
    return predictions


def evaluate_run(cfg, predictions: dict[str, str], protocol: str = "coco") -> dict:
    d = cfg.data
    records = load_records(d.source, d.task, path=d.path, image_root=d.image_root, box_space=d.coord_space,
                           annotation_coord_space=d.annotation_coord_space, k_shot=d.k_shot,
                           categories=d.categories, num_synthetic=d.num_synthetic, synthetic_kind=d.synthetic_kind, seed=d.seed,
                           on_error=d.on_error)
    known = {r.source_id for r in records}
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise ValueError(f"{len(unknown)} predictions name records the dataset does not have, e.g. {unknown[:3]}")
    image_processor = build_image_processor(min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    completions, ground_truths, missing = [], [], 0
    for record in records:
        if record.image_size is None:  # a header read, no full decode
            record = dataclasses.replace(record, image_size=read_image_size(record.images[0]))
        resized = compute_resized_size(*record.image_size, image_processor)
        # COCO crowd regions travel with it: ignored by COCOeval, never false positives
        ground_truths.append(ground_truth_in_model_space(record, d.coord_space, resized_size=resized))
        if record.source_id not in predictions:
            missing += 1
        completions.append(predictions.get(record.source_id, ""))
    options = {"protocol": protocol} if d.task == "detection" else {}
    if d.task == "detection" and (protocol == "lvis" or d.source == "lvis"):
        from megatron_vrft.eval.lvis_map import lvis_labels_from_file

        # APr / APc / APf by the LVIS API: needs the annotation file's frequencies and per-image
        # negative / not-exhaustive category lists
        options["lvis"] = lvis_labels_from_file(d.path, [int(r.metadata["image_id"]) for r in records])
    if d.task == "classification":
        options = {"mode": cfg.reward.classification_mode}
    metrics = evaluate_completions(d.task, completions, ground_truths, **options)
    metrics["missing_predictions"] = missing
    return metrics


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint directory ``path`` names: itself (HF or Megatron), or for a run's
    ``checkpoints/`` folder its latest complete checkpoint. Raises FileNotFoundError naming it."""
    if (path / "config.json").is_file() or (path / "megatron_vrft_checkpoint.json").is_file():
        return path
    if (path / "latest").is_file():
        return resolve_checkpoint(path / (path / "latest").read_text().strip())
    raise FileNotFoundError(f"--checkpoint {path}: neither an HF checkpoint (config.json) nor a Megatron "
                            "checkpoint (megatron_vrft_checkpoint.json) nor a run's checkpoints/ folder")


def open_checkpoint(path: Path, cfg):
    """``(arch, tokenizer, HF-named weight stream)`` of an HF or Megatron checkpoint directory."""
    from megatron_vrft.data import build_tiny_tokenizer, load_tokenizer
    from megatron_vrft.models.conversion import MegatronCheckpointReader
    from megatron_vrft.models.conversion_hf import HfCheckpointReader
    from megatron_vrft.models.qwen2_vl.state_dict_adapter import as_arch

    if (path / "config.json").is_file():
        reader = HfCheckpointReader(path)
        return (as_arch(json.loads((path / "config.json").read_text())), load_tokenizer(path),
                ((n, reader.get(n)) for n in reader.names()))
    reader = MegatronCheckpointReader(path)  # any TP/PP layout; one layer in memory at a time
    tokenizer = load_tokenizer(cfg.model.hf_path) if cfg.model.hf_path else build_tiny_tokenizer()
    return reader.arch, tokenizer, reader.iter_hf()


def generate_predictions(cfg, checkpoint: Path, out_dir: Path, *, engine_name: str, temperature: float,
                         batch_size: int, progress: bool) -> tuple[Path, list, list]:
    """Answers of the checkpoint for every usable record, appended to ``out_dir/predictions.jsonl``.

    Returns the predictions file and (examples, their ground truths) for the picture.
    """
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_vrft.data import build_qwen2vl_processor, preprocess_records
    from megatron_vrft.rollout.engine import build_engine, resolve_engine_name, vision_token_ids
    from megatron_vrft.rollout.types import SamplingParams

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    d = cfg.data
    arch, tokenizer, weights = open_checkpoint(checkpoint, cfg)
    processor = build_qwen2vl_processor(tokenizer, min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    records = load_records(d.source, d.task, path=d.path, image_root=d.image_root, box_space=d.coord_space,
                           annotation_coord_space=d.annotation_coord_space, k_shot=d.k_shot,
                           categories=d.categories, num_synthetic=d.num_synthetic,
                           synthetic_kind=d.synthetic_kind, seed=d.seed, on_error="skip")
    examples, skips = preprocess_records(records, processor, box_space=d.coord_space, on_error="skip")
    skips.merge(records.skips)
    if skips.total and rank == 0:
        print(f"warning: {skips.total} records could not be used and are not evaluated: {skips.summary()}",
              file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    part = out_dir / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.jsonl")
    done = read_predictions(part) if part.exists() else {}
    todo = [e for i, e in enumerate(examples) if i % world == rank and e.source_id not in done]
    name = resolve_engine_name(engine_name)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    engine = build_engine(name, arch, tokenizer=tokenizer, blocked_token_ids=vision_token_ids(tokenizer, arch.vocab_size),
                          device=device, dtype=torch.float32,
                          **({} if name == "hf" else dict(min_pixels=d.min_pixels, max_pixels=d.max_pixels)))
    engine.update_weights(weights)
    stop = tuple(i for i in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) if i is not None)
    sampling = SamplingParams(n=1, greedy=temperature == 0, temperature=temperature or 1.0,
                              max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=stop)
    with open(part, "a") as f:
        for start in tqdm(range(0, len(todo), batch_size), desc=f"generate (rank {rank})", disable=not progress):
            batch = engine.generate(todo[start : start + batch_size], sampling, seed=cfg.trainer.seed + start)
            for i in range(len(batch)):
                f.write(json.dumps({"source_id": batch.prompt_of(i).source_id, "completion": batch.texts[i]}) + "\n")
            f.flush()
    final = out_dir / "predictions.jsonl"
    if world > 1:
        dist.barrier()
        if rank == 0:
            merged = {}
            for r in range(world):
                merged.update(read_predictions(out_dir / f"predictions.rank{r}.jsonl"))
            final.write_text("".join(json.dumps({"source_id": k, "completion": v}) + "\n" for k, v in merged.items()))
        dist.barrier()
    return final, examples, [e.ground_truth for e in examples]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (its data section is evaluated)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, help="JSONL of {source_id, completion}")
    source.add_argument("--checkpoint", type=Path,
                        help="HF or Megatron checkpoint directory (or a run's checkpoints/ folder) to generate with")
    parser.add_argument("--output-dir", type=Path, help="with --checkpoint: predictions, metrics, report, PNG")
    parser.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--protocol", choices=("coco", "lvis"), default="coco", help="detection protocol")
    parser.add_argument("--output", type=Path, help="write the metrics as JSON here")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.checkpoint is not None:
        return evaluate_checkpoint(cfg, args)
    try:
        metrics = evaluate_run(cfg, read_predictions(args.predictions), protocol=args.protocol)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, value in metrics.items():
        if not isinstance(value, dict):
            print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.output:
        args.output.write_text(json.dumps(metrics, indent=2, default=float))
    return 0


def evaluate_checkpoint(cfg, args) -> int:
    import os

    import torch.distributed as dist

    from megatron_vrft.eval.visualize import draw_prediction_grid, markdown_report

    try:
        args.checkpoint = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = args.output_dir or (args.checkpoint.parent / "evaluation")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        predictions_file, examples, gts = generate_predictions(
            cfg, args.checkpoint, out_dir, engine_name=args.engine, temperature=args.temperature,
            batch_size=args.batch_size, progress=True,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.destroy_process_group()
        return 0
    predictions = read_predictions(predictions_file)
    metrics = evaluate_run(cfg, predictions, protocol=args.protocol)
    metrics["num_evaluated"] = len(predictions)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    (out_dir / "report.md").write_text(markdown_report(metrics, title=f"{cfg.data.task}: {args.checkpoint}"))
    shown = examples[:8]
    draw_prediction_grid(out_dir / "examples.png", [e.images[0] for e in shown],
                         [predictions.get(e.source_id, "") for e in shown], gts[: len(shown)], task=cfg.data.task)
    for key, value in metrics.items():
        if not isinstance(value, dict):
            print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    print(f"wrote {out_dir}/metrics.json, report.md, examples.png, predictions.jsonl")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
