"""Format reward: hand-checked cases, equivalence with the published regex, fuzz."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rewards_fuzz_strategies import garbage_text, non_strings, tokens_from_bytes

from megatron_vrft.rewards import PUBLISHED_FORMAT_PATTERN, format_matches, format_reward

FUZZ = settings(
    max_examples=10000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _published(text: str) -> bool:
    return re.fullmatch(PUBLISHED_FORMAT_PATTERN, text, re.DOTALL) is not None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("<think>\nmulti\nline\n</think>\n\n<answer>\n[1, 2]\n</answer>", 1.0),  # DOTALL, \s*
        ("<think></think><answer></answer>", 1.0),  # empty groups are allowed by the published regex
        ("<think>a</think> x <answer>b</answer>", 0.0),  # text between the blocks
        (" <think>a</think><answer>b</answer>", 0.0),  # fullmatch: nothing before
        ("<think>a</think><answer>b</answer>\n", 0.0),  # fullmatch: nothing after
        ("<think>a</think><answer>b", 0.0),  # truncated
        ("<answer>b</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("<think>a<answer>b</answer>", 0.0),
        ("<think>a</think><answer>b</answer><answer>c</answer>", 1.0),  # lazy groups absorb it
        ("<think>a</think></think><answer>b</answer>", 1.0),
        ("<THINK>a</THINK><answer>b</answer>", 0.0),  # case-sensitive
        ("", 0.0),
    ],
)
def test_format_table(text: str, expected: float) -> None:
    out = format_reward([text])
    assert out.scores.tolist() == [expected]
    assert _published(text) == (expected == 1.0)
    assert (out.reasons[0] is None) == (expected == 1.0)
    assert out.failures.num_failed() == (0 if expected else 1)
    if not expected:
        assert out.failures["bad_format"] == 1


def test_format_non_string_and_too_long() -> None:
    long = "<think>" + "x" * 70000 + "</think><answer>a</answer>"
    out = format_reward([None, 3, long, "<think>a</think><answer>b</answer>"])
    assert out.scores.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert out.reasons[:3] == ["not_a_string", "not_a_string", "too_long"]
    assert dict(out.failures) == {"not_a_string": 2, "too_long": 1}


def test_format_linear_time_on_adversarial_input() -> None:
    # Many '</think><answer>' candidates and no closing tag: the regex backtracks quadratically.
    text = "<think>" + "</think><answer>" * 3000 + "x"
    assert format_matches(text) is False
    text2 = "<think>" + "</think><answer>" * 3000 + "</answer>"
    assert format_matches(text2) is True and _published(text2) is True


_FORMATISH = st.binary(max_size=14).map(
    tokens_from_bytes(["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\t", "a", "<", ">", "/"])
)


@pytest.mark.slow
@FUZZ
@given(text=st.one_of(_FORMATISH, garbage_text), other=st.one_of(garbage_text, non_strings))
def test_format_fuzz_matches_published_regex(text, other) -> None:
    out = format_reward([text, other])
    scores = out.scores.tolist()
    assert all(math.isfinite(s) and s in (0.0, 1.0) for s in scores)
    assert scores[0] == (1.0 if _published(text) else 0.0)
    if not isinstance(other, str):
        assert scores[1] == 0.0 and out.reasons[1] == "not_a_string"
    else:
        assert scores[1] == (1.0 if _published(other) else 0.0)
    # exactly one counted reason per failed completion
    assert out.failures.num_failed() == sum(s == 0.0 for s in scores)
