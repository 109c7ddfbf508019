"""GRPO algorithm math: pure functions of tensors and explicit scalars, selected by name.

Registries (each raises on a duplicate name and on an unknown one):
advantage estimators (``grpo``, ``drgrpo``, ``grpo_batch_std``), policy losses (``ppo_clip``,
``dual_clip``, ``visual_rft_unclipped``), KL estimators (``k1``, ``k2``, ``k3``) and loss
aggregators (``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``,
``seq-mean-token-sum-norm``).
"""

from megatron_vrft.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    compute_drgrpo_advantages,
    compute_group_stats,
    compute_grpo_advantages,
    compute_grpo_batch_std_advantages,
    get_advantage_estimator,
)
from megatron_vrft.rl.aggregation import (
    LOSS_AGGREGATORS,
    aggregate_loss,
    get_loss_aggregator,
    masked_token_mean,
)
from megatron_vrft.rl.entropy import (
    compute_entropy_from_logits,
    compute_entropy_from_logprobs,
    compute_entropy_loss,
)
from megatron_vrft.rl.kl import KL_ESTIMATORS, compute_kl, get_kl_estimator
from megatron_vrft.rl.loss import (
    PolicyLossResult,
    compute_grpo_loss,
    compute_policy_loss,
    compute_policy_metrics,
)
from megatron_vrft.rl.policy_loss import (
    POLICY_LOSSES,
    TokenPolicyLoss,
    compute_dual_clip_loss,
    compute_ppo_clip_loss,
    compute_visual_rft_unclipped_loss,
    expand_advantages,
    get_policy_loss,
)
from megatron_vrft.rl.registry import Registry

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATORS",
    "POLICY_LOSSES",
    "PolicyLossResult",
    "Registry",
    "TokenPolicyLoss",
    "aggregate_loss",
    "compute_advantages",
    "compute_drgrpo_advantages",
    "compute_dual_clip_loss",
    "compute_entropy_from_logits",
    "compute_entropy_from_logprobs",
    "compute_entropy_loss",
    "compute_group_stats",
    "compute_grpo_advantages",
    "compute_grpo_batch_std_advantages",
    "compute_grpo_loss",
    "compute_kl",
    "compute_policy_loss",
    "compute_policy_metrics",
    "compute_ppo_clip_loss",
    "compute_visual_rft_unclipped_loss",
    "expand_advantages",
    "get_advantage_estimator",
    "get_kl_estimator",
    "get_loss_aggregator",
    "get_policy_loss",
    "masked_token_mean",
]
