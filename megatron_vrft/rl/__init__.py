"""GRPO algorithm math: pure functions of tensors and explicit scalars, selected by name.

Registries (each raises on a duplicate name and on an unknown one):
advantage estimators (``grpo``, ``drgrpo``, ``grpo_batch_std``), policy losses (``ppo_clip``,
``dual_clip``, ``visual_rft_unclipped``, ``gspo``, ``cispo``), KL estimators (``k1``, ``k2``,
``k3``), loss aggregators (``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``,
``seq-mean-token-sum-norm``) and rollout-correction levels (``token``, ``sequence``; modes
``truncate``, ``mask``).

``compute_grpo_loss`` also takes ``token_weights`` (e.g. from ``compute_rollout_correction``, which
corrects the rollout engine/trainer log-prob mismatch) and ``kl_importance_weighted`` (TRL's KL bias
correction).
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
from megatron_vrft.rl.gspo_cispo import compute_cispo_loss, compute_gspo_loss, sequence_log_ratio
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
from megatron_vrft.rl.rollout_correction import (
    ROLLOUT_IS_LEVELS,
    ROLLOUT_IS_MODES,
    compute_rollout_correction,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATORS",
    "POLICY_LOSSES",
    "ROLLOUT_IS_LEVELS",
    "ROLLOUT_IS_MODES",
    "PolicyLossResult",
    "Registry",
    "TokenPolicyLoss",
    "aggregate_loss",
    "compute_advantages",
    "compute_cispo_loss",
    "compute_drgrpo_advantages",
    "compute_dual_clip_loss",
    "compute_entropy_from_logits",
    "compute_entropy_from_logprobs",
    "compute_entropy_loss",
    "compute_group_stats",
    "compute_grpo_advantages",
    "compute_grpo_batch_std_advantages",
    "compute_gspo_loss",
    "compute_grpo_loss",
    "compute_kl",
    "compute_policy_loss",
    "compute_policy_metrics",
    "compute_ppo_clip_loss",
    "compute_rollout_correction",
    "compute_visual_rft_unclipped_loss",
    "expand_advantages",
    "get_advantage_estimator",
    "get_kl_estimator",
    "get_loss_aggregator",
    "get_policy_loss",
    "masked_token_mean",
    "sequence_log_ratio",
]
