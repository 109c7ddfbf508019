"""Evaluate completions against a dataset: accuracy, COCO/LVIS box mAP, grounding IoU.

    python tools/evaluate.py --config RUN.yaml --predictions preds.jsonl [--output metrics.json] [k=v ...]

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
    load_records,
    read_image_size,
    to_reward_ground_truth,
)
from megatron_vrft.eval.evaluate import evaluate_completions, with_crowd_regions


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
                           categories=d.categories, num_synthetic=d.num_synthetic, seed=d.seed,
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
        gt = to_reward_ground_truth(record, box_space=d.coord_space, resized_size=resized)
        if d.task == "detection":  # COCO crowd regions: ignored by COCOeval, never false positives
            g = record.ground_truth
            gt = with_crowd_regions(gt, g.crowd_boxes, g.crowd_categories, crowd_space=g.coord_space)
        ground_truths.append(gt)
        if record.source_id not in predictions:
            missing += 1
        completions.append(predictions.get(record.source_id, ""))
    options = {"protocol": protocol} if d.task == "detection" else {}
    if d.task == "classification":
        options = {"mode": cfg.reward.classification_mode}
    metrics = evaluate_completions(d.task, completions, ground_truths, **options)
    metrics["missing_predictions"] = missing
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (its data section is evaluated)")
    parser.add_argument("--predictions", required=True, type=Path, help="JSONL of {source_id, completion}")
    parser.add_argument("--protocol", choices=("coco", "lvis"), default="coco", help="detection protocol")
    parser.add_argument("--output", type=Path, help="write the metrics as JSON here")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = evaluate_run(cfg, read_predictions(args.predictions), protocol=args.protocol)
    for key, value in metrics.items():
        if not isinstance(value, dict):
            print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.output:
        args.output.write_text(json.dumps(metrics, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
