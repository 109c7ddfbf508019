"""Rollout/trainer mismatch correction from the engine's sampling log-probs.

The rollout engine (vLLM) samples with ``pi_roll`` and reports ``rollout_logp``; the trainer
recomputes ``old_logp`` (``pi_old``) for the same tokens. With ``d_bt = old_logp - rollout_logp`` on
valid tokens (``mask != 0``) and 0 elsewhere, the importance weight is selected by ``level``::

    token     w_bt = exp(d_bt)
    sequence  w_bt = exp(sum_t d_bt)            (one weight per row, broadcast to its tokens)

and then capped by ``mode`` with ``threshold`` (C)::

    truncate  w' = min(w, C)                    (TIS; TRL token_truncate / sequence_truncate)
    mask      w' = w if w <= C else 0           (IcePop; at sequence level the whole row is 0)

Weights are detached ``(B, T)``, 0 on invalid tokens, in the inputs' dtype promoted to float32;
pass them as ``compute_grpo_loss(..., token_weights=w)``. Metrics (detached scalars, means over
valid tokens, 0 when there are none): ``rollout_is_truncated_frac`` or ``rollout_is_masked_frac``
(fraction of valid tokens whose weight exceeded C), ``rollout_is_mean`` (mean of ``w'``) and
``rollout_kl_k3`` = mean of ``expm1(d) - d`` with ``d`` clamped to +-20, Schulman's k3 estimate of
``KL(pi_roll || pi_old)`` on tokens sampled from ``pi_roll``. See ``/work/shared/ROLLOUT.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_vrft.rl.aggregation import masked_token_mean
from megatron_vrft.rl.registry import Registry

LogWeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ROLLOUT_IS_LEVELS: Registry[LogWeightFn] = Registry("rollout correction level")
ROLLOUT_IS_MODES = ("truncate", "mask")
_FRAC_KEY = {"truncate": "rollout_is_truncated_frac", "mask": "rollout_is_masked_frac"}


@ROLLOUT_IS_LEVELS.register("token")
def token_log_weights(log_ratio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` masked log-ratio -> ``(B, T)`` per-token log-weights (the log-ratio itself)."""
    return log_ratio


@ROLLOUT_IS_LEVELS.register("sequence")
def sequence_log_weights(log_ratio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` masked log-ratio -> ``(B, T)``: the row sum broadcast to every token."""
    return log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)


def compute_rollout_correction(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    threshold: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(B, T)`` x3 -> (weights ``(B, T)`` detached, metrics); see the module docstring."""
    if not old_log_probs.shape == rollout_log_probs.shape == response_mask.shape:
        raise ValueError("old_log_probs, rollout_log_probs and response_mask must share one (B, T) shape")
    if mode not in ROLLOUT_IS_MODES:
        raise KeyError(f"unknown rollout correction mode {mode!r}; registered: {list(ROLLOUT_IS_MODES)}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    level_fn = ROLLOUT_IS_LEVELS.get(level)
    dtype = torch.promote_types(old_log_probs.dtype, torch.float32)
    valid = response_mask != 0
    zero = torch.zeros((), dtype=dtype, device=old_log_probs.device)
    d = torch.where(valid, old_log_probs.detach().to(dtype) - rollout_log_probs.detach().to(dtype), zero)
    w = torch.exp(level_fn(d, valid))
    over = valid & (w > threshold)
    if mode == "truncate":
        w = torch.where(over, torch.full_like(w, threshold), w)
    else:
        w = torch.where(over, zero, w)
    w = torch.where(valid, w, zero)
    m = valid.to(dtype)
    dc = d.clamp(-20.0, 20.0)
    metrics = {
        _FRAC_KEY[mode]: masked_token_mean(over.to(dtype), m),
        "rollout_is_mean": masked_token_mean(w, m),
        "rollout_kl_k3": masked_token_mean(torch.expm1(dc) - dc, m),
    }
    return w, metrics
