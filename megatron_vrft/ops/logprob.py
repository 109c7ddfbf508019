"""Per-token log-probs ``log p(target)`` from (vocab-parallel) logits, without a softmax in memory.

``token_logprobs(logits (..., V_shard), targets (...))`` returns fp32 ``(...)`` log-probs of the
temperature-scaled logits ``z = logits / T`` (and optionally the entropy of ``softmax(z)``). The
fused kernels read each row of logits once forward (online max / sum-exp over vocabulary blocks)
and once backward, and never build a softmax or a float32 copy of the logits; the backward writes
``grad_logits`` in the logits' dtype, into the logits buffer itself with ``inplace_backward=True``.

Gradients (``p = softmax(z)`` over the full vocabulary, ``H`` the entropy, ``g_lp``/``g_ent`` the
upstream gradients of the log-prob and entropy outputs)::

    dL/dlogits_j = (g_lp * (onehot(target)_j - p_j) - g_ent * p_j * (log p_j + H)) / T

The entropy gradient costs one fused multiply-add per element, so it is supported.

Vocab parallelism: rank ``r`` of ``tp_group`` holds the contiguous vocabulary slice
``[vocab_start_index, vocab_start_index + V_shard)``; targets are global ids. Each rank computes
per-row stats of its shard (local log-sum-exp, its target logit or 0, the entropy of its local
softmax) and ONE all-gather (``all_gather_single``) of those ``3N`` floats per rank lets every
rank combine them with the log-sum-exp rule (``_logprob_stats``); the backward needs no
communication. The outputs are identical on all ranks and each rank's backward yields the
gradient of its own shard (the usual Megatron convention: the loss is replicated over TP).

Targets outside the (global) vocabulary, e.g. a padding id of -100, are owned by no rank: their
log-prob is ``-logsumexp(z)`` and they add no one-hot term to the gradient; mask them in the loss.

``impl``: ``"auto"`` runs the Triton kernels on CUDA tensors (or on CPU under
``TRITON_INTERPRET=1``) and the torch reference otherwise; ``"triton"``, ``"cuda"`` (the optional
compiled extension from ``kernels/logprob.cu``) and ``"torch"`` (the reference) force a choice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vrft.ops import _logprob_stats as S

IMPLS = ("auto", "triton", "cuda", "torch")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_usable(t: torch.Tensor) -> bool:
    try:
        from megatron_vrft.ops import _logprob_triton
    except ImportError:  # triton is optional
        return False
    return _logprob_triton.triton_available_for(t)


def select_backend(impl: str, logits: torch.Tensor) -> S.Backend | None:
    """The stats/backward backend for ``impl``, or None for the plain torch reference."""
    if impl not in IMPLS:
        raise ValueError(f"unknown log-prob impl {impl!r}; choose one of {IMPLS}")
    if impl == "torch":
        return None
    if impl == "auto":
        if logits.dtype in _KERNEL_DTYPES and _triton_usable(logits):
            return S.triton_backend()
        return None
    if logits.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"impl={impl!r} supports fp32/bf16/fp16 logits, got {logits.dtype}")
    if impl == "triton":
        if not _triton_usable(logits):
            raise RuntimeError("impl='triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return S.triton_backend()
    if not logits.is_cuda:
        raise RuntimeError("impl='cuda' needs CUDA tensors")
    return S.cuda_backend()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temperature, tp_group, vocab_start, with_entropy, inplace_backward, backend):
        stats_fn, backward_fn = backend
        stats = stats_fn(logits, targets, vocab_start, inv_temperature, with_entropy)
        stats = S.allgather_combine_stats(stats, tp_group)
        lse = stats[:, 0].contiguous()
        logprobs = stats[:, 1] - lse
        entropy = stats[:, 2].contiguous() if with_entropy else torch.zeros_like(lse)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.inv_temperature = inv_temperature
        ctx.vocab_start = vocab_start
        ctx.with_entropy = with_entropy
        ctx.inplace_backward = inplace_backward
        ctx.backward_fn = backward_fn
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        # The logits are not needed after this point: with the caller's permission their buffer
        # receives the gradient, saving one (N, V) allocation per backward.
        out = logits if ctx.inplace_backward else torch.empty_like(logits)
        ctx.backward_fn(
            logits,
            targets,
            lse,
            entropy if use_entropy else None,
            grad_logprobs.float().contiguous(),
            grad_entropy.float().contiguous() if use_entropy else None,
            ctx.vocab_start,
            ctx.inv_temperature,
            out,
        )
        return out, None, None, None, None, None, None, None


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., V_shard) with V_shard > 0, got {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``(...)`` fp32 of ``targets (...)`` under ``softmax(logits (..., V_shard) / T)``.

    Returns ``logprobs`` or, with ``return_entropy``, ``(logprobs, entropy)``. See the module
    docstring for vocab parallelism, out-of-vocabulary targets and ``impl``.
    ``inplace_backward=True`` lets the backward overwrite ``logits`` with its gradient: only safe
    when nothing else needs the logits afterwards (no other op saved them for its backward).
    """
    _check_inputs(logits, targets, temperature)
    backend = select_backend(impl, logits)
    if backend is None:
        return token_logprobs_reference(
            logits,
            targets,
            temperature=temperature,
            tp_group=tp_group,
            vocab_start_index=vocab_start_index,
            return_entropy=return_entropy,
        )
    num_cols = logits.shape[-1]
    logits2d = logits.reshape(-1, num_cols)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    targets1d = targets.reshape(-1).to(device=logits.device, dtype=torch.int64).contiguous()
    logprobs, entropy = _TokenLogprobs.apply(
        logits2d,
        targets1d,
        1.0 / float(temperature),
        tp_group,
        int(vocab_start_index),
        bool(return_entropy),
        bool(inplace_backward),
        backend,
    )
    logprobs = logprobs.reshape(targets.shape)
    if return_entropy:
        return logprobs, entropy.reshape(targets.shape)
    return logprobs


