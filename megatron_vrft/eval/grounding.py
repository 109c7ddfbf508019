"""Reasoning-grounding metrics (LISA protocol on boxes).

- ``mIoU`` (LISA's gIoU): mean over samples of per-sample IoU.
- ``cIoU``: cumulative intersection / cumulative union over the whole set (large objects weigh more).
- ``Acc@t``: fraction of samples with IoU > t.
- ``mGIoU``: mean generalized IoU (Rezatofighi et al. 2019, in [-1, 1]; not LISA's "gIoU", which
  is ``mIoU`` above): unlike IoU it still ranks predictions that miss the object by how far off
  they are, the signal the GIoU grounding reward trains on.
A sample without a parsable prediction has IoU 0, GIoU -1 (the worst value of each) and adds its
ground-truth area to the union.
"""

from __future__ import annotations

import torch

from megatron_vrft.ops.box_iou import box_iou_elementwise


def compute_grounding_metrics(
    pred_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    pred_valid: torch.Tensor | None = None,
    thresholds: tuple[float, ...] = (0.5,),
) -> dict[str, float]:
    """``pred_boxes (N, 4)``, ``gt_boxes (N, 4)``, ``pred_valid (N,)`` bool (False: no prediction)."""
    if pred_boxes.shape != gt_boxes.shape or pred_boxes.ndim != 2 or pred_boxes.shape[-1] != 4:
        raise ValueError(f"expected two (N, 4) tensors, got {tuple(pred_boxes.shape)} and {tuple(gt_boxes.shape)}")
    n = gt_boxes.shape[0]
    if n == 0:
        raise ValueError("compute_grounding_metrics needs at least one sample")
    pred = pred_boxes.double()
    gt = gt_boxes.double()
    valid = torch.ones(n, dtype=torch.bool) if pred_valid is None else pred_valid.bool()
    iou = torch.where(valid, box_iou_elementwise(pred, gt, "iou", impl="torch"), 0.0)
    giou = torch.where(valid, box_iou_elementwise(pred, gt, "giou", impl="torch"), -1.0)
    wh = (torch.minimum(pred[:, 2:], gt[:, 2:]) - torch.maximum(pred[:, :2], gt[:, :2])).clamp(min=0)
    inter = torch.where(valid, wh[:, 0] * wh[:, 1], 0.0)
    area = lambda b: (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)  # noqa: E731
    union = torch.where(valid, area(pred) + area(gt) - inter, area(gt))
    out = {
        "mIoU": float(iou.mean()),
        "mGIoU": float(giou.mean()),
        "cIoU": float(inter.sum() / union.sum().clamp(min=1e-12)),
        "num_samples": float(n),
        "num_unparsed": float((~valid).sum()),
    }
    for t in thresholds:
        out[f"Acc@{t:g}"] = float((iou > t).double().mean())
    return out
