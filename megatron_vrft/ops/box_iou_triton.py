"""Triton box IoU / GIoU kernels: pairwise ``(B, N, M)`` with padding masks, and elementwise.

Semantics are exactly those of ``megatron_vrft.ops.box_iou`` (the torch reference is the oracle):
boxes ``(x1, y1, x2, y2)``, degenerate boxes have zero area, a zero union gives IoU 0, GIoU falls
back to IoU when the enclosing box is degenerate, padded pairs are 0. Inputs may be fp32, bf16 or
fp16 (any mix); they are loaded and upcast to fp32 in registers, so the output is fp32, like the
reference's ``promote_types(dtype, float32)``. float64 inputs go to the torch reference (the kernel
computes in fp32 only).

No autograd: rewards and evaluation never backpropagate through IoU, so the output does not
require grad even when the inputs do (use ``impl="torch"`` for a differentiable IoU).

The kernels are memory bound on the output write (4 bytes per pair); each program computes a
``BLOCK_N x BLOCK_M`` tile with 4 strided coordinate loads per box, stores coalesced along M.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megatron_vrft.ops.box_iou_reference import (
    box_iou_elementwise_reference,
    box_iou_pairwise_reference,
    pairwise_batch_shape,
)

_MODE_CODES = {"iou": 0, "giou": 1}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _iou_giou_tile(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, GIOU: tl.constexpr):
    """IoU/GIoU of broadcastable fp32 coordinate blocks; mirrors ``_iou_giou_from_corners``."""
    area_a = tl.maximum(ax2 - ax1, 0.0) * tl.maximum(ay2 - ay1, 0.0)
    area_b = tl.maximum(bx2 - bx1, 0.0) * tl.maximum(by2 - by1, 0.0)
    iw = tl.maximum(tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1), 0.0)
    ih = tl.maximum(tl.minimum(ay2, by2) - tl.maximum(ay1, by1), 0.0)
    inter = iw * ih
    union = area_a + area_b - inter
    # Divide by a safe denominator so masked-out lanes never produce inf/NaN.
    iou = tl.where(union > 0.0, inter / tl.where(union > 0.0, union, 1.0), 0.0)
    if GIOU:
        ew = tl.maximum(tl.maximum(ax2, bx2) - tl.minimum(ax1, bx1), 0.0)
        eh = tl.maximum(tl.maximum(ay2, by2) - tl.minimum(ay1, by1), 0.0)
        enclosing = ew * eh
        safe = tl.where(enclosing > 0.0, enclosing, 1.0)
        iou = iou - tl.where(enclosing > 0.0, (enclosing - union) / safe, 0.0)
    return iou


@triton.jit
def _box_iou_pairwise_kernel(
    boxes1_ptr,  # (B, N, 4) contiguous
    boxes2_ptr,  # (B, M, 4) contiguous
    valid1_ptr,  # (B, N) int8, read only when HAS_VALID1
    valid2_ptr,  # (B, M) int8, read only when HAS_VALID2
    out_ptr,  # (B, N, M) fp32
    N,
    M,
    GIOU: tl.constexpr,
    HAS_VALID1: tl.constexpr,
    HAS_VALID2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Axis 0 enumerates (batch, row tile): grid axes 1 and 2 are capped at 65535 on CUDA.
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_b = (tl.program_id(0) // num_n_tiles).to(tl.int64)
    pid_n = tl.program_id(0) % num_n_tiles
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M

    a_ptr = boxes1_ptr + pid_b * N * 4 + offs_n * 4
    b_ptr = boxes2_ptr + pid_b * M * 4 + offs_m * 4
    ax1 = tl.load(a_ptr + 0, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    ay1 = tl.load(a_ptr + 1, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    ax2 = tl.load(a_ptr + 2, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    ay2 = tl.load(a_ptr + 3, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    bx1 = tl.load(b_ptr + 0, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    by1 = tl.load(b_ptr + 1, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    bx2 = tl.load(b_ptr + 2, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    by2 = tl.load(b_ptr + 3, mask=mask_m, other=0.0).to(tl.float32)[None, :]

    out = _iou_giou_tile(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, GIOU)
    if HAS_VALID1:
        v1 = tl.load(valid1_ptr + pid_b * N + offs_n, mask=mask_n, other=0)
        out = tl.where(v1[:, None] != 0, out, 0.0)
    if HAS_VALID2:
        v2 = tl.load(valid2_ptr + pid_b * M + offs_m, mask=mask_m, other=0)
        out = tl.where(v2[None, :] != 0, out, 0.0)

    out_offs = pid_b * N * M + offs_n[:, None].to(tl.int64) * M + offs_m[None, :]
    tl.store(out_ptr + out_offs, out, mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _box_iou_elementwise_kernel(
    boxes1_ptr,  # (P, 4) contiguous
    boxes2_ptr,  # (P, 4) contiguous
    out_ptr,  # (P,) fp32
    P,
    GIOU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    a_ptr = boxes1_ptr + offs * 4
    b_ptr = boxes2_ptr + offs * 4
    ax1 = tl.load(a_ptr + 0, mask=mask, other=0.0).to(tl.float32)
    ay1 = tl.load(a_ptr + 1, mask=mask, other=0.0).to(tl.float32)
    ax2 = tl.load(a_ptr + 2, mask=mask, other=0.0).to(tl.float32)
    ay2 = tl.load(a_ptr + 3, mask=mask, other=0.0).to(tl.float32)
    bx1 = tl.load(b_ptr + 0, mask=mask, other=0.0).to(tl.float32)
    by1 = tl.load(b_ptr + 1, mask=mask, other=0.0).to(tl.float32)
    bx2 = tl.load(b_ptr + 2, mask=mask, other=0.0).to(tl.float32)
    by2 = tl.load(b_ptr + 3, mask=mask, other=0.0).to(tl.float32)
    out = _iou_giou_tile(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, GIOU)
    tl.store(out_ptr + offs, out, mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports_box_iou_triton(t: torch.Tensor) -> bool:
    """True where the kernels can run: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    return t.is_cuda or (t.device.type == "cpu" and _interpreting())


