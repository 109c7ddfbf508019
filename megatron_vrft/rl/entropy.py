"""Entropy of the policy's full next-token distribution, from log-probs or logits.

``H = -sum_v p_v log p_v`` over the last (vocabulary) dimension: ``(..., V) -> (...)``. Entries with
``log p = -inf`` (masked or impossible tokens) contribute exactly 0 and receive zero gradient (the
naive ``p * log p`` would give ``0 * -inf = NaN``). Per-token entropies ``(B, T)`` are aggregated for
a bonus/metric with ``megatron_vrft.rl.aggregation.aggregate_loss`` like any other per-token value
(see ``compute_entropy_loss``).
"""

from __future__ import annotations

import torch

from megatron_vrft.rl.aggregation import aggregate_loss


def compute_entropy_from_logprobs(log_probs: torch.Tensor) -> torch.Tensor:
    """``log_probs (..., V)`` normalised log-probabilities -> entropy ``(...)``."""
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    logp = log_probs.to(dtype)
    finite = torch.isfinite(logp)
    safe = torch.where(finite, logp, torch.zeros((), dtype=dtype))
    probs = torch.where(finite, torch.exp(safe), torch.zeros((), dtype=dtype))
    return -(probs * safe).sum(-1)


def compute_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits (..., V)`` -> entropy ``(...)`` via ``log_softmax``."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return compute_entropy_from_logprobs(torch.log_softmax(logits.to(dtype), dim=-1))


def compute_entropy_loss(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    max_response_length: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate per-token entropy ``(B, T)`` (a passthrough to ``aggregate_loss``)."""
    return aggregate_loss(entropy, mask, mode, max_response_length=max_response_length, normalizer=normalizer)
