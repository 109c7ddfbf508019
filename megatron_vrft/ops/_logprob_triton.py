"""Triton kernels for per-token log-probs over a (possibly vocab-parallel) logits shard.

Two kernels, one program per row (token), looping over the vocabulary in ``BLOCK_V`` blocks:

- ``_logprob_stats_kernel`` reads a row of logits once and writes three fp32 statistics of the
  temperature-scaled logits ``z = x / T`` restricted to this shard:
  ``lse_local = log sum_j exp(z_j)`` (online max / sum-exp, so no softmax and no fp32 copy of the
  row ever exists), ``target_logit = z[target - vocab_start]`` when the target falls in the shard
  (0 otherwise), and ``entropy_local``, the entropy of the shard's own softmax (only when
  ENTROPY), accumulated relative to the running max so it does not cancel large numbers.
- ``_logprob_backward_kernel`` reads the row again and writes, in the logits' dtype,
  ``dL/dx_j = (g_lp * (onehot_j - p_j) - g_ent * p_j * (z_j - lse + H)) / T`` with ``p = exp(z - lse)``
  built from the *global* ``lse`` and entropy ``H``. The output may alias the logits (each lane
  reads its element before writing it), which is how the in-place backward works.

Everything is computed in fp32 registers; inputs are loaded and upcast (the Triton interpreter
computes bf16 arithmetic wrongly, so nothing is done in bf16). Row offsets are int64: N * V
exceeds 2**31 at real sizes (16k tokens x 152k vocab).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
KERNEL_DTYPES = tuple(_TORCH_TO_TRITON)


@triton.jit
def _logprob_stats_kernel(
    logits_ptr,  # (N, V) any float dtype, unit stride along V
    targets_ptr,  # (N,) int64, global vocabulary ids
    stats_ptr,  # (N, 3) fp32 out: lse_local, target_logit, entropy_local
    row_stride,
    V,
    vocab_start,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    # Running max m, sum-exp s = sum exp(z - m) and, for the entropy, t = sum exp(z - m) * (z - m):
    # measured from the max, so the entropy log(s) - t / s never cancels two O(|z|) numbers.
    m = -float("inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(row_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Shift by 0 while everything so far is -inf: exp(-inf - (-inf)) would be NaN.
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        if ENTROPY:
            # Re-reference the old sum to the new max; e == 0 lanes (masked, -inf) add 0, not NaN.
            shift = tl.where(m == -float("inf"), 0.0, m - m_safe)
            t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0.0, z - m_safe, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    lse = m_safe + tl.log(s)
    tl.store(stats_ptr + row * 3, lse)

    local = tl.load(targets_ptr + row) - vocab_start
    owned = (local >= 0) & (local < V)
    tgt = tl.load(row_ptr + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(stats_ptr + row * 3 + 1, tl.where(owned, tgt * inv_temperature, 0.0))
    if ENTROPY:
        # An empty / all -inf slice has s == 0 and entropy 0 (its weight in any merge is 0).
        safe_s = tl.where(s > 0.0, s, 1.0)
        tl.store(stats_ptr + row * 3 + 2, tl.where(s > 0.0, tl.log(safe_s) - t / safe_s, 0.0))
    else:
        tl.store(stats_ptr + row * 3 + 2, 0.0)


@triton.jit
def _logprob_backward_kernel(
    logits_ptr,  # (N, V) any float dtype, unit stride along V
    grad_ptr,  # (N, V) same dtype, unit stride; may alias logits_ptr
    targets_ptr,  # (N,) int64
    lse_ptr,  # (N,) fp32, global over the TP group
    entropy_ptr,  # (N,) fp32, read only when ENTROPY
    grad_logprob_ptr,  # (N,) fp32
    grad_entropy_ptr,  # (N,) fp32, read only when ENTROPY
    row_stride,
    grad_row_stride,
    V,
    vocab_start,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(grad_logprob_ptr + row)
    if ENTROPY:
        ent = tl.load(entropy_ptr + row)
        g_ent = tl.load(grad_entropy_ptr + row)
    local = tl.load(targets_ptr + row) - vocab_start
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        p = tl.exp(z - lse)
        g = g_lp * (tl.where(offs == local, 1.0, 0.0) - p)
        if ENTROPY:
            # dH/dz_j = -p_j * (log p_j + H); p_j == 0 lanes give 0 even when z_j = -inf.
            g = g - g_ent * p * tl.where(p > 0.0, z - lse + ent, 0.0)
        g = g * inv_temperature
        tl.store(grad_row_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _block_v(num_cols: int) -> int:
    return min(triton.next_power_of_2(max(num_cols, 16)), 4096)


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def logprob_stats_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    inv_temperature: float,
    with_entropy: bool,
    block_v: int | None = None,
) -> torch.Tensor:
    """``logits (N, V)`` unit-stride rows, ``targets (N,)`` int64 -> stats ``(N, 3)`` fp32.

    ``block_v`` (a power of two) overrides the vocabulary block size, for tests of the multi-block
    path at small V.
    """
    num_rows, num_cols = logits.shape
    stats = torch.empty((num_rows, 3), dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return stats
    block_v = block_v or _block_v(num_cols)
    _logprob_stats_kernel[(num_rows,)](
        logits,
        targets,
        stats,
        logits.stride(0),
        num_cols,
        vocab_start,
        inv_temperature,
        BLOCK_V=block_v,
        ENTROPY=with_entropy,
        num_warps=_num_warps(block_v),
    )
    return stats


def logprob_backward_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    vocab_start: int,
    inv_temperature: float,
    out: torch.Tensor,
    block_v: int | None = None,
) -> torch.Tensor:
    """Write ``dL/dlogits`` into ``out (N, V)`` (may be ``logits`` itself) and return it."""
    num_rows, num_cols = logits.shape
    if num_rows == 0:
        return out
    with_entropy = entropy is not None
    block_v = block_v or _block_v(num_cols)
    _logprob_backward_kernel[(num_rows,)](
        logits,
        out,
        targets,
        lse,
        entropy if with_entropy else lse,
        grad_logprob,
        grad_entropy if with_entropy else grad_logprob,
        logits.stride(0),
        out.stride(0),
        num_cols,
        vocab_start,
        inv_temperature,
        BLOCK_V=block_v,
        ENTROPY=with_entropy,
        num_warps=_num_warps(block_v),
    )
    return out


def compile_specs() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """``(jit_fn, signature, constexprs)`` for every kernel here, for ahead-of-time compile checks.

    Covers each logits dtype with and without the entropy branch, at the largest block size.
    """
    specs = []
    for dtype in _TORCH_TO_TRITON.values():
        for entropy in (False, True):
            constexprs = {"BLOCK_V": 4096, "ENTROPY": entropy}
            stats_sig = {
                "logits_ptr": f"*{dtype}",
                "targets_ptr": "*i64",
                "stats_ptr": "*fp32",
                "row_stride": "i64",
                "V": "i32",
                "vocab_start": "i64",
                "inv_temperature": "fp32",
                "BLOCK_V": "constexpr",
                "ENTROPY": "constexpr",
            }
            specs.append((_logprob_stats_kernel, stats_sig, constexprs))
            backward_sig = {
                "logits_ptr": f"*{dtype}",
                "grad_ptr": f"*{dtype}",
                "targets_ptr": "*i64",
                "lse_ptr": "*fp32",
                "entropy_ptr": "*fp32",
                "grad_logprob_ptr": "*fp32",
                "grad_entropy_ptr": "*fp32",
                "row_stride": "i64",
                "grad_row_stride": "i64",
                "V": "i32",
                "vocab_start": "i64",
                "inv_temperature": "fp32",
                "BLOCK_V": "constexpr",
                "ENTROPY": "constexpr",
            }
            specs.append((_logprob_backward_kernel, backward_sig, dict(constexprs)))
    return specs


def triton_available_for(t: torch.Tensor) -> bool:
    """The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"