def _kernel_input(boxes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcast to ``shape`` and make contiguous in a dtype the kernel loads (upcast otherwise)."""
    if boxes.dtype not in _KERNEL_DTYPES:
        boxes = boxes.to(torch.float32)
    return boxes.expand(shape).contiguous()


def _check_boxes(boxes1: torch.Tensor, boxes2: torch.Tensor, min_dim: int) -> None:
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if b.dim() < min_dim or b.shape[-1] != 4:
            raise ValueError(f"{name} must have shape (..., 4) with >= {min_dim} dims, got {tuple(b.shape)}")
    if boxes1.device != boxes2.device:
        raise ValueError(f"boxes on different devices: {boxes1.device} vs {boxes2.device}")


def box_iou_pairwise_triton(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    mode: str = "iou",
    valid1: torch.Tensor | None = None,
    valid2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``boxes1 (..., N, 4)``, ``boxes2 (..., M, 4)`` -> ``(..., N, M)`` fp32; masks ``(..., N)``/``(..., M)``."""

    _check_boxes(boxes1, boxes2, 2)
    if torch.float64 in (boxes1.dtype, boxes2.dtype):
        return box_iou_pairwise_reference(boxes1, boxes2, mode, valid1, valid2)
    n, m = boxes1.shape[-2], boxes2.shape[-2]
    batch, num_batch = pairwise_batch_shape(boxes1, boxes2, valid1, valid2)
    out = torch.empty((*batch, n, m), dtype=torch.float32, device=boxes1.device)
    if out.numel() == 0:
        return out
    a = _kernel_input(boxes1, (*batch, n, 4))
    b = _kernel_input(boxes2, (*batch, m, 4))
    v1 = None if valid1 is None else valid1.to(torch.int8).expand((*batch, n)).contiguous()
    v2 = None if valid2 is None else valid2.to(torch.int8).expand((*batch, m)).contiguous()
    # Big tiles under the interpreter: its cost is per program, not per element.
    block_n, block_m = (64, 64) if _interpreting() else (16, 128)
    grid = (num_batch * triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _box_iou_pairwise_kernel[grid](
        a,
        b,
        a if v1 is None else v1,
        b if v2 is None else v2,
        out,
        n,
        m,
        GIOU=_MODE_CODES[mode],
        HAS_VALID1=v1 is not None,
        HAS_VALID2=v2 is not None,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        num_warps=4,
    )
    return out


def box_iou_elementwise_triton(boxes1: torch.Tensor, boxes2: torch.Tensor, mode: str = "iou") -> torch.Tensor:
    """``boxes1 (..., 4)``, ``boxes2 (..., 4)`` (broadcastable) -> ``(...)`` fp32."""

    _check_boxes(boxes1, boxes2, 1)
    if torch.float64 in (boxes1.dtype, boxes2.dtype):
        return box_iou_elementwise_reference(boxes1, boxes2, mode)
    shape = torch.broadcast_shapes(boxes1.shape, boxes2.shape)
    out = torch.empty(shape[:-1], dtype=torch.float32, device=boxes1.device)
    if out.numel() == 0:
        return out
    a = _kernel_input(boxes1, shape)
    b = _kernel_input(boxes2, shape)
    num_pairs = out.numel()
    block = 1024
    _box_iou_elementwise_kernel[(triton.cdiv(num_pairs, block),)](
        a,
        b,
        out,
        num_pairs,
        GIOU=_MODE_CODES[mode],
        BLOCK=block,
        num_warps=4,
    )
    return out


def compile_specs() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """``(jit_function, signature, constexprs)`` for the AOT compile test.

    Every constexpr branch in fp32, plus the low-precision loads once each; the launch block sizes.
    """
    specs = []
    pairwise = [("fp32", g, v) for g in (0, 1) for v in (False, True)]
    pairwise += [("bf16", 1, True), ("fp16", 0, False)]
    for dtype, giou, has_valid in pairwise:
        constexprs = {
            "GIOU": giou,
            "HAS_VALID1": has_valid,
            "HAS_VALID2": has_valid,
            "BLOCK_N": 16,
            "BLOCK_M": 128,
        }
        signature = {
            "boxes1_ptr": f"*{dtype}",
            "boxes2_ptr": f"*{dtype}",
            "valid1_ptr": "*i8",
            "valid2_ptr": "*i8",
            "out_ptr": "*fp32",
            "N": "i32",
            "M": "i32",
            **{k: "constexpr" for k in constexprs},
        }
        specs.append((_box_iou_pairwise_kernel, signature, constexprs))
    for dtype, giou in (("fp32", 0), ("fp32", 1), ("bf16", 1)):
        constexprs = {"GIOU": giou, "BLOCK": 1024}
        signature = {
            "boxes1_ptr": f"*{dtype}",
            "boxes2_ptr": f"*{dtype}",
            "out_ptr": "*fp32",
            "P": "i32",
            **{k: "constexpr" for k in constexprs},
        }
        specs.append((_box_iou_elementwise_kernel, signature, constexprs))
    return specs
