"""The GRPO objective: policy loss + KL penalty, aggregated, with training metrics.

``compute_grpo_loss`` is the one implementation of the loss: its torch code is the reference, and
``impl="auto"`` dispatches to the fused Triton kernel (``megatron_vrft.ops.grpo_loss``, same
argument names and semantics) where it can run::

    per_token = w * L_policy(logp, old_logp, A)  +  kl_coef * rho * KL(logp, ref_logp)
    loss      = aggregate(per_token, response_mask, loss_agg_mode)

``w`` is ``token_weights`` ``(B, T)`` (detached; e.g. the rollout-mismatch weights of
``rollout_correction.compute_rollout_correction``), 1 when ``None``. ``rho`` is 1 unless
``kl_importance_weighted`` (TRL's KL bias correction): then ``rho = sg[exp(log_r)]`` with the clamped
``log r = logp - old_logp`` (1 without ``old_log_probs``), because the tokens were sampled from
``pi_old``, not the current policy. The fused kernel supports neither (both default off).

Metrics (detached scalars; token means are over valid tokens, 0 when there are none):

- ``pg_loss``, ``kl_loss``: the two terms (``w * L_policy``, ``rho * KL``) aggregated with
  ``loss_agg_mode`` (``loss = pg_loss + kl_coef * kl_loss``; ``kl_loss`` only with ``ref_log_probs``).
- ``clip_frac_low``, ``clip_frac_high``, ``clip_frac`` (their sum), ``dual_clip_frac``: token
  fractions where each bound is active (see ``policy_loss.TokenPolicyLoss``).
- ``approx_kl``: token mean of ``(r - 1) - log r`` with ``log r = logp - old_logp`` (clamped), i.e.
  Schulman's k3 estimate of ``KL(pi_old || pi_theta)`` on tokens sampled from ``pi_old``; 0 for the
  unclipped variant, whose ratio is 1 by construction.
- ``ratio_mean``, ``ratio_min``, ``ratio_max`` over valid tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import megatron_vrft.rl.gspo_cispo  # noqa: F401  (registers "gspo" and "cispo")
from megatron_vrft.ops.grpo_loss import POLICY_LOSS_CODES as FUSED_POLICY_LOSSES
from megatron_vrft.ops.grpo_loss import fused_grpo_loss, triton_usable
from megatron_vrft.rl.aggregation import aggregate_loss, masked_token_mean
from megatron_vrft.rl.kl import compute_kl
from megatron_vrft.rl.policy_loss import POLICY_LOSSES, TokenPolicyLoss


@dataclass(kw_only=True)
class PolicyLossResult:
    """Output of ``compute_policy_loss`` / ``compute_grpo_loss``."""

    loss: torch.Tensor
    """Scalar loss to back-propagate."""
    per_token_loss: torch.Tensor
    """``(B, T)`` per-token loss before masking/aggregation (differentiable)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalar tensors keyed by metric name (see the module docstring)."""


def compute_policy_metrics(token: TokenPolicyLoss, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clip fractions, approx KL and ratio statistics of one policy-loss evaluation."""
    m = mask.to(token.ratio.dtype)
    low = masked_token_mean(token.clipped_low.to(m.dtype), m)
    high = masked_token_mean(token.clipped_high.to(m.dtype), m)
    log_r = token.log_ratio
    valid = m != 0
    any_valid = valid.any()
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    ratio_min = torch.where(valid, token.ratio, torch.full_like(token.ratio, float("inf"))).min()
    ratio_max = torch.where(valid, token.ratio, torch.full_like(token.ratio, float("-inf"))).max()
    return {
        "clip_frac_low": low,
        "clip_frac_high": high,
        "clip_frac": low + high,
        "dual_clip_frac": masked_token_mean(token.dual_clipped.to(m.dtype), m),
        "approx_kl": masked_token_mean(torch.expm1(log_r) - log_r, m),
        "ratio_mean": masked_token_mean(token.ratio, m),
        "ratio_min": torch.where(any_valid, ratio_min, zero),
        "ratio_max": torch.where(any_valid, ratio_max, zero),
    }


