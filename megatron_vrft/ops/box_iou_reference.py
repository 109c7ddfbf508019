"""Box IoU / GIoU torch references: the formulas (see :mod:`megatron_vrft.ops.box_iou`) and the
oracle every kernel is tested against; the kernels also fall back to them for shapes they do not
take. Kept apart from the dispatcher so that kernels import them without importing it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

BoxIouMode = Literal["iou", "giou"]


def _area(boxes: torch.Tensor) -> torch.Tensor:
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _iou_giou_from_corners(a: torch.Tensor, b: torch.Tensor, mode: BoxIouMode) -> torch.Tensor:
    """``a`` and ``b`` broadcast against each other, last dim 4."""
    area_a = _area(a)
    area_b = _area(b)
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)
    if mode == "iou":
        return iou
    enc_lt = torch.minimum(a[..., :2], b[..., :2])
    enc_rb = torch.maximum(a[..., 2:], b[..., 2:])
    enc_wh = (enc_rb - enc_lt).clamp(min=0)
    enclosing = enc_wh[..., 0] * enc_wh[..., 1]
    penalty = torch.where(
        enclosing > 0,
        (enclosing - union) / enclosing.clamp(min=torch.finfo(enclosing.dtype).tiny),
        0.0,
    )
    return iou - penalty


def pairwise_batch_shape(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    valid1: torch.Tensor | None = None,
    valid2: torch.Tensor | None = None,
) -> tuple[torch.Size, int]:
    """Broadcast batch shape ``(...)`` of a pairwise call and its element count (for kernels that
    flatten the batch): ``boxes (..., N, 4)``, ``(..., M, 4)``, masks ``(..., N)``, ``(..., M)``."""
    shapes = [boxes1.shape[:-2], boxes2.shape[:-2]]
    shapes += [v.shape[:-1] for v in (valid1, valid2) if v is not None]
    batch = torch.broadcast_shapes(*shapes)
    return batch, math.prod(batch)


def box_iou_pairwise_reference(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    mode: BoxIouMode = "iou",
    valid1: torch.Tensor | None = None,
    valid2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference. ``boxes1 (..., N, 4)``, ``boxes2 (..., M, 4)`` -> ``(..., N, M)``.

    ``valid1 (..., N)`` / ``valid2 (..., M)`` are boolean padding masks; pairs with a padded box are 0.
    Computes in the inputs' dtype promoted to at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(boxes1.dtype, boxes2.dtype), torch.float32)
    a = boxes1.to(dtype).unsqueeze(-2)  # (..., N, 1, 4)
    b = boxes2.to(dtype).unsqueeze(-3)  # (..., 1, M, 4)
    out = _iou_giou_from_corners(a, b, mode)
    if valid1 is not None or valid2 is not None:
        mask = torch.ones(out.shape, dtype=torch.bool, device=out.device)
        if valid1 is not None:
            mask = mask & valid1.unsqueeze(-1)
        if valid2 is not None:
            mask = mask & valid2.unsqueeze(-2)
        out = out.masked_fill(~mask, 0.0)
    return out


def box_iou_elementwise_reference(boxes1: torch.Tensor, boxes2: torch.Tensor, mode: BoxIouMode = "iou") -> torch.Tensor:
    """Torch reference. ``boxes1 (..., 4)``, ``boxes2 (..., 4)`` (broadcastable) -> ``(...)``."""
    dtype = torch.promote_types(torch.promote_types(boxes1.dtype, boxes2.dtype), torch.float32)
    return _iou_giou_from_corners(boxes1.to(dtype), boxes2.to(dtype), mode)
