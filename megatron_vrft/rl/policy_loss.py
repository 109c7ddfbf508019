"""Per-token policy-gradient losses (PPO clip, dual-clip, Visual-RFT's unclipped GRPO).

Notation, per token: ``A`` advantage (``(B,)`` broadcast over tokens, or ``(B, T)``),
``log_r = clamp(logp - old_logp, -log_ratio_clamp, log_ratio_clamp)``, ``r = exp(log_r)``::

    ppo_clip              L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    dual_clip             L = min(L_ppo_clip, -A c)   where A < 0,   L_ppo_clip elsewhere   (c > 1)
    visual_rft_unclipped  L = -A r,  r = exp(logp - stopgrad(logp))  (old := new detached, r = 1)

``eps_low != eps_high`` is DAPO's clip-higher. Every registered loss takes the same keyword
arguments, including ``response_mask`` ``(B, T)`` (read only by sequence-level losses such as
``gspo``; ``gspo`` and ``cispo`` live in ``megatron_vrft.rl.gspo_cispo``). The unclipped variant is
the single-update GRPO of TRL's ``GRPOTrainer`` used by Visual-RFT: its value is ``-A`` and its
gradient ``-A * dlogp``; it ignores ``old_log_probs``.

Branch choice (and so the gradient) is made with strict comparisons: the clipped term is taken only
when ``-A clip(r) > -A r`` (so ``r`` is strictly outside the clip range and the term is constant),
and the dual-clip constant only when ``-A c < L_ppo_clip``. Hence
``dL/dlogp = -A r`` on unclipped tokens and 0 on clipped ones (times the ``log_r`` clamp's 0/1).
The fused Triton kernel (``megatron_vrft.ops.grpo_loss``) implements exactly these rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_vrft.rl.registry import Registry


@dataclass(kw_only=True)
class TokenPolicyLoss:
    """Per-token output of a registered policy loss; every field is ``(B, T)``."""

    loss: torch.Tensor
    """Per-token loss ``L`` (differentiable w.r.t. ``log_probs``), before masking/aggregation."""
    ratio: torch.Tensor
    """Importance ratio ``r`` (detached)."""
    log_ratio: torch.Tensor
    """Clamped ``log r`` (detached); 0 for the unclipped variant."""
    clipped_low: torch.Tensor
    """Bool: the ``1 - eps_low`` bound is active (``A < 0``, ``r < 1 - eps_low``)."""
    clipped_high: torch.Tensor
    """Bool: the ``1 + eps_high`` bound is active (``A > 0``, ``r > 1 + eps_high``)."""
    dual_clipped: torch.Tensor
    """Bool: the dual-clip constant ``-A c`` is active."""


PolicyLossFn = Callable[..., TokenPolicyLoss]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def expand_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` or ``(B, T)`` advantages -> broadcastable to ``like (B, T)``."""
    if advantages.dim() == 1 and like.dim() == 2 and advantages.shape[0] == like.shape[0]:
        return advantages.unsqueeze(-1)
    if advantages.shape == like.shape:
        return advantages
    raise ValueError(f"advantages {tuple(advantages.shape)} must be (B,) or (B, T) for log-probs {tuple(like.shape)}")


def _compute_dtype(log_probs: torch.Tensor) -> torch.dtype:
    return torch.promote_types(log_probs.dtype, torch.float32)


def _clipped(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    log_ratio_clamp: float | None,
) -> tuple[torch.Tensor, ...]:
    if old_log_probs is None:
        raise ValueError("ppo_clip / dual_clip need old_log_probs")
    if not (0.0 <= clip_eps_low < 1.0 and clip_eps_high >= 0.0):
        raise ValueError(f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low}, {clip_eps_high}")
    dtype = _compute_dtype(log_probs)
    adv = expand_advantages(advantages, log_probs).to(dtype)
    log_ratio = log_probs.to(dtype) - old_log_probs.to(dtype)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    loss, ratio_d, low, high = clipped_surrogate(torch.exp(log_ratio), adv, clip_eps_low, clip_eps_high)
    return loss, adv, ratio_d, log_ratio.detach(), low, high


def clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, clip_eps_low: float, clip_eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` (strict comparison picks the branch);
    returns ``(loss, detached ratio, clipped below 1, clipped above 1)``. Token (PPO) and sequence
    (GSPO) ratios share it."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    is_clipped = clipped > unclipped
    loss = torch.where(is_clipped, clipped, unclipped)
    ratio_d = ratio.detach()
    return loss, ratio_d, is_clipped & (ratio_d < 1), is_clipped & (ratio_d > 1)


@POLICY_LOSSES.register("ppo_clip")
def compute_ppo_clip_loss(
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
    """PPO clipped surrogate with separate low/high clip (``clip_ratio_c`` unused)."""
    loss, _, ratio, log_ratio, low, high = _clipped(
        log_probs, old_log_probs, advantages, clip_eps_low, clip_eps_high, log_ratio_clamp
    )
    return TokenPolicyLoss(
        loss=loss,
        ratio=ratio,
        log_ratio=log_ratio,
        clipped_low=low,
        clipped_high=high,
        dual_clipped=torch.zeros_like(low),
    )


@POLICY_LOSSES.register("dual_clip")
def compute_dual_clip_loss(
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
    """Dual-clip PPO: ppo_clip, then ``min(., -A c)`` on tokens with ``A < 0``; needs ``c > 1``."""
    if not clip_ratio_c > 1.0:
        raise ValueError(f"dual-clip needs clip_ratio_c > 1, got {clip_ratio_c}")
    loss, adv, ratio, log_ratio, low, high = _clipped(
        log_probs, old_log_probs, advantages, clip_eps_low, clip_eps_high, log_ratio_clamp
    )
    bound = -adv * clip_ratio_c
    dual = (adv < 0) & (bound < loss)
    loss = torch.where(dual, bound, loss)
    return TokenPolicyLoss(
        loss=loss,
        ratio=ratio,
        log_ratio=log_ratio,
        clipped_low=low,
        clipped_high=high,
        dual_clipped=dual,
    )


@POLICY_LOSSES.register("visual_rft_unclipped")
def compute_visual_rft_unclipped_loss(
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
    """``-A * exp(logp - stopgrad(logp))``: value ``-A``, gradient ``-A``; other arguments unused."""
    dtype = _compute_dtype(log_probs)
    logp = log_probs.to(dtype)
    adv = expand_advantages(advantages, log_probs).to(dtype)
    ratio = torch.exp(logp - logp.detach())
    loss = -adv * ratio
    flags = torch.zeros(loss.shape, dtype=torch.bool, device=loss.device)
    return TokenPolicyLoss(
        loss=loss,
        ratio=ratio.detach(),
        log_ratio=torch.zeros_like(loss).detach(),
        clipped_low=flags,
        clipped_high=flags,
        dual_clipped=flags,
    )


def get_policy_loss(name: str) -> PolicyLossFn:
    """Look up ``"ppo_clip" | "dual_clip" | "visual_rft_unclipped" | "gspo" | "cispo"``."""
    return POLICY_LOSSES.get(name)
