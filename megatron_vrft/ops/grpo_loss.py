"""Fused GRPO loss: ratio, clip-low/high, dual-clip, KL penalty, masking and aggregation in one pass.

Semantics are exactly those of ``megatron_vrft.rl.loss.compute_grpo_loss`` (same argument names;
that function is the test oracle), per token::

    log_r = clamp(logp - old_logp, +-log_ratio_clamp), r = exp(log_r)
    pg    = max(-A r, -A clip(r, 1 - clip_eps_low, 1 + clip_eps_high))      ppo_clip
            min(pg_ppo_clip, -A clip_ratio_c) where A < 0                     dual_clip
            -A   (gradient -A: r = exp(logp - stopgrad(logp)))              visual_rft_unclipped
    d     = clamp(logp - ref_logp, +-log_ratio_clamp)
    kl    = clamp(k(d), +-kl_clamp),  k1 = d, k2 = d^2/2, k3 = exp(-d) + d - 1
    L     = pg + kl_coef * kl

then ``loss = aggregate(L, response_mask, loss_agg_mode)`` (token-mean, seq-mean-token-mean,
seq-mean-token-sum, seq-mean-token-sum-norm; fully masked rows are not counted as sequences).

Design (memory bound, so count bytes): three launches.

1. Forward, grid ``(B, cdiv(T, BLOCK_T))``: reads each input once; writes the per-token loss, the
   per-token gradient ``m * dL/dlogp`` (fp32, saved for backward) and, per ``(row, block)``, 10
   partial sums (valid count, pg, kl, clip/dual counts, approx-KL, ratio sum/min/max).
2. Reduction, one program over ``(B, num_blocks, 10)`` floats: every aggregation mode is
   ``loss = sum_b r_b * rowsum_b(m L) / den`` with a row-local ``r_b`` (1, ``1/n_b`` or ``1/L``) and
   ``den`` the token count, the valid-sequence count or ``normalizer``; writes the loss, the metrics,
   ``r_b`` and ``1/den``. No host-side torch ops, no host sync (a tensor ``normalizer`` is read on
   the device).
3. Backward, grid ``(B, cdiv(T, BLOCK_T))``: reads the saved gradient once and writes
   ``grad_logp = m * dL/dlogp * r_b / den * grad_out`` in the log-probs' dtype.

Gradients flow only to ``log_probs``; old/ref log-probs and advantages are constants.

Inputs are loaded and upcast to fp32 in registers (bf16 arithmetic is wrong under the Triton
interpreter), stores cast to the output dtype. This module holds the kernels only: the one torch
implementation of the loss is ``megatron_vrft.rl.compute_grpo_loss``, which dispatches here
(``impl="auto"``: Triton on CUDA tensors or under ``TRITON_INTERPRET=1`` for the options the kernel
has; the torch reference otherwise, e.g. float64, GSPO/CISPO, token weights) and is the oracle of
the tests.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

POLICY_LOSS_CODES = {"ppo_clip": 0, "dual_clip": 1, "visual_rft_unclipped": 2}
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}  # 0: no reference log-probs given
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
METRIC_NAMES = (
    "clip_frac_low",
    "clip_frac_high",
    "clip_frac",
    "dual_clip_frac",
    "approx_kl",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "pg_loss",
    "kl_loss",
)
_REDUCE_BLOCK_B = 64  # rows per iteration of the single-program reduction
_NUM_STATS = 10  # m, m*pg, m*kl, low, high, dual, m*approx_kl, m*ratio, ratio_min, ratio_max
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class GrpoLossOutput(NamedTuple):
    """Output of ``fused_grpo_loss`` (same fields as ``megatron_vrft.rl.PolicyLossResult``)."""

    loss: torch.Tensor
    """Scalar fp32 (fp64 on the torch path for fp64 inputs) loss; differentiable w.r.t. log_probs."""
    per_token_loss: torch.Tensor | None
    """``(B, T)`` fp32 per-token loss ``L`` before masking (not differentiable); ``None`` with
    ``return_per_token_loss=False`` (saves a 4-byte-per-token write)."""
    metrics: dict[str, torch.Tensor]
    """Detached scalars: see ``METRIC_NAMES`` (``kl_loss`` only with ref log-probs)."""


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _k3(d):
    """``exp(-d) + d - 1``; a Taylor series near 0 avoids fp32 cancellation (rel. err < 1e-7)."""
    series = (
        d
        * d
        * (
            0.5
            + d
            * (
                -0.16666666666666666
                + d
                * (
                    0.041666666666666664
                    + d
                    * (
                        -0.008333333333333333
                        + d * (0.001388888888888889 + d * (-0.0001984126984126984 + d * 2.48015873015873e-05))
                    )
                )
            )
        )
    )
    return tl.where(tl.abs(d) < 0.5, series, tl.exp(-d) + d - 1.0)


@triton.jit
def _one_minus_exp_neg(d):
    """``1 - exp(-d)`` (the derivative of k3), with the same near-0 series treatment."""
    series = d * (
        1.0
        + d
        * (
            -0.5
            + d
            * (
                0.16666666666666666
                + d
                * (
                    -0.041666666666666664
                    + d * (0.008333333333333333 + d * (-0.001388888888888889 + d * 0.0001984126984126984))
                )
            )
        )
    )
    return tl.where(tl.abs(d) < 0.5, series, 1.0 - tl.exp(-d))


@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr,  # (B, T), row stride stride_logp, unit column stride
    old_ptr,  # (B, T); read only when POLICY != 2
    ref_ptr,  # (B, T); read only when KL != 0
    adv_ptr,  # (B,) or (B, T): element (b, t) at b * stride_adv_b + t * stride_adv_t
    mask_ptr,  # (B, T) uint8 or float
    loss_ptr,  # (B, T) fp32 out: per-token loss; written only when STORE_LOSS
    dloss_ptr,  # (B, T) fp32 out: m * dL/dlogp
    stats_ptr,  # (B, num_blocks, 10) fp32 out: partial sums
    T,
    stride_logp,
    stride_old,
    stride_ref,
    stride_adv_b,
    stride_adv_t,
    stride_mask,
    num_blocks,
    clip_low,  # 1 - clip_eps_low
    clip_high,  # 1 + clip_eps_high
    clip_ratio_c,
    log_ratio_clamp,
    kl_coef,
    kl_clamp,
    POLICY: tl.constexpr,
    KL: tl.constexpr,
    STORE_LOSS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = offs < T
    m = tl.load(mask_ptr + pid_b * stride_mask + offs, mask=inb, other=0).to(tl.float32)
    valid = m != 0.0
    lp = tl.load(logp_ptr + pid_b * stride_logp + offs, mask=inb, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + pid_b * stride_adv_b + offs * stride_adv_t, mask=inb, other=0.0).to(tl.float32)
    zero = tl.zeros([BLOCK_T], dtype=tl.float32)

    if POLICY == 2:
        # Visual-RFT: r = exp(logp - stopgrad(logp)) == 1, value -A, gradient -A.
        pg = -adv
        dpg = -adv
        ratio = zero + 1.0
        log_r = zero
        low = zero
        high = zero
        dual = zero
    else:
        old = tl.load(old_ptr + pid_b * stride_old + offs, mask=inb, other=0.0).to(tl.float32)
        raw = lp - old
        log_r = tl.minimum(tl.maximum(raw, -log_ratio_clamp), log_ratio_clamp)
        in_clamp = (raw >= -log_ratio_clamp) & (raw <= log_ratio_clamp)
        ratio = tl.exp(log_r)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        is_clipped = clipped > unclipped
        pg = tl.where(is_clipped, clipped, unclipped)
        dpg = tl.where(is_clipped | (in_clamp == 0), 0.0, unclipped)
        low = tl.where(is_clipped & (ratio < 1.0), 1.0, 0.0)
        high = tl.where(is_clipped & (ratio > 1.0), 1.0, 0.0)
        dual = zero
        if POLICY == 1:
            bound = -adv * clip_ratio_c
            is_dual = (adv < 0.0) & (bound < pg)
            pg = tl.where(is_dual, bound, pg)
            dpg = tl.where(is_dual, 0.0, dpg)
            dual = tl.where(is_dual, 1.0, 0.0)

    if KL != 0:
        ref = tl.load(ref_ptr + pid_b * stride_ref + offs, mask=inb, other=0.0).to(tl.float32)
        raw_k = lp - ref
        d = tl.minimum(tl.maximum(raw_k, -log_ratio_clamp), log_ratio_clamp)
        in_k = (raw_k >= -log_ratio_clamp) & (raw_k <= log_ratio_clamp)
        if KL == 1:
            est = d
            dest = zero + 1.0
        elif KL == 2:
            est = 0.5 * d * d
            dest = d
        else:
            est = _k3(d)
            dest = _one_minus_exp_neg(d)
        in_k = in_k & (est >= -kl_clamp) & (est <= kl_clamp)
        kl = tl.minimum(tl.maximum(est, -kl_clamp), kl_clamp)
        dkl = tl.where(in_k, dest, 0.0)
        use_kl = kl_coef != 0.0
        loss = tl.where(use_kl, pg + kl_coef * kl, pg)
        dtok = tl.where(use_kl, dpg + kl_coef * dkl, dpg)
    else:
        kl = zero
        loss = pg
        dtok = dpg

    row = pid_b * T + offs
    if STORE_LOSS:
        tl.store(loss_ptr + row, loss, mask=inb)
    tl.store(dloss_ptr + row, tl.where(valid, dtok * m, 0.0), mask=inb)

    s = stats_ptr + (pid_b * num_blocks + pid_t) * 10
    tl.store(s + 0, tl.sum(m, axis=0))
    tl.store(s + 1, tl.sum(tl.where(valid, pg * m, 0.0), axis=0))
    tl.store(s + 2, tl.sum(tl.where(valid, kl * m, 0.0), axis=0))
    tl.store(s + 3, tl.sum(low * m, axis=0))
    tl.store(s + 4, tl.sum(high * m, axis=0))
    tl.store(s + 5, tl.sum(dual * m, axis=0))
    # approx KL = r - 1 - log r = k3(-log r)
    tl.store(s + 6, tl.sum(tl.where(valid, _k3(-log_r) * m, 0.0), axis=0))
    tl.store(s + 7, tl.sum(tl.where(valid, ratio * m, 0.0), axis=0))
    tl.store(s + 8, tl.min(tl.where(valid, ratio, float("inf")), axis=0))
    tl.store(s + 9, tl.max(tl.where(valid, ratio, -float("inf")), axis=0))


@triton.jit
def _grpo_loss_reduce_kernel(
    stats_ptr,  # (B, num_blocks, 10) fp32 partial sums from the forward kernel
    norm_ptr,  # () fp32 normalizer; read only when HAS_NORM
    metrics_ptr,  # (10,) fp32 out, METRIC_NAMES order
    loss_ptr,  # () fp32 out
    scale_ptr,  # (B + 1,) fp32 out: r_b for b < B, then 1 / den; loss = sum_b r_b rowsum_b / den
    B,
    num_blocks,
    inv_length,  # 1 / max_response_length (seq-mean-token-sum-norm)
    kl_coef,
    MODE: tl.constexpr,  # index into LOSS_AGG_MODES
    HAS_KL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    """Single program: every mode is ``(sum_b r_b * rowsum_b) / den`` with row-local ``r_b``."""
    nb = tl.arange(0, BLOCK_NB)
    acc_pg = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_rows = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_low = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_high = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_dual = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_akl = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_min = tl.full([BLOCK_B], float("inf"), dtype=tl.float32)
    acc_max = tl.full([BLOCK_B], -float("inf"), dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        inb = (rows[:, None] < B) & (nb[None, :] < num_blocks)
        base = stats_ptr + (rows[:, None].to(tl.int64) * num_blocks + nb[None, :]) * 10
        n = tl.sum(tl.load(base + 0, mask=inb, other=0.0), axis=1)
        pg = tl.sum(tl.load(base + 1, mask=inb, other=0.0), axis=1)
        kl = tl.sum(tl.load(base + 2, mask=inb, other=0.0), axis=1)
        if MODE == 1:
            r = tl.where(n != 0.0, 1.0 / tl.where(n != 0.0, n, 1.0), 0.0)
        elif MODE == 3:
            r = tl.zeros([BLOCK_B], dtype=tl.float32) + inv_length
        else:
            r = tl.zeros([BLOCK_B], dtype=tl.float32) + 1.0
        tl.store(scale_ptr + rows, r, mask=rows < B)
        acc_pg += r * pg
        acc_kl += r * kl
        acc_n += n
        acc_rows += tl.where(n != 0.0, 1.0, 0.0)
        acc_low += tl.sum(tl.load(base + 3, mask=inb, other=0.0), axis=1)
        acc_high += tl.sum(tl.load(base + 4, mask=inb, other=0.0), axis=1)
        acc_dual += tl.sum(tl.load(base + 5, mask=inb, other=0.0), axis=1)
        acc_akl += tl.sum(tl.load(base + 6, mask=inb, other=0.0), axis=1)
        acc_ratio += tl.sum(tl.load(base + 7, mask=inb, other=0.0), axis=1)
        acc_min = tl.minimum(acc_min, tl.min(tl.load(base + 8, mask=inb, other=float("inf")), axis=1))
        acc_max = tl.maximum(acc_max, tl.max(tl.load(base + 9, mask=inb, other=-float("inf")), axis=1))
    total_n = tl.sum(acc_n, axis=0)
    if HAS_NORM:
        den = tl.load(norm_ptr)
    elif MODE == 0:
        den = total_n
    else:
        den = tl.sum(acc_rows, axis=0)
    inv_den = 1.0 / tl.where(den != 0.0, den, 1.0)
    inv_n = 1.0 / tl.where(total_n != 0.0, total_n, 1.0)
    any_valid = total_n != 0.0
    pg_loss = tl.sum(acc_pg, axis=0) * inv_den
    kl_loss = tl.sum(acc_kl, axis=0) * inv_den
    low = tl.sum(acc_low, axis=0) * inv_n
    high = tl.sum(acc_high, axis=0) * inv_n
    tl.store(metrics_ptr + 0, low)
    tl.store(metrics_ptr + 1, high)
    tl.store(metrics_ptr + 2, low + high)
    tl.store(metrics_ptr + 3, tl.sum(acc_dual, axis=0) * inv_n)
    tl.store(metrics_ptr + 4, tl.sum(acc_akl, axis=0) * inv_n)
    tl.store(metrics_ptr + 5, tl.sum(acc_ratio, axis=0) * inv_n)
    tl.store(metrics_ptr + 6, tl.where(any_valid, tl.min(acc_min, axis=0), 0.0))
    tl.store(metrics_ptr + 7, tl.where(any_valid, tl.max(acc_max, axis=0), 0.0))
    tl.store(metrics_ptr + 8, pg_loss)
    tl.store(metrics_ptr + 9, kl_loss)
    if HAS_KL:
        loss = tl.where(kl_coef != 0.0, pg_loss + kl_coef * kl_loss, pg_loss)
    else:
        loss = pg_loss
    tl.store(loss_ptr, loss)
    tl.store(scale_ptr + B, inv_den)


@triton.jit
def _grpo_loss_bwd_kernel(
    dloss_ptr,  # (B, T) fp32: m * dL/dlogp
    scale_ptr,  # (B + 1,) fp32: r_b, then 1 / den
    grad_out_ptr,  # () upstream gradient of the loss
    grad_ptr,  # (B, T) out, log-probs dtype
    B,
    T,
    BLOCK_T: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = offs < T
    scale = tl.load(scale_ptr + pid_b) * tl.load(scale_ptr + B) * tl.load(grad_out_ptr).to(tl.float32)
    d = tl.load(dloss_ptr + pid_b * T + offs, mask=inb, other=0.0)
    tl.store(grad_ptr + pid_b * T + offs, (d * scale).to(grad_ptr.dtype.element_ty), mask=inb)


def _block_t(num_tokens: int) -> int:
    return min(max(triton.next_power_of_2(num_tokens), 16), 1024)


def _num_warps(block_t: int) -> int:
    return 4 if block_t <= 512 else 8


def _forward_triton(lp, old, ref, adv, mask, policy, kl, scalars, store_loss):
    num_rows, num_tokens = lp.shape
    block_t = _block_t(num_tokens)
    num_blocks = triton.cdiv(num_tokens, block_t)
    dloss = torch.empty(num_rows, num_tokens, device=lp.device, dtype=torch.float32)
    per_token = torch.empty_like(dloss) if store_loss else dloss.new_empty(0)
    stats = torch.empty(num_rows, num_blocks, _NUM_STATS, device=lp.device, dtype=torch.float32)
    if num_rows == 0 or num_tokens == 0:
        return per_token, dloss, stats.new_zeros(num_rows, 1, _NUM_STATS)
    old_t = lp if old is None else old  # never read when POLICY == 2
    ref_t = lp if ref is None else ref  # never read when KL == 0
    adv_stride_t = 0 if adv.dim() == 1 else adv.stride(1)
    _grpo_loss_fwd_kernel[(num_rows, num_blocks)](
        lp,
        old_t,
        ref_t,
        adv,
        mask,
        per_token,
        dloss,
        stats,
        num_tokens,
        lp.stride(0),
        old_t.stride(0),
        ref_t.stride(0),
        adv.stride(0),
        adv_stride_t,
        mask.stride(0),
        num_blocks,
        *scalars,
        POLICY=policy,
        KL=kl,
        STORE_LOSS=store_loss,
        BLOCK_T=block_t,
        num_warps=_num_warps(block_t),
    )
    return per_token, dloss, stats


def _reduce_triton(stats, mode, max_response_length, normalizer, num_tokens, kl_coef, has_kl):
    """-> (loss (), scales (B + 1,), metrics (10,)) from partial sums ``(B, num_blocks, 10)``."""
    num_rows, num_blocks, _ = stats.shape
    length = num_tokens if max_response_length is None else max_response_length
    if mode == "seq-mean-token-sum-norm" and length <= 0:
        raise ValueError(f"max_response_length must be positive, got {length}")
    metrics = torch.empty(len(METRIC_NAMES), device=stats.device, dtype=torch.float32)
    loss = torch.empty((), device=stats.device, dtype=torch.float32)
    scale = torch.empty(num_rows + 1, device=stats.device, dtype=torch.float32)
    norm = loss  # never read without HAS_NORM
    if normalizer is not None:
        norm = torch.as_tensor(normalizer, dtype=torch.float32, device=stats.device).reshape(())
    _grpo_loss_reduce_kernel[(1,)](
        stats,
        norm,
        metrics,
        loss,
        scale,
        num_rows,
        num_blocks,
        1.0 / max(length, 1),
        kl_coef,
        MODE=LOSS_AGG_MODES.index(mode),
        HAS_KL=has_kl,
        HAS_NORM=normalizer is not None,
        BLOCK_B=_REDUCE_BLOCK_B,
        BLOCK_NB=max(triton.next_power_of_2(num_blocks), 2),
        num_warps=4,
    )
    return loss, scale, metrics


def _backward_triton(dloss, scale, grad_out, dtype):
    num_rows, num_tokens = dloss.shape
    grad = torch.empty(num_rows, num_tokens, device=dloss.device, dtype=dtype)
    if grad.numel() == 0:
        return grad
    block_t = _block_t(num_tokens)
    _grpo_loss_bwd_kernel[(num_rows, triton.cdiv(num_tokens, block_t))](
        dloss,
        scale,
        grad_out,
        grad,
        num_rows,
        num_tokens,
        BLOCK_T=block_t,
        num_warps=_num_warps(block_t),
    )
    return grad


# ----------------------------------------------------------------------------------------------
# The autograd Function
# ----------------------------------------------------------------------------------------------


class FusedGrpoLossFunction(torch.autograd.Function):
    """Forward: one fused pass + a row reduction. Backward: ``grad = m dL/dlogp * w_b * grad_out``."""

    @staticmethod
    def forward(
        ctx,
        log_probs,
        old_log_probs,
        ref_log_probs,
        advantages,
        mask,
        policy,
        kl,
        scalars,
        mode,
        max_response_length,
        normalizer,
        store_loss,
    ):
        per_token, dloss, stats = _forward_triton(
            log_probs, old_log_probs, ref_log_probs, advantages, mask, policy, kl, scalars, store_loss
        )
        loss, scale, metrics = _reduce_triton(
            stats, mode, max_response_length, normalizer, log_probs.shape[-1], scalars[4], kl != 0
        )
        ctx.save_for_backward(dloss, scale)
        ctx.grad_dtype = log_probs.dtype
        ctx.mark_non_differentiable(per_token, metrics)
        return loss, per_token, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token, _grad_metrics):
        dloss, scale = ctx.saved_tensors
        grad = _backward_triton(dloss, scale, grad_loss.contiguous(), ctx.grad_dtype)
        return (grad,) + (None,) * 11


def triton_usable(t: torch.Tensor) -> bool:
    """The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    return t.dtype in _TRITON_DTYPES and (t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1")


def _as_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """Unit column stride (rows may be strided) so kernels address ``row * stride + t``."""
    if t is None:
        return None
    return t if t.dim() < 2 or t.stride(-1) == 1 else t.contiguous()


def fused_grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    ref_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    policy_loss: str = "ppo_clip",
    loss_agg_mode: str = "token-mean",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    kl_estimator: str = "k3",
    kl_coef: float = 0.0,
    kl_clamp: float | None = 10.0,
    log_ratio_clamp: float | None = 20.0,
    max_response_length: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    return_per_token_loss: bool = True,
) -> GrpoLossOutput:
    """Fused GRPO loss (Triton); arguments and semantics of ``megatron_vrft.rl.compute_grpo_loss``,
    which dispatches here (``impl="auto"`` / ``"fused"``) and is the one torch implementation.

    ``log_probs``, ``old_log_probs``, ``ref_log_probs``, ``response_mask``: ``(B, T)``;
    ``advantages``: ``(B,)`` or ``(B, T)``. Raises ``ValueError`` where Triton cannot run
    (:func:`triton_usable`: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; fp32/bf16/fp16).
    """
    if policy_loss not in POLICY_LOSS_CODES:
        raise KeyError(f"unknown policy loss {policy_loss!r}; registered: {sorted(POLICY_LOSS_CODES)}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise KeyError(f"unknown loss aggregation mode {loss_agg_mode!r}; registered: {sorted(LOSS_AGG_MODES)}")
    if ref_log_probs is not None and kl_estimator not in KL_CODES:
        raise KeyError(f"unknown KL estimator {kl_estimator!r}; registered: {sorted(KL_CODES)}")
    if log_probs.dim() != 2 or response_mask.shape != log_probs.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)} and response_mask {tuple(response_mask.shape)} must both be (B, T)"
        )
    for name, t in (("old_log_probs", old_log_probs), ("ref_log_probs", ref_log_probs)):
        if t is not None and t.shape != log_probs.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match log_probs {tuple(log_probs.shape)}")
    if not (advantages.shape == log_probs.shape or advantages.shape == log_probs.shape[:1]):
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (B,) or (B, T) for {tuple(log_probs.shape)}")
    policy = POLICY_LOSS_CODES[policy_loss]
    if policy != 2 and old_log_probs is None:
        raise ValueError("ppo_clip / dual_clip need old_log_probs")
    if policy != 2 and not (0.0 <= clip_eps_low < 1.0 and clip_eps_high >= 0.0):
        raise ValueError(f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low}, {clip_eps_high}")
    if policy == 1 and not clip_ratio_c > 1.0:
        raise ValueError(f"dual-clip needs clip_ratio_c > 1, got {clip_ratio_c}")
    if kl_coef != 0.0 and ref_log_probs is None:
        raise ValueError("kl_coef != 0 needs ref_log_probs")
    if log_probs.dtype not in _TRITON_DTYPES:
        raise ValueError(f"the Triton kernel supports {list(_TRITON_DTYPES)}, got {log_probs.dtype}")
    if not triton_usable(log_probs):
        raise ValueError(
            "the fused GRPO loss runs Triton on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
            "megatron_vrft.rl.compute_grpo_loss(impl='auto') uses its torch implementation elsewhere"
        )
    mask = response_mask.view(torch.uint8) if response_mask.dtype == torch.bool else response_mask
    log_probs, old_log_probs, ref_log_probs, mask = map(_as_rows, (log_probs, old_log_probs, ref_log_probs, mask))
    advantages = advantages if advantages.dim() == 1 else _as_rows(advantages)
    inf = math.inf
    scalars = (
        1.0 - clip_eps_low,
        1.0 + clip_eps_high,
        float(clip_ratio_c),
        inf if log_ratio_clamp is None else float(log_ratio_clamp),
        float(kl_coef),
        inf if kl_clamp is None else float(kl_clamp),
    )
    kl = 0 if ref_log_probs is None else KL_CODES[kl_estimator]
    loss, per_token, packed = FusedGrpoLossFunction.apply(
        log_probs,
        old_log_probs,
        ref_log_probs,
        advantages,
        mask,
        policy,
        kl,
        scalars,
        loss_agg_mode,
        max_response_length,
        normalizer,
        return_per_token_loss,
    )
    names = METRIC_NAMES if kl else METRIC_NAMES[:-1]
    metrics = {name: packed[i] for i, name in enumerate(names)}
    return GrpoLossOutput(loss=loss, per_token_loss=per_token if return_per_token_loss else None, metrics=metrics)


