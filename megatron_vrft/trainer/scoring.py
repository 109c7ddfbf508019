"""The rewards stage: a :class:`RolloutBatch` -> a :class:`ScoredBatch` (rewards and advantages)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron_vrft.rewards import GroundTruth, compute_rewards
from megatron_vrft.rl import compute_advantages
from megatron_vrft.rollout.types import RolloutBatch, ScoredBatch


def score_rollout(
    batch: RolloutBatch,
    reward_ground_truths: Sequence[GroundTruth],
    *,
    terms: list[tuple[str, float]],
    options: dict[str, dict[str, Any]],
    advantage_estimator: str,
) -> ScoredBatch:
    """Score every row against its prompt's ground truth (``reward_ground_truths[g]`` for group
    ``g``) and compute advantages within each group."""
    gts = [reward_ground_truths[int(g)] for g in batch.group_ids]
    scores = compute_rewards(batch.texts, gts, terms, reward_options=options)
    advantages = compute_advantages(advantage_estimator, scores.total, batch.group_ids)
    return ScoredBatch(
        rollout=batch,
        rewards=scores.total,
        reward_columns=dict(scores.scores),
        parse_failures={n: dict(f) for n, f in scores.failures.items()},
        advantages=advantages.float(),
    )


def scored_metrics(scored: ScoredBatch, group_size: int) -> dict[str, float]:
    """Reward, advantage and response statistics of a scored batch."""
    n = len(scored)
    out = {"reward/total": float(scored.rewards.mean())}
    for name, col in scored.reward_columns.items():
        out[f"reward/{name}"] = float(col.mean())
        for reason, count in scored.parse_failures.get(name, {}).items():
            out[f"parse_fail/{name}/{reason}"] = count / n
    lengths = scored.rollout.response_lengths().float()
    out["response/length_mean"] = float(lengths.mean())
    out["response/truncated_frac"] = sum(r == "length" for r in scored.rollout.finish_reasons) / n
    out["advantage/abs_mean"] = float(scored.advantages.abs().mean())
    groups = scored.rewards.view(-1, group_size)
    out["advantage/zero_std_group_frac"] = float((groups.std(dim=1) == 0).float().mean()) if group_size > 1 else 1.0
    return out
