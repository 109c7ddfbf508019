"""Grounding rewards: one predicted box against one ground-truth box (reasoning grounding, RefCOCO).

The answer must hold exactly one box: any form ``parsing.parse_boxes`` accepts (a bare
``[x1, y1, x2, y2]``, ``{"bbox_2d": [...]}``, a one-element Visual-RFT list) or Qwen2-VL's
``(x1,y1),(x2,y2)``. The box is converted from ``pred_space`` into the ground truth's
``coord_space`` (see ``coords``) before scoring. Registered rewards:

=========================  ===============  ===============  =================================
name                       range            failure score    value
=========================  ===============  ===============  =================================
``grounding_iou``          [0, 1]           0                IoU
``grounding_giou``         [-1, 1]          -1               GIoU
``grounding_giou_shifted`` [0, 2]           0                GIoU + 1
=========================  ===============  ===============  =================================

A parse failure scores the *minimum* of the range, never more than the worst real box: with raw
GIoU a failure scoring 0 would beat every disjoint box (GIoU < 0) and teach the model to emit junk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron_vrft.ops.box_iou import box_iou_elementwise
from megatron_vrft.rewards.coords import ModelCoordSpace, convert_boxes
from megatron_vrft.rewards.parsing import MAX_COMPLETION_CHARS, extract_answer, parse_single_box
from megatron_vrft.rewards.registry import register_reward
from megatron_vrft.rewards.types import (
    GroundTruth,
    RewardOutput,
    as_ground_truths,
    build_reward_output,
    check_model_space,
)

GroundingMetric = Literal["iou", "giou", "giou_shifted"]


@dataclass(kw_only=True)
class GroundingScores:
    """All grounding values of a batch (``B`` completions); failures hold each metric's minimum."""

    iou: torch.Tensor
    """``(B,)`` float32 IoU in [0, 1]."""
    giou: torch.Tensor
    """``(B,)`` float32 GIoU in [-1, 1]."""
    giou_shifted: torch.Tensor
    """``(B,)`` float32 GIoU + 1 in [0, 2]."""
    reasons: list[str | None]
    """``(B,)`` failure reason per completion, ``None`` where a single box parsed."""

    def output(self, metric: GroundingMetric) -> RewardOutput:
        return build_reward_output(getattr(self, metric).tolist(), self.reasons)


def compute_grounding_scores(
    completions: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
    *,
    pred_space: ModelCoordSpace | None = None,
    max_chars: int = MAX_COMPLETION_CHARS,
) -> GroundingScores:
    """IoU / GIoU / GIoU+1 of the single predicted box vs ``ground_truth.box``, for a batch.

    ``pred_space``: space the prompt asked for (``None``: the ground truth's ``coord_space``).
    """
    gts = as_ground_truths(ground_truths, len(completions))
    for i, g in enumerate(gts):
        if g.box is None:
            raise ValueError(f"{g.where(i)}.box: grounding rewards need one box (4,)")
        check_model_space(g, i)
        convert_boxes(  # fail on missing image sizes now, whatever the completions are
            g.box,
            pred_space or g.coord_space,
            g.coord_space,
            image_size=g.image_size,
            resized_size=g.resized_size,
        )
    b = len(gts)
    pred = torch.zeros(b, 4, dtype=torch.float64)
    truth = torch.zeros(b, 4, dtype=torch.float64)
    ok = torch.zeros(b, dtype=torch.bool)
    reasons: list[str | None] = []
    for i, (text, gt) in enumerate(zip(completions, gts)):
        answer, reason = extract_answer(text, max_chars=max_chars)
        box = None
        if reason is None:
            box, reason = parse_single_box(answer)
        reasons.append(None if reason is None else reason.value)
        truth[i] = torch.from_numpy(gt.box)
        if box is not None:
            pred[i] = convert_boxes(
                torch.tensor(box, dtype=torch.float64),
                pred_space or gt.coord_space,
                gt.coord_space,
                image_size=gt.image_size,
                resized_size=gt.resized_size,
            )
            ok[i] = True
    iou = torch.zeros(b, dtype=torch.float64)
    giou = torch.full((b,), -1.0, dtype=torch.float64)
    if bool(ok.any()):
        # rounding can step a hair outside the ranges
        iou[ok] = box_iou_elementwise(pred[ok], truth[ok], mode="iou").to(torch.float64).clamp(0.0, 1.0)
        giou[ok] = box_iou_elementwise(pred[ok], truth[ok], mode="giou").to(torch.float64).clamp(-1.0, 1.0)
    return GroundingScores(iou=iou.float(), giou=giou.float(), giou_shifted=(giou + 1.0).float(), reasons=reasons)


@register_reward("grounding_iou", min_score=0.0, max_score=1.0, failure_score=0.0)
def grounding_iou_reward(
    completions: Sequence[str], ground_truths: Sequence[GroundTruth | Mapping[str, Any]], **options: Any
) -> RewardOutput:
    """IoU of the single predicted box, in [0, 1]."""
    return compute_grounding_scores(completions, ground_truths, **options).output("iou")


@register_reward("grounding_giou", min_score=-1.0, max_score=1.0, failure_score=-1.0)
def grounding_giou_reward(
    completions: Sequence[str], ground_truths: Sequence[GroundTruth | Mapping[str, Any]], **options: Any
) -> RewardOutput:
    """GIoU of the single predicted box, in [-1, 1]; a parse failure scores -1."""
    return compute_grounding_scores(completions, ground_truths, **options).output("giou")


@register_reward("grounding_giou_shifted", min_score=0.0, max_score=2.0, failure_score=0.0)
def grounding_giou_shifted_reward(
    completions: Sequence[str], ground_truths: Sequence[GroundTruth | Mapping[str, Any]], **options: Any
) -> RewardOutput:
    """GIoU + 1 of the single predicted box, in [0, 2]; a parse failure scores 0."""
    return compute_grounding_scores(completions, ground_truths, **options).output("giou_shifted")
