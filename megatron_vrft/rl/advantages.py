"""Group-relative advantage estimators (outcome rewards, one scalar per response).

Inputs: ``rewards (B,)`` with ``group_ids (B,)`` (any integer labels; responses to the same prompt
share a label, groups may have different sizes and need not be contiguous), or ``rewards
(num_groups, G)`` with ``group_ids=None`` (each row is a group). The output has the shape of
``rewards``. For group ``g`` with ``n_g`` members::

    mean_g = (1/n_g) sum_{i in g} r_i
    std_g  = sqrt( sum_{i in g} (r_i - mean_g)^2 / (n_g - 1) )      (unbiased, Bessel)

    grpo            A_i = (r_i - mean_g) / (std_g + eps)
    drgrpo          A_i =  r_i - mean_g                              (Dr.GRPO: no std division)
    grpo_batch_std  A_i = (r_i - mean_g) / (std_batch + eps)         (group mean, batch std)

where ``std_batch`` is the unbiased std of all ``B`` rewards.

Std choice: the unbiased (Bessel, ``n - 1``) estimator, as ``torch.std`` computes by default and as
the reference GRPO implementations (TRL's ``GRPOTrainer`` used by Visual-RFT, verl) do. A group of
size 1 has no spread: its advantage is 0, not NaN.

Identical rewards: a group whose rewards are all equal gets exactly 0 advantage. This is enforced
explicitly (``max == min``), because ``r - mean`` is not exactly 0 in floating point (three copies
of 0.1 average to 0.10000000000000002), and dividing that rounding error by ``std + eps`` would
produce a spurious signal. Gradients w.r.t. ``rewards`` are finite everywhere (no sqrt of 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_vrft.rl.registry import Registry

AdvantageEstimator = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def _flatten_groups(rewards: torch.Tensor, group_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (rewards (B,), dense group index (B,) in [0, num_groups), num_groups)."""
    if group_ids is None:
        if rewards.dim() != 2:
            raise ValueError(f"rewards without group_ids must be (num_groups, G), got {tuple(rewards.shape)}")
        num_groups, size = rewards.shape
        index = torch.arange(num_groups, device=rewards.device).repeat_interleave(size)
        return rewards.reshape(-1), index, num_groups
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    _, index = torch.unique(group_ids, return_inverse=True)
    return rewards, index, int(index.max().item()) + 1 if index.numel() else 0


def compute_group_stats(
    rewards: torch.Tensor, group_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response group statistics, each with the shape of ``rewards``.

    Returns ``(centered, std, spread)``: ``centered = r - mean_g`` (exactly 0 for identical groups),
    ``std = std_g`` (unbiased; 1 where the group has no spread, so that it is safe to divide by),
    ``spread`` a bool that is True where the group has at least two distinct rewards.
    """
    flat, index, num_groups = _flatten_groups(rewards, group_ids)
    if not flat.dtype.is_floating_point:
        flat = flat.to(torch.float32)
    zeros = flat.new_zeros(num_groups)
    count = zeros.index_add(0, index, torch.ones_like(flat))
    mean = zeros.index_add(0, index, flat) / count  # every dense group has count >= 1
    centered = flat - mean[index]
    detached = flat.detach()
    group_max = zeros.scatter_reduce(0, index, detached, "amax", include_self=False)
    group_min = zeros.scatter_reduce(0, index, detached, "amin", include_self=False)
    spread_g = group_max != group_min  # False for singleton groups too
    spread = spread_g[index]
    centered = torch.where(spread, centered, torch.zeros((), dtype=flat.dtype))
    var = zeros.index_add(0, index, centered * centered) / (count - 1).clamp(min=1)
    std_g = torch.sqrt(torch.where(spread_g, var, torch.ones((), dtype=flat.dtype)))
    shape = rewards.shape
    return centered.reshape(shape), std_g[index].reshape(shape), spread.reshape(shape)


@ADVANTAGE_ESTIMATORS.register("grpo")
def compute_grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: ``(r - mean_g) / (std_g + eps)``; 0 for groups without spread. Shape of ``rewards``."""
    centered, std, spread = compute_group_stats(rewards, group_ids)
    return torch.where(spread, centered / (std + eps), torch.zeros((), dtype=centered.dtype))


@ADVANTAGE_ESTIMATORS.register("drgrpo")
def compute_drgrpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *, eps: float = 1e-6
) -> torch.Tensor:
    """Dr.GRPO: ``r - mean_g`` (``eps`` unused). Shape of ``rewards``."""
    centered, _, _ = compute_group_stats(rewards, group_ids)
    return centered


@ADVANTAGE_ESTIMATORS.register("grpo_batch_std")
def compute_grpo_batch_std_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor | None = None, *, eps: float = 1e-6
) -> torch.Tensor:
    """Group mean, batch std: ``(r - mean_g) / (std_batch + eps)``; ``std_batch`` unbiased over B."""
    centered, _, _ = compute_group_stats(rewards, group_ids)
    flat = rewards.reshape(-1).to(centered.dtype)
    if flat.numel() < 2:
        return centered
    dev = flat - flat.mean()
    var = (dev * dev).sum() / (flat.numel() - 1)
    # var == 0 means every reward is equal, so every centered value is already exactly 0.
    std = torch.sqrt(torch.where(var > 0, var, torch.ones((), dtype=var.dtype)))
    return centered / (std + eps)


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """Look up ``"grpo" | "drgrpo" | "grpo_batch_std"``."""
    return ADVANTAGE_ESTIMATORS.get(name)


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Run the named estimator; ``rewards (B,)`` + ``group_ids (B,)`` or ``(num_groups, G)``."""
    return ADVANTAGE_ESTIMATORS.get(name)(rewards, group_ids, eps=eps)
