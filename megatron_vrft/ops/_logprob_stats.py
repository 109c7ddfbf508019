"""Row statistics shared by the log-prob ops: backends, the online log-sum-exp combine, TP gather.

A *stats* tensor ``(N, 3)`` fp32 summarises the temperature-scaled logits ``z = x / T`` of one row
over some slice of the vocabulary (a vocabulary block, a TP shard, or a union of those):

- ``[:, 0] lse``: ``log sum_j exp(z_j)`` over the slice (``-inf`` for an empty slice);
- ``[:, 1] target``: ``z[target]`` if the target id lies in the slice, else 0;
- ``[:, 2] entropy``: the entropy of the slice's own softmax (0 when entropy is not requested).

Two disjoint slices combine exactly (``combine_stats``): ``lse = logaddexp(lse_a, lse_b)``,
``target = target_a + target_b`` and, with weights ``w_* = exp(lse_* - lse)`` (summing to 1),
``entropy = sum_* w_* (entropy_* - log w_*)``. This is how vocabulary chunks (fused linear op) and
TP shards (one all-gather of the stats) are merged; a log-prob is ``target - lse``. The entropy is
carried as an entropy, never as ``lse - E[z]``, which would cancel two O(|z|) numbers in fp32.

Every backend (torch, Triton, the optional CUDA extension) implements the same two functions:
``stats(logits, targets, vocab_start, inv_temperature, with_entropy) -> (N, 3)`` and
``backward(logits, targets, lse, entropy, grad_logprob, grad_entropy, vocab_start,
inv_temperature, out) -> out``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

NUM_STATS = 3


def logprob_stats_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    inv_temperature: float,
    with_entropy: bool,
) -> torch.Tensor:
    """Torch backend of the stats contract; upcasts only the given ``(N, V)`` block to fp32."""
    num_cols = logits.shape[-1]
    z = logits.float() * inv_temperature
    lse = torch.logsumexp(z, dim=-1)
    local = targets - vocab_start
    owned = (local >= 0) & (local < num_cols)
    tgt = z.gather(-1, local.clamp(0, max(num_cols - 1, 0)).unsqueeze(-1)).squeeze(-1)
    tgt = torch.where(owned, tgt, torch.zeros_like(tgt))
    if with_entropy:
        logq = z - lse.unsqueeze(-1)
        q = torch.exp(logq)
        entropy = -torch.where(q > 0, q * logq, torch.zeros_like(z)).sum(-1)
    else:
        entropy = torch.zeros_like(lse)
    return torch.stack([lse, tgt, entropy], dim=-1)


def logprob_backward_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    vocab_start: int,
    inv_temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Torch backend of the backward contract (see ``_logprob_triton`` for the formula)."""
    num_cols = logits.shape[-1]
    z = logits.float() * inv_temperature
    p = torch.exp(z - lse.unsqueeze(-1))
    grad = -grad_logprob.unsqueeze(-1) * p
    local = targets - vocab_start
    owned = (local >= 0) & (local < num_cols)
    rows = torch.nonzero(owned).squeeze(-1)
    grad[rows, local[rows]] += grad_logprob[rows]
    if entropy is not None:
        dent = p * (z - lse.unsqueeze(-1) + entropy.unsqueeze(-1))
        grad -= grad_entropy.unsqueeze(-1) * torch.where(p > 0, dent, torch.zeros_like(dent))
    out.copy_(grad * inv_temperature)
    return out


def _entropy_terms(part_lse: torch.Tensor, part_entropy: torch.Tensor, lse: torch.Tensor):
    """``w (entropy_part - log w)`` with ``w = exp(part_lse - lse)``; 0 for empty parts (w = 0)."""
    # logaddexp(-inf, -inf) = -inf; shift by 0 then so the weights are 0, not NaN.
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    log_w = part_lse - shift
    w = torch.exp(log_w)
    return torch.where(w > 0, w * (part_entropy - log_w), torch.zeros_like(w))


def combine_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stats of the union of two disjoint vocabulary slices ``(N, 3) x (N, 3) -> (N, 3)``."""
    lse = torch.logaddexp(a[:, 0], b[:, 0])
    entropy = _entropy_terms(a[:, 0], a[:, 2], lse) + _entropy_terms(b[:, 0], b[:, 2], lse)
    return torch.stack([lse, a[:, 1] + b[:, 1], entropy], dim=-1)


def combine_stacked_stats(stats: torch.Tensor) -> torch.Tensor:
    """Stats of the union of ``K`` disjoint slices: ``(K, N, 3) -> (N, 3)``."""
    lse = torch.logsumexp(stats[..., 0], dim=0)
    entropy = _entropy_terms(stats[..., 0], stats[..., 2], lse).sum(0)
    return torch.stack([lse, stats[..., 1].sum(0), entropy], dim=-1)


def allgather_combine_stats(stats: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Combine per-shard stats ``(N, 3)`` over the TP group with ONE all-gather.

    Each rank sends ``3N`` floats (its local lse, target logit or 0, local entropy) and combines the
    ``(TP, N, 3)`` result locally with the log-sum-exp rule; no all-reduce of max then sum is
    needed, so the whole combine is a single collective of O(N) bytes per rank.
    """
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return stats
    world = dist.get_world_size(tp_group)
    # Output laid out as the dim-0 concatenation (gloo rejects a (world, N, 3) output shape).
    gathered = torch.empty((world * stats.shape[0], *stats.shape[1:]), dtype=stats.dtype, device=stats.device)
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, stats.contiguous(), group=tp_group)
    return combine_stacked_stats(gathered.view(world, *stats.shape))


Backend = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]


def torch_backend() -> Backend:
    return logprob_stats_torch, logprob_backward_torch


def triton_backend() -> Backend:
    from megatron_vrft.ops import _logprob_triton

    return _logprob_triton.logprob_stats_triton, _logprob_triton.logprob_backward_triton


def cuda_ext_ops():
    """``torch.ops.megatron_vrft`` with the log-prob ops, or None when the extension is not built.

    Importing ``megatron_vrft.ops.cuda_ext`` loads the optional compiled library, whose
    ``kernels/logprob.cu`` registers ``token_logprob_stats`` / ``token_logprob_backward`` with
    ``TORCH_LIBRARY_FRAGMENT(megatron_vrft, ...)``.
    """
    from megatron_vrft.ops import cuda_ext

    if not cuda_ext.is_built():
        return None
    ops = getattr(torch.ops, "megatron_vrft", None)
    if ops is None or not hasattr(ops, "token_logprob_stats") or not hasattr(ops, "token_logprob_backward"):
        return None
    return ops


def cuda_backend() -> Backend:
    ops = cuda_ext_ops()
    if ops is None:
        raise RuntimeError(
            "impl='cuda' needs the compiled megatron_vrft CUDA extension (kernels/logprob.cu), "
            "which is not built in this environment"
        )

    def stats(logits, targets, vocab_start, inv_temperature, with_entropy):
        return ops.token_logprob_stats(logits, targets, vocab_start, inv_temperature, with_entropy)

    def backward(logits, targets, lse, entropy, grad_logprob, grad_entropy, vocab_start, inv_temperature, out):
        ops.token_logprob_backward(
            logits, targets, lse, entropy, grad_logprob, grad_entropy, vocab_start, inv_temperature, out
        )
        return out

    return stats, backward
