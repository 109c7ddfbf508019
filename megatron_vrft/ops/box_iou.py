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
from collections.abc import Callable

import torch

from megatron_vrft.ops.box_iou_reference import (  # noqa: F401  (re-exported: part of this op's API)
    BoxIouMode,
    box_iou_elementwise_reference,
    box_iou_pairwise_reference,
    pairwise_batch_shape,
)

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
            register_box_iou_impl("cuda", cuda_ext.box_iou_pairwise, cuda_ext.box_iou_elementwise, cuda_ext.supports)


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
