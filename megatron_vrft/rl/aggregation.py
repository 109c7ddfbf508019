"""Loss aggregation: per-token values ``(B, T)`` + mask ``(B, T)`` -> scalar.

Notation: ``v`` values, ``m`` mask (bool or float weights; 0 = padding), ``n_b = sum_t m_bt`` the
valid-token count of row ``b``, ``R = {b : n_b > 0}`` the rows with at least one valid token,
``S = |R|``, ``N = sum_bt m_bt``, ``L`` a constant length (``max_response_length``, default ``T``)::

    token-mean               sum_bt m v / N
    seq-mean-token-mean      (1/S) sum_{b in R} (sum_t m v / n_b)
    seq-mean-token-sum       (1/S) sum_{b in R} sum_t m v
    seq-mean-token-sum-norm  (1/S) sum_{b in R} sum_t m v / L        (Dr.GRPO)

Fully masked rows are excluded from ``S`` (they are padding, not responses) and never divide by
zero; an all-masked batch aggregates to exactly 0. ``normalizer``, when given, replaces the computed
denominator (``N`` for token-mean, ``S`` for the seq-mean modes): the trainer passes the global
token/sequence count of the whole mini-batch so that gradient accumulation over micro-batches and
data-parallel ranks sums to the same loss as one big batch. Masked positions contribute exactly 0
(they are selected out with ``where``, so non-finite padding values never leak in the forward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_vrft.rl.registry import Registry

LossAggregator = Callable[..., torch.Tensor]
LOSS_AGGREGATORS: Registry[LossAggregator] = Registry("loss aggregation mode")


def _masked(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    m = mask.to(values.dtype)
    return torch.where(m != 0, values * m, torch.zeros((), dtype=values.dtype)), m


def _safe_div(num: torch.Tensor, den: torch.Tensor | float) -> torch.Tensor:
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den != 0, den, torch.ones((), dtype=den.dtype, device=den.device))


def _num_valid_rows(m: torch.Tensor, normalizer: float | torch.Tensor | None) -> torch.Tensor:
    if normalizer is not None:
        return torch.as_tensor(normalizer, dtype=m.dtype, device=m.device)
    return (m.sum(-1) != 0).sum().to(m.dtype)


@LOSS_AGGREGATORS.register("token-mean")
def aggregate_token_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_response_length: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_bt m v / N``; ``(B, T), (B, T) -> ()``. ``max_response_length`` is unused."""
    vm, m = _masked(values, mask)
    return _safe_div(vm.sum(), m.sum() if normalizer is None else normalizer)


@LOSS_AGGREGATORS.register("seq-mean-token-mean")
def aggregate_seq_mean_token_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_response_length: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``(1/S) sum_b sum_t m v / n_b``; ``(B, T), (B, T) -> ()``."""
    vm, m = _masked(values, mask)
    per_seq = _safe_div(vm.sum(-1), m.sum(-1))
    return _safe_div(per_seq.sum(), _num_valid_rows(m, normalizer))


@LOSS_AGGREGATORS.register("seq-mean-token-sum")
def aggregate_seq_mean_token_sum(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_response_length: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``(1/S) sum_b sum_t m v``; ``(B, T), (B, T) -> ()``."""
    vm, m = _masked(values, mask)
    return _safe_div(vm.sum(), _num_valid_rows(m, normalizer))


@LOSS_AGGREGATORS.register("seq-mean-token-sum-norm")
def aggregate_seq_mean_token_sum_norm(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_response_length: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Dr.GRPO: ``(1/S) sum_b sum_t m v / L`` with ``L = max_response_length or T``."""
    vm, m = _masked(values, mask)
    length = values.shape[-1] if max_response_length is None else max_response_length
    if length <= 0:
        raise ValueError(f"max_response_length must be positive, got {length}")
    return _safe_div(vm.sum() / length, _num_valid_rows(m, normalizer))


def get_loss_aggregator(name: str) -> LossAggregator:
    """Look up an aggregation mode by name (see module docstring for the names)."""
    return LOSS_AGGREGATORS.get(name)


def aggregate_loss(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    max_response_length: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate per-token ``values (B, T)`` under ``mask (B, T)`` with the named ``mode``."""
    return LOSS_AGGREGATORS.get(mode)(values, mask, max_response_length=max_response_length, normalizer=normalizer)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Metric helper: ``sum m v / sum m`` (0 when nothing is valid)."""
    return aggregate_token_mean(values, mask)
