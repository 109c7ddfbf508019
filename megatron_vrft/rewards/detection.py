"""Detection rewards: IoU reward and confidence reward (Visual-RFT open-vocabulary / few-shot).

Pipeline per completion (both rewards share it):

1. ``<answer>`` content -> boxes with confidences (``parsing.parse_boxes``); any invalid entry, a
   missing confidence (unless ``default_confidence`` is given) or a failure fails the completion.
2. Duplicate boxes (identical coordinates) are dropped, keeping the highest confidence (ties: the
   first written). ``mode="visual_rft_compat"`` keeps the first written, as published.
3. Predictions are sorted by confidence, descending (stable: ties keep written order), and
   converted from ``pred_space`` into the ground truth's ``coord_space``.
4. Matching at IoU > ``iou_threshold`` (0.5), each ground-truth box at most once:
   ``"greedy"`` (published): in confidence order each prediction takes the unmatched ground truth
   with the highest IoU (first on ties); ``"hungarian"``: the assignment maximising the total IoU
   over pairs above the threshold (``scipy.optimize.linear_sum_assignment``).

Rewards (``G`` ground-truth boxes, ``P`` predictions after de-duplication):

- ``iou``: ``sum(matched IoU) / max(G, P)``, in ``[0, 1]``. Extra or missing boxes dilute it.
- ``confidence``: mean over predictions of ``c`` if matched else ``1 - c``, clamped to ``[0, 1]``.

Empty cases (``G = 0`` means "no object of the queried category"; the prompt's ``No Objects``
answer and ``[]`` parse as ``P = 0``):

======  ======  ==========================  ===========================================
G       P       iou                         confidence
======  ======  ==========================  ===========================================
0       0       1.0 (correct "no objects")  1.0
0       > 0     0.0                         mean(1 - c): confidently wrong boxes cost more
> 0     0       0.0                         0.0
======  ======  ==========================  ===========================================

In ``visual_rft_compat`` mode ``G = P = 0`` and ``G > 0, P = 0`` score 0.0 (the published code
indexes the first prediction and falls into its catch-all), the rest is as above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from megatron_vrft.ops.box_iou import box_iou
from megatron_vrft.rewards.classification import normalize_label
from megatron_vrft.rewards.coords import ModelCoordSpace, convert_boxes
from megatron_vrft.rewards.parsing import (
    MAX_COMPLETION_CHARS,
    ParsedBox,
    extract_answer,
    parse_boxes,
)
from megatron_vrft.rewards.registry import register_reward
from megatron_vrft.rewards.types import FailureReason as R
from megatron_vrft.rewards.types import (
    GroundTruth,
    RewardOutput,
    as_ground_truths,
    build_reward_output,
    check_model_space,
)

Matching = Literal["greedy", "hungarian"]
DetectionMode = Literal["default", "visual_rft_compat"]


def match_greedy(iou: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """Published greedy matching. ``iou (P, G)`` with predictions in confidence order.

    Returns ``(P,)`` long: matched ground-truth index, or -1.
    """
    num_pred, num_gt = iou.shape
    out = torch.full((num_pred,), -1, dtype=torch.long)
    if num_pred == 0 or num_gt == 0:
        return out
    work = iou.detach().to(torch.float64).clone()
    for p in range(num_pred):
        g = int(torch.argmax(work[p]))  # first maximum on ties
        if float(work[p, g]) > iou_threshold:
            out[p] = g
            work[:, g] = -1.0
    return out


def match_hungarian(iou: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """Assignment maximising the total IoU over pairs with IoU > ``iou_threshold``.

    ``iou (P, G)`` -> ``(P,)`` long matched ground-truth index or -1. Pairs at or below the threshold
    get weight 0, so the optimum over the full matrix is the optimum over admissible pairs.
    """
    num_pred, num_gt = iou.shape
    out = torch.full((num_pred,), -1, dtype=torch.long)
    if num_pred == 0 or num_gt == 0:
        return out
    w = iou.detach().to(torch.float64).cpu().numpy()
    w = np.where(w > iou_threshold, w, 0.0)
    rows, cols = linear_sum_assignment(w, maximize=True)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if w[r, c] > iou_threshold:
            out[r] = c
    return out


def deduplicate_predictions(preds: Sequence[ParsedBox], keep: Literal["max_confidence", "first"]) -> list[ParsedBox]:
    """Drop boxes with identical coordinates, keeping the highest confidence or the first."""
    kept: dict[tuple[float, ...], ParsedBox] = {}
    for p in preds:
        old = kept.get(p.box)
        if old is None:
            kept[p.box] = p
        elif keep == "max_confidence" and (p.confidence or 0.0) > (old.confidence or 0.0):
            kept[p.box] = p  # dict keeps the first insertion's position; order is re-sorted later
    return list(kept.values())


@dataclass(kw_only=True)
class DetectionScores:
    """Both detection rewards of a batch (``B`` completions)."""

    iou: list[float]
    confidence: list[float]
    reasons: list[str | None]
    matches: list[torch.Tensor | None]
    """Per completion ``(P,)`` matched gt index (-1 unmatched) in confidence order, ``None`` on failure."""


def _parse_predictions(
    text: Any,
    *,
    default_confidence: float | None,
    match_categories: bool,
    max_chars: int,
) -> tuple[list[ParsedBox] | None, R | None]:
    answer, reason = extract_answer(text, max_chars=max_chars)
    if reason is not None:
        return None, reason
    preds, reason = parse_boxes(answer)
    if reason is not None:
        return None, reason
    out = []
    for p in preds:
        if p.confidence is None:
            if default_confidence is None:
                return None, R.MISSING_CONFIDENCE
            p = ParsedBox(p.box, float(default_confidence), p.label)
        if match_categories and (p.label is None or not normalize_label(p.label)):
            return None, R.MISSING_LABEL
        out.append(p)
    return out, None


def compute_detection_scores(
    completions: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
    *,
    pred_space: ModelCoordSpace | None = None,
    matching: Matching = "greedy",
    iou_threshold: float = 0.5,
    mode: DetectionMode = "default",
    default_confidence: float | None = None,
    match_categories: bool = False,
    max_chars: int = MAX_COMPLETION_CHARS,
) -> DetectionScores:
    """IoU and confidence rewards for a batch; see the module docstring.

    ``pred_space``: coordinate space the prompt asked for (``None``: the ground truth's
    ``coord_space``). ``match_categories``: predictions must carry a label and only match ground
    truth of the same normalised category (needs ``categories`` in the ground truth).
    ``default_confidence``: used for entries without a confidence (``None``: such entries fail).
    """
    if matching not in ("greedy", "hungarian"):
        raise ValueError(f"matching must be 'greedy' or 'hungarian', got {matching!r}")
    if mode not in ("default", "visual_rft_compat"):
        raise ValueError(f"detection mode must be 'default' or 'visual_rft_compat', got {mode!r}")
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    if default_confidence is not None and not 0.0 <= default_confidence <= 1.0:
        raise ValueError(f"default_confidence must be in [0, 1], got {default_confidence}")
    gts = as_ground_truths(ground_truths, len(completions))
    for i, g in enumerate(gts):
        if g.boxes is None:
            raise ValueError(f"{g.where(i)}.boxes: detection rewards need boxes (K, 4)")
        if match_categories and g.categories is None:
            raise ValueError(f"{g.where(i)}.categories: needed by match_categories=True")
        check_model_space(g, i)
        # Fail on missing image sizes now, not only when some completion happens to parse.
        convert_boxes(
            np.zeros((0, 4)),
            pred_space or g.coord_space,
            g.coord_space,
            image_size=g.image_size,
            resized_size=g.resized_size,
        )
    # Only ``boxes`` are matched: crowd regions (``crowd_boxes``, evaluation only) never are.
    gt_boxes = [torch.from_numpy(g.boxes) for g in gts]  # (K_b, 4) float64, CPU
    compat = mode == "visual_rft_compat"
    match_fn = match_greedy if matching == "greedy" else match_hungarian

    # Parse, de-duplicate, sort, convert: (B,) lists of (P_b, 4) boxes in the gt space.
    parsed: list[list[ParsedBox] | None] = []
    reasons: list[str | None] = []
    pred_boxes: list[torch.Tensor] = []
    for text, gt in zip(completions, gts):
        preds, reason = _parse_predictions(
            text,
            default_confidence=default_confidence,
            match_categories=match_categories,
            max_chars=max_chars,
        )
        if preds is not None:
            preds = deduplicate_predictions(preds, "first" if compat else "max_confidence")
            preds = sorted(preds, key=lambda p: -p.confidence)  # stable
            boxes = torch.tensor([p.box for p in preds], dtype=torch.float64).reshape(-1, 4)
            boxes = convert_boxes(
                boxes,
                pred_space or gt.coord_space,
                gt.coord_space,
                image_size=gt.image_size,
                resized_size=gt.resized_size,
            )
        else:
            boxes = torch.zeros(0, 4, dtype=torch.float64)
        parsed.append(preds)
        reasons.append(None if reason is None else reason.value)
        pred_boxes.append(boxes)

    # One padded pairwise call for the whole batch: (B, P_max, G_max).
    b = len(gts)
    p_max = max([x.shape[0] for x in pred_boxes], default=0)
    g_max = max([g.shape[0] for g in gt_boxes], default=0)
    ious = None
    if b and p_max and g_max:
        pb = torch.zeros(b, p_max, 4, dtype=torch.float64)
        gb = torch.zeros(b, g_max, 4, dtype=torch.float64)
        pv = torch.zeros(b, p_max, dtype=torch.bool)
        gv = torch.zeros(b, g_max, dtype=torch.bool)
        for i, (x, g) in enumerate(zip(pred_boxes, gt_boxes)):
            pb[i, : x.shape[0]], pv[i, : x.shape[0]] = x, True
            gb[i, : g.shape[0]], gv[i, : g.shape[0]] = g, True
        ious = box_iou(pb, gb, mode="iou", valid1=pv, valid2=gv)

    iou_scores, conf_scores, matches = [], [], []
    for i, (preds, gt) in enumerate(zip(parsed, gts)):
        if preds is None:
            iou_scores.append(0.0)
            conf_scores.append(0.0)
            matches.append(None)
            continue
        num_p, num_g = len(preds), gt.boxes.shape[0]
        if num_p == 0:
            both_empty = 0.0 if compat else 1.0
            iou_scores.append(both_empty if num_g == 0 else 0.0)
            conf_scores.append(both_empty if num_g == 0 else 0.0)
            matches.append(torch.zeros(0, dtype=torch.long))
            continue
        if num_g == 0:
            match = torch.full((num_p,), -1, dtype=torch.long)
            iou = torch.zeros(num_p, 0, dtype=torch.float64)
        else:
            iou = ious[i, :num_p, :num_g].to(torch.float64)
            if match_categories:
                same = torch.tensor(
                    [[normalize_label(p.label) == normalize_label(c) for c in gt.categories] for p in preds],
                    dtype=torch.bool,
                )
                iou = torch.where(same, iou, torch.zeros_like(iou))
            match = match_fn(iou, iou_threshold)
        matched = match >= 0
        total_iou = float(iou[matched.nonzero().flatten(), match[matched]].sum()) if bool(matched.any()) else 0.0
        iou_scores.append(min(max(total_iou / max(num_g, num_p), 0.0), 1.0))
        conf = torch.tensor([p.confidence for p in preds], dtype=torch.float64)
        per_pred = torch.where(matched, conf, 1.0 - conf)
        conf_scores.append(min(max(float(per_pred.mean()), 0.0), 1.0))
        matches.append(match)
    return DetectionScores(iou=iou_scores, confidence=conf_scores, reasons=reasons, matches=matches)


@register_reward("iou", min_score=0.0, max_score=1.0)
def detection_iou_reward(
    completions: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
    **options: Any,
) -> RewardOutput:
    """Detection IoU reward in [0, 1]; options as ``compute_detection_scores``."""
    s = compute_detection_scores(completions, ground_truths, **options)
    return build_reward_output(s.iou, s.reasons)


@register_reward("confidence", min_score=0.0, max_score=1.0)
def detection_confidence_reward(
    completions: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
    **options: Any,
) -> RewardOutput:
    """Detection confidence reward in [0, 1]; options as ``compute_detection_scores``."""
    s = compute_detection_scores(completions, ground_truths, **options)
    return build_reward_output(s.confidence, s.reasons)
