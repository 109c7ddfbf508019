"""Task metrics from raw completions: the evaluation the paper reports, per task.

- classification: accuracy (the ``accuracy`` reward, default or compat mode) and per-class accuracy;
- detection: COCO-style box mAP / AP50 / AP75 via pycocotools (confidence-ranked predictions);
- grounding: mIoU, cIoU, Acc@0.5.

Completions are parsed with the rewards package's parsers, so evaluation and training agree on
what a valid answer is; unparsable completions count as empty predictions (detection, grounding) or
wrong answers (classification), and their reasons are reported.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from megatron_vrft.eval.detection_map import ImageDetections, compute_box_map
from megatron_vrft.eval.grounding import compute_grounding_metrics
from megatron_vrft.rewards import as_ground_truths, compute_rewards, extract_answer, parse_boxes, parse_single_box


def evaluate_classification(
    completions: Sequence[str], ground_truths: Sequence[Mapping[str, Any]], *, mode: str = "default"
) -> dict[str, Any]:
    batch = compute_rewards(completions, ground_truths, [("accuracy", 1.0)],
                            reward_options={"accuracy": {"mode": mode}})
    correct = batch.scores["accuracy"]
    per_class: dict[str, list[float]] = {}
    for gt, c in zip(ground_truths, correct.tolist()):
        per_class.setdefault(str(gt["label"]), []).append(c)
    return {
        "accuracy": float(correct.mean()),
        "per_class_accuracy": {k: float(np.mean(v)) for k, v in sorted(per_class.items())},
        "num_samples": len(completions),
        "parse_failures": dict(batch.failures["accuracy"]),
    }


def _extent(gt) -> tuple[float, float]:
    """Width/height of the coordinate space the boxes are in (for COCO's image records)."""
    if gt.box_space == "norm_1000":
        return 1000.0, 1000.0
    size = gt.resized_size if gt.box_space == "pixels_resized" else gt.image_size
    if size is None:
        return 1.0, 1.0  # only used for area ranges, which we evaluate as "all"
    return float(size[0]), float(size[1])


def evaluate_detection(
    completions: Sequence[str],
    ground_truths: Sequence[Mapping[str, Any]],
    *,
    protocol: str = "coco",
) -> dict[str, Any]:
    gts = as_ground_truths(ground_truths, len(completions))
    failures: Counter = Counter()
    images = []
    categories: set[str] = set()
    for i, (text, gt) in enumerate(zip(completions, gts)):
        gt_categories = list(gt.categories) if gt.categories else ["object"] * len(gt.boxes)
        categories.update(gt_categories)
        answer, reason = extract_answer(text)
        preds = None
        if reason is None:
            preds, reason = parse_boxes(answer)
        if reason is not None:
            failures[str(getattr(reason, "value", reason))] += 1
            preds = []
        # a prediction without a label answers the prompt's (single) category
        default_label = gt_categories[0] if len(set(gt_categories)) == 1 else "object"
        w, h = _extent(gt)
        images.append(ImageDetections(
            image_id=i + 1, width=int(w), height=int(h),
            gt_boxes=gt.boxes.double().numpy() if isinstance(gt.boxes, torch.Tensor) else np.asarray(gt.boxes),
            gt_categories=gt_categories,
            pred_boxes=np.array([p.box for p in preds], dtype=np.float64).reshape(-1, 4),
            pred_scores=np.array([1.0 if p.confidence is None else p.confidence for p in preds]),
            pred_categories=[p.label if p.label else default_label for p in preds],
        ))
    result = compute_box_map(images, sorted(categories), protocol=protocol)
    result["num_samples"] = len(completions)
    result["parse_failures"] = dict(failures)
    return result


def evaluate_grounding(completions: Sequence[str], ground_truths: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    gts = as_ground_truths(ground_truths, len(completions))
    failures: Counter = Counter()
    preds, valid = [], []
    for text, gt in zip(completions, gts):
        answer, reason = extract_answer(text)
        box = None
        if reason is None:
            box, reason = parse_single_box(answer)
        if reason is not None:
            failures[str(getattr(reason, "value", reason))] += 1
        preds.append(box if box is not None else (0.0, 0.0, 0.0, 0.0))
        valid.append(box is not None)
    gt_boxes = torch.stack([torch.as_tensor(gt.box, dtype=torch.float64).reshape(4) for gt in gts])
    result: dict[str, Any] = compute_grounding_metrics(
        torch.tensor(preds, dtype=torch.float64), gt_boxes, torch.tensor(valid))
    result["parse_failures"] = dict(failures)
    return result


def evaluate_completions(
    task: str, completions: Sequence[str], ground_truths: Sequence[Mapping[str, Any]], **options: Any
) -> dict[str, Any]:
    """Dispatch on ``task`` ("classification" | "detection" | "grounding")."""
    if len(completions) != len(ground_truths):
        raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    if not completions:
        raise ValueError("nothing to evaluate: no completions")
    if task == "classification":
        return evaluate_classification(completions, ground_truths, **options)
    if task == "detection":
        return evaluate_detection(completions, ground_truths, **options)
    if task == "grounding":
        return evaluate_grounding(completions, ground_truths, **options)
    raise ValueError(f"unknown task {task!r}; expected classification, detection or grounding")