class _AllReduceSumCopyGrad(torch.autograd.Function):
    """All-reduce sum forward, identity backward: the loss downstream is replicated on every rank,
    so each rank's upstream gradient already is the gradient w.r.t. the summed value."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def token_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch reference (CPU path and test oracle), fp32, differentiable by autograd.

    Single rank: ``log_softmax`` + ``gather``. Vocab-parallel: all-reduce MAX of the row max (a
    constant shift ``m``), then all-reduce SUM of ``S = sum exp(z - m)``, of the target logit (0
    off the owning rank) and, for the entropy, of ``T = sum exp(z - m) (z - m)``;
    ``H = log S - T / S``.
    """
    _check_inputs(logits, targets, temperature)
    z = logits.float() / temperature
    num_cols = z.shape[-1]
    local = targets.to(device=z.device, dtype=torch.int64) - vocab_start_index
    owned = (local >= 0) & (local < num_cols)
    safe_local = local.clamp(0, num_cols - 1).unsqueeze(-1)
    tp = tp_group is not None and dist.get_world_size(tp_group) > 1
    if not tp:
        logp = torch.log_softmax(z, dim=-1)
        lse = torch.logsumexp(z, dim=-1)
        logprobs = torch.where(owned, logp.gather(-1, safe_local).squeeze(-1), -lse)
        if not return_entropy:
            return logprobs
        p = logp.exp()
        entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
        return logprobs, entropy
    # Every cross-rank dependency goes through an all-reduced sum of purely local functions
    # (S, T, target), so identity-backward all-reduces give each rank the gradient of its shard.
    row_max = z.detach().amax(dim=-1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = z - row_max.unsqueeze(-1)
    e = torch.exp(shifted)
    sum_exp = _AllReduceSumCopyGrad.apply(e.sum(-1), tp_group)
    lse = row_max + torch.log(sum_exp)
    target_logit = torch.where(owned, z.gather(-1, safe_local).squeeze(-1), torch.zeros_like(lse))
    logprobs = _AllReduceSumCopyGrad.apply(target_logit, tp_group) - lse
    if not return_entropy:
        return logprobs
    # H = log S - T / S with T = sum exp(z - max) (z - max): no O(|z|) cancellation.
    weighted = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(-1)
    total = _AllReduceSumCopyGrad.apply(weighted, tp_group)
    return logprobs, torch.log(sum_exp) - total / sum_exp


def compile_specs() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """``(jit_fn, signature, constexprs)`` for each Triton kernel behind this op."""
    from megatron_vrft.ops import _logprob_triton

    return _logprob_triton.compile_specs()
