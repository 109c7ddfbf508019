"""Reward registry and the weighted combination the trainer calls.

Every reward has the same signature::

    fn(completions: Sequence[str], ground_truths: Sequence[GroundTruth | dict], **options)
        -> RewardOutput(scores (B,), reasons, failures)

and registers with ``@register_reward(name, min_score=..., max_score=..., failure_score=...)``; a
duplicate name raises. ``compute_rewards`` evaluates a list of ``(name, weight)`` pairs and returns
the weighted sum per completion, one column per reward and the parse-failure counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from megatron_vrft.rewards.types import GroundTruth, ParseFailures, RewardOutput, as_ground_truths


class RewardFn(Protocol):
    def __call__(
        self,
        completions: Sequence[str],
        ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
        **options: Any,
    ) -> RewardOutput: ...


@dataclass(frozen=True, kw_only=True)
class RewardSpec:
    """A registered reward and its score range."""

    name: str
    """Registry name, used in configs."""
    fn: RewardFn
    """The reward function (uniform signature above)."""
    min_score: float
    """Lowest score the function returns."""
    max_score: float
    """Highest score the function returns."""
    failure_score: float
    """Score of a completion that fails to parse (the minimum: failing must never pay)."""


# The only module-level mutable state: an explicit registry that raises on duplicate names.
_REWARDS: dict[str, RewardSpec] = {}


def register_reward(
    name: str,
    *,
    min_score: float = 0.0,
    max_score: float = 1.0,
    failure_score: float | None = None,
) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` as ``name``; raises ``ValueError`` if ``name`` is taken."""
    if not (min_score <= max_score):
        raise ValueError(f"reward {name!r}: min_score {min_score} > max_score {max_score}")
    fail = min_score if failure_score is None else failure_score
    if not (min_score <= fail <= max_score):
        raise ValueError(f"reward {name!r}: failure_score {fail} outside [{min_score}, {max_score}]")

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        _REWARDS[name] = RewardSpec(name=name, fn=fn, min_score=min_score, max_score=max_score, failure_score=fail)
        return fn

    return decorator


def get_reward(name: str) -> RewardSpec:
    """The spec registered as ``name``; ``KeyError`` lists the registered names."""
    try:
        return _REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {available_rewards()}") from None


def available_rewards() -> list[str]:
    return sorted(_REWARDS)


@dataclass(kw_only=True)
class RewardBatch:
    """Result of ``compute_rewards`` for a batch of ``B`` completions."""

    total: torch.Tensor
    """``(B,)`` float32 weighted sum ``sum_k weight_k * scores[name_k]``."""
    scores: dict[str, torch.Tensor]
    """``name -> (B,)`` float32 unweighted scores, in the order the rewards were given."""
    weights: dict[str, float]
    """``name -> weight`` as given."""
    failures: dict[str, ParseFailures]
    """``name -> per-reason parse-failure counts``."""
    reasons: dict[str, list[str | None]]
    """``name -> (B,)`` failure reason per completion (``None``: parsed)."""

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Flat scalar metrics: mean of each column and of the total, and failure fractions."""
        b = int(self.total.shape[0])
        out = {f"{prefix}/total_mean": float(self.total.mean()) if b else 0.0}
        for name, col in self.scores.items():
            out[f"{prefix}/{name}_mean"] = float(col.mean()) if b else 0.0
            out.update(self.failures[name].as_metrics(f"{prefix}/{name}", b))
        return out


def compute_rewards(
    completions: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
    rewards: Sequence[tuple[str, float]],
    *,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> RewardBatch:
    """Evaluate ``rewards = [(name, weight), ...]`` on a batch and sum them with their weights.

    ``reward_options``: ``name -> keyword options`` forwarded to that reward, e.g.
    ``{"accuracy": {"mode": "visual_rft_compat"}, "iou": {"matching": "hungarian"}}``.
    Raises ``ValueError``/``KeyError`` for configuration errors (unknown or duplicate names, options
    for a reward not in the list, mismatched lengths, invalid ground truth); never for bad
    completions.
    """
    if not rewards:
        raise ValueError("compute_rewards needs at least one (name, weight) pair")
    names = [n for n, _ in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate reward names in {names}")
    options = dict(reward_options or {})
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"reward_options given for rewards not in the list: {stray}")
    specs = [get_reward(n) for n in names]
    gts = as_ground_truths(ground_truths, len(completions))
    total = torch.zeros(len(completions), dtype=torch.float32)
    scores, weights, failures, reasons = {}, {}, {}, {}
    for spec, (name, weight) in zip(specs, rewards):
        weight = float(weight)
        out = spec.fn(completions, gts, **options.get(name, {}))
        scores[name] = out.scores
        weights[name] = weight
        failures[name] = out.failures
        reasons[name] = out.reasons
        total = total + weight * out.scores
    return RewardBatch(total=total, scores=scores, weights=weights, failures=failures, reasons=reasons)
