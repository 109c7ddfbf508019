"""Task metrics from raw completions: the evaluation the paper reports, per task.

- classification: accuracy (the ``accuracy`` reward, default or compat mode) and per-class accuracy;
- detection: COCO-style box mAP / AP50 / AP75 via pycocotools (confidence-ranked predictions);
- grounding: mIoU, cIoU, Acc@0.5.

Completions are parsed with the rewards package's parsers, so evaluation and training agree on
what a valid answer is; unparsable completions count as empty predictions (detection, grounding) or
wrong answers (classification), and their reasons are reported. Detection labels are matched with
the rewards' ``normalize_label`` (``"Cat"`` answers category ``"cat"``).

Ground truths are :class:`~megatron_vrft.rewards.types.GroundTruth` (or dicts of its fields), the
same objects the rewards read. For detection their ``crowd_boxes`` / ``crowd_categories`` (COCO
``iscrowd=1`` regions, which the rewards never match) are evaluated as crowd annotations: a
detection on one is ignored. Boxes are evaluated in original pixels when ``image_size`` is known
(COCO's protocol), else in ``coord_space``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from megatron_vrft.eval.detection_map import ImageDetections, compute_box_map
from megatron_vrft.eval.grounding import compute_grounding_metrics
from megatron_vrft.eval.lvis_map import LvisLabels, compute_lvis_map
from megatron_vrft.rewards import (
    GroundTruth,
    as_ground_truths,
    compute_rewards,
    convert_boxes,
    extract_answer,
    parse_boxes,
    parse_single_box,
    space_extent,
)
from megatron_vrft.rewards.classification import normalize_label  # what the detection rewards match with


def evaluate_classification(
    completions: Sequence[str], ground_truths: Sequence[GroundTruth | Mapping[str, Any]], *, mode: str = "default"
) -> dict[str, Any]:
    gts = as_ground_truths(ground_truths, len(completions))
    batch = compute_rewards(completions, gts, [("accuracy", 1.0)], reward_options={"accuracy": {"mode": mode}})
    correct = batch.scores["accuracy"]
    per_class: dict[str, list[float]] = {}
    for gt, c in zip(gts, correct.tolist()):
        per_class.setdefault(str(gt.label), []).append(c)
    return {
        "accuracy": float(correct.mean()),
        "per_class_accuracy": {k: float(np.mean(v)) for k, v in sorted(per_class.items())},
        "num_samples": len(completions),
        "parse_failures": dict(batch.failures["accuracy"]),
    }


def _extent(gt) -> tuple[float, float]:
    """Width/height of the coordinate space the boxes are in (for COCO's image records); (1, 1)
    when the size is unknown (only used for area ranges, which are evaluated as "all")."""
    try:
        return space_extent(gt.coord_space, image_size=gt.image_size, resized_size=gt.resized_size)
    except ValueError:
        return 1.0, 1.0


def evaluate_detection(
    completions: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
    *,
    protocol: str = "coco",
    lvis: LvisLabels | None = None,
) -> dict[str, Any]:
    gts = as_ground_truths(ground_truths, len(completions))
    for i, gt in enumerate(gts):
        if gt.boxes is None:
            raise ValueError(f"{gt.where(i)}.boxes: detection evaluation needs boxes (K, 4)")
    failures: Counter = Counter()
    images = []
    names_by_key: dict[str, str] = {}  # normalised category -> the name reported (first in sort order)
    for i, (text, gt) in enumerate(zip(completions, gts)):
        gt_categories = list(gt.categories) if gt.categories else ["object"] * len(gt.boxes)
        crowd_categories = list(gt.crowd_categories)
        for name in (*gt_categories, *crowd_categories):
            key = normalize_label(name)
            names_by_key[key] = min(names_by_key.get(key, name), name)
        answer, reason = extract_answer(text)
        preds = None
        if reason is None:
            preds, reason = parse_boxes(answer)
        if reason is not None:
            failures[str(getattr(reason, "value", reason))] += 1
            preds = []
        # a prediction without a label answers the prompt's (single) category
        asked = gt_categories or crowd_categories
        default_label = asked[0] if len({normalize_label(c) for c in asked}) == 1 else "object"
        gt_boxes = gt.boxes
        pred_boxes = np.asarray([p.box for p in preds], dtype=np.float64).reshape(-1, 4)
        crowd_boxes = gt.crowd_boxes if gt.crowd_boxes is not None else np.zeros((0, 4))
        # Evaluate in original pixels when the sizes allow (COCO's protocol; IoU is the same in any
        # of the spaces, the area ranges are not), else in the ground truth's own space.
        if gt.image_size is not None and (gt.coord_space != "pixels_resized" or gt.resized_size is not None):
            kw = dict(image_size=gt.image_size, resized_size=gt.resized_size)
            gt_boxes, pred_boxes, crowd_boxes = (
                convert_boxes(b, gt.coord_space, "pixels_original", **kw) for b in (gt_boxes, pred_boxes, crowd_boxes)
            )
            w, h = gt.image_size
        else:
            w, h = _extent(gt)
        images.append(
            ImageDetections(
                image_id=i + 1,
                width=int(round(w)),
                height=int(round(h)),
                gt_boxes=gt_boxes,
                gt_categories=gt_categories,
                pred_boxes=pred_boxes,
                pred_scores=np.array([1.0 if p.confidence is None else p.confidence for p in preds]),
                pred_categories=[p.label if p.label and normalize_label(p.label) else default_label for p in preds],
                crowd_boxes=crowd_boxes,
                crowd_categories=crowd_categories,
            )
        )
    result = compute_box_map(images, sorted(names_by_key.values()), protocol=protocol)
    if lvis is not None:  # an LVIS annotation file: the official LVIS API (federated, AP by frequency)
        result["lvis"] = compute_lvis_map(images, lvis)
        result.update({key: result["lvis"][key] for key in ("APr", "APc", "APf")})
    result["num_samples"] = len(completions)
    result["parse_failures"] = dict(failures)
    return result


def evaluate_grounding(
    completions: Sequence[str], ground_truths: Sequence[GroundTruth | Mapping[str, Any]]
) -> dict[str, Any]:
    gts = as_ground_truths(ground_truths, len(completions))
    failures: Counter = Counter()
    preds, valid = [], []
    for text in completions:
        answer, reason = extract_answer(text)
        box = None
        if reason is None:
            box, reason = parse_single_box(answer)
        if reason is not None:
            failures[str(getattr(reason, "value", reason))] += 1
        preds.append(box if box is not None else (0.0, 0.0, 0.0, 0.0))
        valid.append(box is not None)
    for i, gt in enumerate(gts):
        if gt.box is None:
            raise ValueError(f"{gt.where(i)}.box: grounding evaluation needs one box (4,)")
    gt_boxes = torch.from_numpy(np.stack([gt.box for gt in gts]))
    result: dict[str, Any] = compute_grounding_metrics(
        torch.tensor(preds, dtype=torch.float64), gt_boxes, torch.tensor(valid)
    )
    result["parse_failures"] = dict(failures)
    return result


def evaluate_completions(
    task: str, completions: Sequence[str], ground_truths: Sequence[GroundTruth | Mapping[str, Any]], **options: Any
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


def score_predictions(
    task: str,
    source_ids: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
    predictions: Mapping[str, str],
    **options: Any,
) -> dict[str, Any]:
    """Task metrics of ``predictions`` (``{source_id: completion}``) against the records
    ``source_ids`` with their ``ground_truths`` (in the answers' box space; parallel sequences, in
    record order): :func:`evaluate_completions` with ``options``, plus ``missing_predictions``,
    the number of records without a prediction, each scored as an empty answer.

    Raises:
        ValueError: a prediction names a record not in ``source_ids`` (a different dataset or
            config), or the sequences differ in length.
    """
    if len(source_ids) != len(ground_truths):
        raise ValueError(f"{len(source_ids)} source ids but {len(ground_truths)} ground truths")
    known = set(source_ids)
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise ValueError(f"{len(unknown)} predictions name records the dataset does not have, e.g. {unknown[:3]}")
    completions = [predictions.get(sid, "") for sid in source_ids]
    metrics = evaluate_completions(task, completions, ground_truths, **options)
    metrics["missing_predictions"] = sum(sid not in predictions for sid in source_ids)
    return metrics
