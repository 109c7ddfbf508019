"""Two more registered policy losses: GSPO (sequence-level ratio) and CISPO (clipped IS weight).

Same calling convention and ``TokenPolicyLoss`` output as ``megatron_vrft.rl.policy_loss``; ``sg`` is
stop-gradient, ``V_b = {t : mask_bt != 0}`` the valid tokens of row ``b``, ``n_b = |V_b|``::

    gspo   log_s_b = clamp(mean_{t in V_b} (logp - old_logp), +-log_ratio_clamp)   (0 if n_b = 0)
           s_bt    = exp(sg[log_s_b] + logp_bt - sg[logp_bt])      (value s_b, d/dlogp_bt = s_b)
           L       = max(-A s_bt, -A clip(s_bt, 1 - eps_low, 1 + eps_high))
    cispo  r = exp(clamp(logp - old_logp, +-log_ratio_clamp))
           L = -sg[clip(r, 1 - eps_low, 1 + eps_high)] * A * logp

GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization") needs ``response_mask``; its token
form gives each token the gradient ``-A s_b dlogp_bt`` (0 on clipped rows), which after
``seq-mean-token-mean`` aggregation is exactly the gradient of the sequence objective. Branch choice
uses the strict comparison of ``ppo_clip``; the clip flags and ``ratio`` are per token, equal to
``s_b`` across a row, and ``log_ratio`` is ``log_s_b``. Typical GSPO eps are ~3e-4 / 4e-4.

CISPO (MiniMax-M1) never zeroes a gradient: every token gets ``-w A dlogp`` with the detached,
clipped weight ``w``; its value is ``-w A logp`` (not a ratio surrogate). Its clip flags mark where
``r`` is outside the clip range, whatever the sign of ``A``; ``clip_eps_low = 1`` drops the lower
bound (as in MiniMax-M1). ``clip_ratio_c`` is unused by both.
"""

from __future__ import annotations

import torch

from megatron_vrft.rl.policy_loss import POLICY_LOSSES, TokenPolicyLoss, clipped_surrogate, expand_advantages


def _check_eps(clip_eps_low: float, clip_eps_high: float, max_low: float) -> None:
    if not (0.0 <= clip_eps_low <= max_low and clip_eps_high >= 0.0):
        raise ValueError(
            f"need 0 <= clip_eps_low <= {max_low} and clip_eps_high >= 0, got {clip_eps_low}, {clip_eps_high}"
        )


def sequence_log_ratio(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    log_ratio_clamp: float | None = 20.0,
) -> torch.Tensor:
    """``(B, T)`` -> ``(B,)`` detached ``clamp(mean_{valid t} (logp - old_logp))``; 0 on empty rows."""
    if response_mask is None or response_mask.shape != log_probs.shape:
        raise ValueError("gspo needs response_mask (B, T) with the shape of log_probs")
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    valid = response_mask != 0
    diff = log_probs.detach().to(dtype) - old_log_probs.detach().to(dtype)
    total = torch.where(valid, diff, torch.zeros((), dtype=dtype, device=diff.device)).sum(-1)
    log_s = total / valid.sum(-1).clamp(min=1).to(dtype)
    if log_ratio_clamp is not None:
        log_s = log_s.clamp(-log_ratio_clamp, log_ratio_clamp)
    return log_s


@POLICY_LOSSES.register("gspo")
def compute_gspo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    log_ratio_clamp: float | None = 20.0,
    response_mask: torch.Tensor | None = None,
) -> TokenPolicyLoss:
    """GSPO-token loss ``(B, T)``; see the module docstring. Needs ``old_log_probs`` and ``response_mask``."""
    if old_log_probs is None:
        raise ValueError("gspo needs old_log_probs")
    _check_eps(clip_eps_low, clip_eps_high, max_low=1.0)
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    logp = log_probs.to(dtype)
    adv = expand_advantages(advantages, log_probs).to(dtype)
    log_s = sequence_log_ratio(log_probs, old_log_probs, response_mask, log_ratio_clamp)
    ratio = torch.exp(log_s.unsqueeze(-1) + logp - logp.detach())
    loss, ratio_d, low, high = clipped_surrogate(ratio, adv, clip_eps_low, clip_eps_high)
    return TokenPolicyLoss(
        loss=loss,
        ratio=ratio_d,
        log_ratio=log_s.unsqueeze(-1).expand_as(ratio_d),
        clipped_low=low,
        clipped_high=high,
        dual_clipped=torch.zeros_like(low),
    )


@POLICY_LOSSES.register("cispo")
def compute_cispo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    log_ratio_clamp: float | None = 20.0,
    response_mask: torch.Tensor | None = None,
) -> TokenPolicyLoss:
    """CISPO loss ``(B, T)``: ``-sg[clip(r)] * A * logp``; needs ``old_log_probs``."""
    if old_log_probs is None:
        raise ValueError("cispo needs old_log_probs")
    _check_eps(clip_eps_low, clip_eps_high, max_low=1.0)
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    logp = log_probs.to(dtype)
    adv = expand_advantages(advantages, log_probs).to(dtype)
    log_ratio = logp.detach() - old_log_probs.detach().to(dtype)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = -weight * adv * logp
    return TokenPolicyLoss(
        loss=loss,
        ratio=ratio,
        log_ratio=log_ratio,
        clipped_low=ratio < 1.0 - clip_eps_low,
        clipped_high=ratio > 1.0 + clip_eps_high,
        dual_clipped=torch.zeros_like(ratio, dtype=torch.bool),
    )
