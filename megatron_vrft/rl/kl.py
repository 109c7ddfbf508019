"""Per-token KL penalty to the reference policy, from sampled-token log-probs.

With ``d = clamp(logp - ref_logp, -log_ratio_clamp, log_ratio_clamp)`` (the log-ratio of the current
policy to the reference on the sampled token; Schulman, "Approximating KL Divergence")::

    k1  d                          unbiased, high variance, can be negative
    k2  0.5 * d^2                  biased, low variance
    k3  exp(-d) + d - 1            = (ref/p - 1) - log(ref/p): unbiased for KL(p || ref), >= 0

and the estimate is then clamped to ``[-kl_clamp, kl_clamp]``.

Two clamps, two reasons: the log-ratio clamp bounds ``exp(-d)`` (without it a token the reference
finds far likelier overflows k3 to inf, and inf * 0 in the backward of the estimate clamp is NaN);
the estimate clamp (verl's ``low_var_kl`` uses 10) limits the pull of a single outlier token. Both
are ``torch.clamp``: tokens outside a clamp's range get zero gradient, the bounds themselves pass
gradient. ``None`` disables a clamp. Shapes: ``(B, T), (B, T) -> (B, T)``; computed in the inputs'
dtype promoted to at least float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_vrft.rl.registry import Registry

KLEstimator = Callable[[torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """``d`` where ``d = logp - ref_logp``."""
    return log_ratio


@KL_ESTIMATORS.register("k2")
def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """``0.5 * d^2``."""
    return 0.5 * log_ratio * log_ratio


@KL_ESTIMATORS.register("k3")
def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """``exp(-d) + d - 1`` (``expm1`` keeps it accurate and >= 0 for small ``d``)."""
    return torch.expm1(-log_ratio) + log_ratio


def get_kl_estimator(name: str) -> KLEstimator:
    """Look up ``"k1" | "k2" | "k3"``: a function of the log-ratio ``d = logp - ref_logp``."""
    return KL_ESTIMATORS.get(name)


def compute_kl(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    estimator: str = "k3",
    *,
    log_ratio_clamp: float | None = 20.0,
    kl_clamp: float | None = 10.0,
) -> torch.Tensor:
    """Per-token KL estimate ``(B, T)``; see the module docstring for both clamps."""
    fn = KL_ESTIMATORS.get(estimator)
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    log_ratio = log_probs.to(dtype) - ref_log_probs.to(dtype)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    kl = fn(log_ratio)
    if kl_clamp is not None:
        kl = kl.clamp(-kl_clamp, kl_clamp)
    return kl
