"""Format reward: the completion is ``<think>...</think>`` then ``<answer>...</answer>``, nothing else.

Published rule (Visual-RFT): ``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text,
re.DOTALL)`` scores 1, anything else 0. ``format_matches`` decides the same language in linear
time: with ``fullmatch`` the lazy groups may absorb anything, so the string matches iff it starts
with ``<think>``, ends with ``</answer>``, and the *first* ``</think>\\s*<answer>`` after the opening
tag ends no later than where the closing ``</answer>`` begins (the test checks equivalence with the
published regex). The backtracking regex is quadratic on adversarial input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_vrft.rewards.parsing import MAX_COMPLETION_CHARS
from megatron_vrft.rewards.registry import register_reward
from megatron_vrft.rewards.types import FailureReason as R
from megatron_vrft.rewards.types import GroundTruth, RewardOutput, build_reward_output

PUBLISHED_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"

_THINK_OPEN, _ANSWER_CLOSE = "<think>", "</answer>"
_MIDDLE_RE = re.compile(r"</think>\s*<answer>")


def format_matches(text: str) -> bool:
    """``re.fullmatch(PUBLISHED_FORMAT_PATTERN, text, re.DOTALL) is not None``, in linear time."""
    if not (text.startswith(_THINK_OPEN) and text.endswith(_ANSWER_CLOSE)):
        return False
    close_start = len(text) - len(_ANSWER_CLOSE)
    m = _MIDDLE_RE.search(text, len(_THINK_OPEN))
    return m is not None and m.end() <= close_start


@register_reward("format", min_score=0.0, max_score=1.0)
def format_reward(
    completions: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]] | None = None,
    *,
    max_chars: int = MAX_COMPLETION_CHARS,
) -> RewardOutput:
    """1.0 where the completion matches the published format, else 0.0 (``bad_format``).

    ``ground_truths`` is ignored (accepted for the uniform signature). Non-``str`` completions fail
    with ``not_a_string``, completions over ``max_chars`` with ``too_long``.
    """
    scores, reasons = [], []
    for text in completions:
        if not isinstance(text, str):
            reason = R.NOT_A_STRING
        elif len(text) > max_chars:
            reason = R.TOO_LONG
        elif not format_matches(text):
            reason = R.BAD_FORMAT
        else:
            reason = None
        scores.append(0.0 if reason is not None else 1.0)
        reasons.append(None if reason is None else reason.value)
    return build_reward_output(scores, reasons)