def compile_specs() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """``(jit_fn, signature, constexprs)`` for every kernel here, for ahead-of-time compile checks.

    Covers every policy-loss branch and every KL branch for fp32 inputs with a uint8 mask, and
    bf16/fp16 inputs with a float mask for dual_clip + k3; the reduction for every aggregation mode
    (with/without KL and normalizer); the backward kernel for fp32 and bf16 gradients.
    """
    specs: list[tuple[object, dict[str, str], dict[str, object]]] = []

    def fwd_sig(lp: str, other: str, mask: str) -> dict[str, str]:
        sig = {
            "logp_ptr": f"*{lp}",
            "old_ptr": f"*{other}",
            "ref_ptr": f"*{other}",
            "adv_ptr": f"*{other}",
            "mask_ptr": f"*{mask}",
            "loss_ptr": "*fp32",
            "dloss_ptr": "*fp32",
            "stats_ptr": "*fp32",
        }
        for name in (
            "T",
            "stride_logp",
            "stride_old",
            "stride_ref",
            "stride_adv_b",
            "stride_adv_t",
            "stride_mask",
            "num_blocks",
        ):
            sig[name] = "i32"
        for name in ("clip_low", "clip_high", "clip_ratio_c", "log_ratio_clamp", "kl_coef", "kl_clamp"):
            sig[name] = "fp32"
        sig.update(POLICY="constexpr", KL="constexpr", STORE_LOSS="constexpr", BLOCK_T="constexpr")
        return sig

    # Every policy branch (with k3) and every KL branch (with ppo_clip): each code path compiles
    # at least once without paying for the full product (~1.5 s per compile here).
    combos = [(policy, KL_CODES["k3"]) for policy in POLICY_LOSS_CODES.values()]
    combos += [(POLICY_LOSS_CODES["ppo_clip"], kl) for kl in (0, KL_CODES["k1"], KL_CODES["k2"])]
    for policy, kl in combos:
        specs.append(
            (
                _grpo_loss_fwd_kernel,
                fwd_sig("fp32", "fp32", "u8"),
                {"POLICY": policy, "KL": kl, "STORE_LOSS": kl != 3, "BLOCK_T": 1024},
            )
        )
    for lp_dtype in ("bf16", "fp16"):
        specs.append(
            (
                _grpo_loss_fwd_kernel,
                fwd_sig(lp_dtype, lp_dtype, "fp32"),
                {"POLICY": 1, "KL": 3, "STORE_LOSS": True, "BLOCK_T": 256},
            )
        )
    for mode, has_kl, has_norm in ((0, True, False), (1, True, True), (2, True, False), (3, False, False)):
        sig = {
            "stats_ptr": "*fp32",
            "norm_ptr": "*fp32",
            "metrics_ptr": "*fp32",
            "loss_ptr": "*fp32",
            "scale_ptr": "*fp32",
            "B": "i32",
            "num_blocks": "i32",
            "inv_length": "fp32",
            "kl_coef": "fp32",
            "MODE": "constexpr",
            "HAS_KL": "constexpr",
            "HAS_NORM": "constexpr",
            "BLOCK_B": "constexpr",
            "BLOCK_NB": "constexpr",
        }
        specs.append(
            (
                _grpo_loss_reduce_kernel,
                sig,
                {"MODE": mode, "HAS_KL": has_kl, "HAS_NORM": has_norm, "BLOCK_B": 64, "BLOCK_NB": 16},
            )
        )
    for grad_dtype in ("fp32", "bf16"):
        sig = {
            "dloss_ptr": "*fp32",
            "scale_ptr": "*fp32",
            "grad_out_ptr": "*fp32",
            "grad_ptr": f"*{grad_dtype}",
            "B": "i32",
            "T": "i32",
            "BLOCK_T": "constexpr",
        }
        specs.append((_grpo_loss_bwd_kernel, sig, {"BLOCK_T": 1024}))
    return specs
