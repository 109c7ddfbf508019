"""Loader for the optional compiled extension ``megatron_vrft_cuda`` (sources in ``kernels/``).

setup.py builds it only where a CUDA toolkit and a CUDA build of torch both exist. Importing the
extension runs its static initialisers, which register ops under ``torch.ops.megatron_vrft``
(``TORCH_LIBRARY_FRAGMENT`` in each ``kernels/*.cu``). Everything here degrades to
``is_available() == False`` without it; callers then use Triton or the torch references.
"""

from __future__ import annotations

import importlib

import torch

from megatron_vrft.ops.box_iou_reference import (
    box_iou_elementwise_reference,
    box_iou_pairwise_reference,
    pairwise_batch_shape,
)


def _load():
    try:
        return importlib.import_module("megatron_vrft_cuda")
    except ImportError:
        return None


# Set once at import; the extension cannot appear or vanish while the process runs.
_EXTENSION = _load()


def is_built() -> bool:
    """True when the compiled extension imported (it may still have no GPU to run on)."""
    return _EXTENSION is not None


def is_available() -> bool:
    """True when the extension is built, its box IoU op is registered, and CUDA is usable."""
    return (
        _EXTENSION is not None
        and hasattr(torch.ops, "megatron_vrft")
        and hasattr(torch.ops.megatron_vrft, "box_iou_pairwise")
        and torch.cuda.is_available()
    )


def supports(t: torch.Tensor) -> bool:
    """The extension's kernels take CUDA tensors only."""
    return t.is_cuda


def _as_fp32(boxes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = boxes.to(torch.float32).expand(shape).contiguous()
    # The kernels read each box as one float4: a view at an odd offset needs a fresh allocation.
    return out if out.data_ptr() % 16 == 0 else out.clone()


def box_iou_pairwise(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    mode: str = "iou",
    valid1: torch.Tensor | None = None,
    valid2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(..., N, 4) x (..., M, 4) -> (..., N, M)`` fp32 via the CUDA kernel; semantics of ``box_iou``."""

    if torch.float64 in (boxes1.dtype, boxes2.dtype):
        return box_iou_pairwise_reference(boxes1, boxes2, mode, valid1, valid2)
    n, m = boxes1.shape[-2], boxes2.shape[-2]
    batch, num_batch = pairwise_batch_shape(boxes1, boxes2, valid1, valid2)
    a = _as_fp32(boxes1, (*batch, n, 4)).view(num_batch, n, 4)
    b = _as_fp32(boxes2, (*batch, m, 4)).view(num_batch, m, 4)
    v1 = None if valid1 is None else valid1.to(torch.bool).expand((*batch, n)).reshape(num_batch, n)
    v2 = None if valid2 is None else valid2.to(torch.bool).expand((*batch, m)).reshape(num_batch, m)
    out = torch.ops.megatron_vrft.box_iou_pairwise(a, b, v1, v2, mode == "giou")
    return out.view(*batch, n, m)


def box_iou_elementwise(boxes1: torch.Tensor, boxes2: torch.Tensor, mode: str = "iou") -> torch.Tensor:
    """``(..., 4) x (..., 4) -> (...)`` fp32 via the CUDA kernel; semantics of ``box_iou_elementwise``."""

    if torch.float64 in (boxes1.dtype, boxes2.dtype):
        return box_iou_elementwise_reference(boxes1, boxes2, mode)
    shape = torch.broadcast_shapes(boxes1.shape, boxes2.shape)
    a = _as_fp32(boxes1, shape).view(-1, 4)
    b = _as_fp32(boxes2, shape).view(-1, 4)
    out = torch.ops.megatron_vrft.box_iou_elementwise(a, b, mode == "giou")
    return out.view(shape[:-1])