def compute_policy_loss(
    name: str,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    log_ratio_clamp: float | None = 20.0,
    max_response_length: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> PolicyLossResult:
    """Named policy loss, aggregated. ``log_probs``/``old_log_probs``/``response_mask`` ``(B, T)``,
    ``advantages`` ``(B,)`` or ``(B, T)``."""
    return compute_grpo_loss(
        log_probs,
        old_log_probs,
        None,
        advantages,
        response_mask,
        policy_loss=name,
        loss_agg_mode=loss_agg_mode,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        clip_ratio_c=clip_ratio_c,
        kl_coef=0.0,
        log_ratio_clamp=log_ratio_clamp,
        max_response_length=max_response_length,
        normalizer=normalizer,
    )


def fused_supports(
    log_probs: torch.Tensor,
    *,
    policy_loss: str,
    token_weights: torch.Tensor | None = None,
    kl_importance_weighted: bool = False,
) -> bool:
    """Whether the fused kernel can run this call: Triton usable on these log-probs, and only the
    options it implements (its policy losses; no token weights, no importance-weighted KL)."""
    return (
        triton_usable(log_probs)
        and policy_loss in FUSED_POLICY_LOSSES
        and token_weights is None
        and not kl_importance_weighted
    )


def compute_grpo_loss(
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
    kl_importance_weighted: bool = False,
    token_weights: torch.Tensor | None = None,
    impl: str = "torch",
) -> PolicyLossResult:
    """GRPO loss; see the module docstring. ``log_ratio_clamp`` bounds both ``logp - old_logp`` and
    ``logp - ref_logp``; ``kl_clamp`` bounds the KL estimate. ``token_weights`` ``(B, T)`` scales
    the per-token policy loss; ``kl_importance_weighted`` scales the KL term by the detached ratio
    ``exp(logp - old_logp)``.

    ``impl``: ``"torch"`` (this function's torch code: the reference), ``"fused"`` (the Triton
    kernel ``ops.grpo_loss.fused_grpo_loss``; raises where it cannot run or lacks an option) or
    ``"auto"`` (the kernel where Triton runs and it has every option asked for, else torch).
    """
    if impl not in ("torch", "fused", "auto"):
        raise ValueError(f"impl must be 'torch', 'fused' or 'auto', got {impl!r}")
    if impl != "torch":
        fused_ok = fused_supports(
            log_probs,
            policy_loss=policy_loss,
            token_weights=token_weights,
            kl_importance_weighted=kl_importance_weighted,
        )
        if impl == "fused" and not fused_ok:
            raise ValueError(
                f"the fused GRPO loss cannot run this call (policy loss {policy_loss!r}, dtype "
                f"{log_probs.dtype}, device {log_probs.device}, token_weights={token_weights is not None}, "
                f"kl_importance_weighted={kl_importance_weighted}); use impl='auto' or 'torch'"
            )
        if fused_ok:
            out = fused_grpo_loss(
                log_probs,
                old_log_probs,
                ref_log_probs,
                advantages,
                response_mask,
                policy_loss=policy_loss,
                loss_agg_mode=loss_agg_mode,
                clip_eps_low=clip_eps_low,
                clip_eps_high=clip_eps_high,
                clip_ratio_c=clip_ratio_c,
                kl_estimator=kl_estimator,
                kl_coef=kl_coef,
                kl_clamp=kl_clamp,
                log_ratio_clamp=log_ratio_clamp,
                max_response_length=max_response_length,
                normalizer=normalizer,
            )
            return PolicyLossResult(loss=out.loss, per_token_loss=out.per_token_loss, metrics=dict(out.metrics))
    if log_probs.dim() != 2 or response_mask.shape != log_probs.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)} and response_mask {tuple(response_mask.shape)} must both be (B, T)"
        )
    if kl_coef != 0.0 and ref_log_probs is None:
        raise ValueError("kl_coef != 0 needs ref_log_probs")
    token = POLICY_LOSSES.get(policy_loss)(
        log_probs,
        old_log_probs,
        advantages,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        clip_ratio_c=clip_ratio_c,
        log_ratio_clamp=log_ratio_clamp,
        response_mask=response_mask,
    )
    agg = dict(max_response_length=max_response_length, normalizer=normalizer)
    per_token = token.loss
    if token_weights is not None:
        if token_weights.shape != log_probs.shape:
            raise ValueError(f"token_weights {tuple(token_weights.shape)} must be (B, T) like log_probs")
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    metrics = compute_policy_metrics(token, response_mask)
    metrics["pg_loss"] = aggregate_loss(per_token, response_mask, loss_agg_mode, **agg).detach()
    if ref_log_probs is not None:
        kl = compute_kl(
            log_probs,
            ref_log_probs,
            kl_estimator,
            log_ratio_clamp=log_ratio_clamp,
            kl_clamp=kl_clamp,
        )
        if kl_importance_weighted and old_log_probs is not None:
            log_r = log_probs.detach().to(kl.dtype) - old_log_probs.detach().to(kl.dtype)
            if log_ratio_clamp is not None:
                log_r = log_r.clamp(-log_ratio_clamp, log_ratio_clamp)
            kl = torch.exp(log_r) * kl
        metrics["kl_loss"] = aggregate_loss(kl, response_mask, loss_agg_mode, **agg).detach()
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl
    loss = aggregate_loss(per_token, response_mask, loss_agg_mode, **agg)
    return PolicyLossResult(loss=loss, per_token_loss=per_token, metrics=metrics)
