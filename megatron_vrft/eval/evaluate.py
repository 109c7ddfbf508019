"""Task metrics from raw completions: the evaluation the paper reports, per task.

- classification: accuracy (the ``accuracy`` reward, default or compat mode) and per-class accuracy;
- detection: COCO-style box mAP / AP50 / AP75 via pycocotools (confidence-ranked predictions);
- grounding: mIoU, cIoU, Acc@0.5.

Completions are parsed with the rewards package's parsers, so evaluation and training agree on
what a valid answer is; unparsable completions count as empty predictions (detection, grounding) or
wrong answers (classification), and their reasons are reported. Detection labels are matched with
the rewards' ``normalize_label`` (``"Cat"`` answers category ``"cat"``).

Detection ground truths are the rewards' dicts, plus two optional evaluation-only keys (never
passed to the rewards): ``crowd_boxes`` ``(C, 4)`` in the same ``box_space`` as ``boxes`` and
``crowd_categories`` (``C`` names): COCO ``iscrowd=1`` regions, evaluated as crowd annotations (a
detection on one is ignored). :func:`with_crowd_regions` adds them to a rewards dict. Boxes are
evaluated in original pixels when ``image_size`` is known (COCO's protocol), else in ``box_space``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from megatron_vrft.eval.detection_map import ImageDetections, compute_box_map
from megatron_vrft.eval.grounding import compute_grounding_metrics
from megatron_vrft.rewards import (
    as_ground_truths,
    compute_rewards,
    convert_boxes,
    space_extent,
    extract_answer,
    parse_boxes,
    parse_single_box,
)
from megatron_vrft.rewards.classification import normalize_label  # what the detection rewards match with

CROWD_KEYS = ("crowd_boxes", "crowd_categories")
"""Evaluation-only ground-truth keys (detection): crowd regions, see the module docstring."""


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
    """Width/height of the coordinate space the boxes are in (for COCO's image records); (1, 1)
    when the size is unknown (only used for area ranges, which are evaluated as "all")."""
    try:
        return space_extent(gt.box_space, image_size=gt.image_size, resized_size=gt.resized_size)
    except ValueError:
        return 1.0, 1.0


def _crowd_regions(gt: Any, index: int) -> tuple[np.ndarray, list[str] | None]:
    """``(C, 4)`` float64 crowd regions and their names (None: not given) of one ground truth."""
    if not isinstance(gt, Mapping) or gt.get("crowd_boxes") is None:
        if isinstance(gt, Mapping) and gt.get("crowd_categories"):
            raise ValueError(f"ground_truths[{index}].crowd_categories given without crowd_boxes")
        return np.zeros((0, 4)), None
    try:
        boxes = np.asarray(torch.as_tensor(gt["crowd_boxes"], dtype=torch.float64).cpu().numpy())
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"ground_truths[{index}].crowd_boxes: not numeric: {gt['crowd_boxes']!r}")
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"ground_truths[{index}].crowd_boxes: expected shape (C, 4), got {boxes.shape}")
    if not np.isfinite(boxes).all() or ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError(f"ground_truths[{index}].crowd_boxes: non-finite or inverted box")
    names = gt.get("crowd_categories")
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(c, str) for c in names):
            raise ValueError(f"ground_truths[{index}].crowd_categories: expected a sequence of str")
        if len(names) != len(boxes):
            raise ValueError(f"ground_truths[{index}].crowd_categories: need one category per crowd box")
        names = list(names)
    return boxes, names


def with_crowd_regions(
    ground_truth: Mapping[str, Any],
    crowd_boxes: Any,
    crowd_categories: Sequence[str],
    *,
    crowd_space: str,
) -> dict[str, Any]:
    """``ground_truth`` (a rewards dict) with the crowd regions added for :func:`evaluate_detection`:
    ``crowd_boxes (C, 4)`` converted from ``crowd_space`` into the ground truth's ``box_space``
    (with its ``image_size`` / ``resized_size``). ``crowd_boxes=None`` returns a plain copy."""
    out = dict(ground_truth)
    if crowd_boxes is None:
        return out
    boxes = torch.as_tensor(np.asarray(crowd_boxes, dtype=np.float64).reshape(-1, 4))
    dst = out.get("box_space") or crowd_space
    boxes = convert_boxes(boxes, crowd_space, dst, image_size=out.get("image_size"),
                          resized_size=out.get("resized_size"))
    out["crowd_boxes"] = boxes.numpy()
    out["crowd_categories"] = tuple(crowd_categories)
    return out


def evaluate_detection(
    completions: Sequence[str],
    ground_truths: Sequence[Mapping[str, Any]],
    *,
    protocol: str = "coco",
) -> dict[str, Any]:
    crowds = [_crowd_regions(g, i) for i, g in enumerate(ground_truths)]
    stripped = [{k: v for k, v in g.items() if k not in CROWD_KEYS} if isinstance(g, Mapping) else g
                for g in ground_truths]
    gts = as_ground_truths(stripped, len(completions))
    failures: Counter = Counter()
    images = []
    names_by_key: dict[str, str] = {}  # normalised category -> the name reported (first in sort order)
    for i, (text, gt, (crowd_boxes, crowd_names)) in enumerate(zip(completions, gts, crowds)):
        gt_categories = list(gt.categories) if gt.categories else ["object"] * len(gt.boxes)
        crowd_categories = crowd_names if crowd_names is not None else ["object"] * len(crowd_boxes)
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
        gt_boxes = gt.boxes.double() if isinstance(gt.boxes, torch.Tensor) else torch.as_tensor(
            np.asarray(gt.boxes, dtype=np.float64))
        pred_boxes = torch.tensor([p.box for p in preds], dtype=torch.float64).reshape(-1, 4)
        crowd_t = torch.as_tensor(crowd_boxes, dtype=torch.float64)
        # Evaluate in original pixels when the sizes allow (COCO's protocol; IoU is the same in any
        # of the spaces, the area ranges are not), else in the ground truth's own space.
        if gt.image_size is not None and (gt.box_space != "pixels_resized" or gt.resized_size is not None):
            kw = dict(image_size=gt.image_size, resized_size=gt.resized_size)
            gt_boxes, pred_boxes, crowd_t = (convert_boxes(b, gt.box_space, "pixels_original", **kw)
                                             for b in (gt_boxes, pred_boxes, crowd_t))
            w, h = gt.image_size
        else:
            w, h = _extent(gt)
        images.append(ImageDetections(
            image_id=i + 1, width=int(round(w)), height=int(round(h)),
            gt_boxes=gt_boxes.numpy(),
            gt_categories=gt_categories,
            pred_boxes=pred_boxes.numpy(),
            pred_scores=np.array([1.0 if p.confidence is None else p.confidence for p in preds]),
            pred_categories=[p.label if p.label and normalize_label(p.label) else default_label for p in preds],
            crowd_boxes=crowd_t.numpy(),
            crowd_categories=crowd_categories,
        ))
    result = compute_box_map(images, sorted(names_by_key.values()), protocol=protocol)
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
