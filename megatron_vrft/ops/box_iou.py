"""Box IoU / GIoU: pairwise ``(..., N, M)`` and elementwise ``(...,)``.

Boxes are ``(x1, y1, x2, y2)`` in any one coordinate space. Degenerate boxes (zero or negative
width/height) have zero area; a pair whose union is zero has IoU 0 (never NaN), and GIoU falls back
to IoU when the enclosing box is degenerate too.

This module is the single entry point the rewards and the evaluation use. ``impl="auto"`` picks a
fused kernel when one is registered for the tensors' device (see ``register_box_iou_impl``) and the
torch reference otherwise; the reference is the test oracle for every kernel. The built-in kernels
register lazily on first use: ``"triton"`` (``box_iou_triton``; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) when triton imports, then ``"cuda"`` (the optional compiled extension
``megatron_vrft_cuda``; CUDA tensors) when it is built. Kernels have no autograd, so ``"auto"`` uses
the differentiable reference whenever an input requires grad under ``torch.is_grad_enabled()``.

Formulas (``A``, ``B`` boxes; ``C`` their smallest enclosing box)::

    IoU  = |A ∩ B| / |A ∪ B|
    GIoU = IoU - (|C| - |A ∪ B|) / |C|
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal

import torch

BoxIouMode = Literal["iou", "giou"]

# Fused implementations register here: name -> (pairwise_fn, elementwise_fn, supports(tensor) -> bool).
# A registry owned by the module (not mutated at import time by this module) keeps kernels optional.
_IMPLS: dict[str, tuple[Callable, Callable, Callable[[torch.Tensor], bool]]] = {}


def register_box_iou_impl(
    name: str,
    pairwise_fn: Callable,
    elementwise_fn: Callable,
    supports: Callable[[torch.Tensor], bool],
) -> None:
    """Register a fused implementation; raises on a duplicate name."""
    if name in _IMPLS or name == "torch":
        raise ValueError(f"box IoU implementation {name!r} is already registered")
    _IMPLS[name] = (pairwise_fn, elementwise_fn, supports)


def available_box_iou_impls() -> list[str]:
    _register_builtin_impls()
    return ["torch", *_IMPLS]


def _area(boxes: torch.Tensor) -> torch.Tensor:
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _iou_giou_from_corners(
    a: torch.Tensor, b: torch.Tensor, mode: BoxIouMode
) -> torch.Tensor:
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


def box_iou_elementwise_reference(
    boxes1: torch.Tensor, boxes2: torch.Tensor, mode: BoxIouMode = "iou"
) -> torch.Tensor:
    """Torch reference. ``boxes1 (..., 4)``, ``boxes2 (..., 4)`` (broadcastable) -> ``(...)``."""
    dtype = torch.promote_types(torch.promote_types(boxes1.dtype, boxes2.dtype), torch.float32)
    return _iou_giou_from_corners(boxes1.to(dtype), boxes2.to(dtype), mode)


@functools.cache  # one attempt per process: a failed import is not cached by Python
def _register_builtin_impls() -> None:
    """Register the in-tree kernels once, if their backends import (both are optional)."""
    if "triton" not in _IMPLS:
        try:
            from megatron_vrft.ops import box_iou_triton
        except ImportError:
            pass
        else:
            register_box_iou_impl(
                "triton",
                box_iou_triton.box_iou_pairwise_triton,
                box_iou_triton.box_iou_elementwise_triton,
                box_iou_triton.supports_box_iou_triton,
            )
    if "cuda" not in _IMPLS:
        from megatron_vrft.ops import cuda_ext

        if cuda_ext.is_available():
            register_box_iou_impl(
                "cuda", cuda_ext.box_iou_pairwise, cuda_ext.box_iou_elementwise, cuda_ext.supports
            )


def _pick(impl: str, t: torch.Tensor, needs_grad: bool = False) -> tuple[Callable, Callable] | None:
    if impl == "torch":
        return None
    _register_builtin_impls()
    if impl == "auto":
        if needs_grad and torch.is_grad_enabled():
            return None
        for pairwise_fn, elementwise_fn, supports in _IMPLS.values():
            if supports(t):
                return pairwise_fn, elementwise_fn
        return None
    if impl not in _IMPLS:
        raise ValueError(f"unknown box IoU impl {impl!r}; available: {available_box_iou_impls()}")
    pairwise_fn, elementwise_fn, _ = _IMPLS[impl]
    return pairwise_fn, elementwise_fn


def box_iou(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    mode: BoxIouMode = "iou",
    valid1: torch.Tensor | None = None,
    valid2: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Pairwise IoU/GIoU ``(..., N, 4) x (..., M, 4) -> (..., N, M)``; see module docstring."""
    if mode not in ("iou", "giou"):
        raise ValueError(f"mode must be 'iou' or 'giou', got {mode!r}")
    fns = _pick(impl, boxes1, boxes1.requires_grad or boxes2.requires_grad)
    if fns is None:
        return box_iou_pairwise_reference(boxes1, boxes2, mode, valid1, valid2)
    return fns[0](boxes1, boxes2, mode, valid1, valid2)


def box_iou_elementwise(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    mode: BoxIouMode = "iou",
    impl: str = "auto",
) -> torch.Tensor:
    """Elementwise IoU/GIoU ``(..., 4) x (..., 4) -> (...)``; see module docstring."""
    if mode not in ("iou", "giou"):
        raise ValueError(f"mode must be 'iou' or 'giou', got {mode!r}")
    fns = _pick(impl, boxes1, boxes1.requires_grad or boxes2.requires_grad)
    if fns is None:
        return box_iou_elementwise_reference(boxes1, boxes2, mode)
    return fns[1](boxes1, boxes2, mode)
