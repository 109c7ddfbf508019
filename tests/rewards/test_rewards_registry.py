"""Reward registry and the weighted combination."""

from __future__ import annotations

import pytest
import torch
from rewards_fuzz_strategies import wrap

from megatron_vrft.rewards import (
    RewardBatch,
    available_rewards,
    compute_rewards,
    get_reward,
    register_reward,
)

ALL = ["accuracy", "confidence", "format", "grounding_giou", "grounding_giou_shifted", "grounding_iou", "iou"]


def test_registered_names_and_ranges() -> None:
    assert available_rewards() == ALL
    ranges = {n: (get_reward(n).min_score, get_reward(n).max_score, get_reward(n).failure_score) for n in ALL}
    assert ranges["grounding_giou"] == (-1.0, 1.0, -1.0)
    assert ranges["grounding_giou_shifted"] == (0.0, 2.0, 0.0)
    assert all(ranges[n] == (0.0, 1.0, 0.0) for n in ["accuracy", "confidence", "format", "grounding_iou", "iou"])


def test_register_raises_on_duplicates_and_bad_ranges() -> None:
    with pytest.raises(ValueError, match="'format' is already registered"):
        register_reward("format")(lambda completions, ground_truths: None)
    with pytest.raises(ValueError, match="min_score"):
        register_reward("x_bad_range", min_score=1.0, max_score=0.0)
    with pytest.raises(ValueError, match="failure_score"):
        register_reward("x_bad_fail", failure_score=2.0)
    with pytest.raises(KeyError, match="unknown reward 'nope'; registered"):
        get_reward("nope")
    assert available_rewards() == ALL  # nothing was added by the failed registrations


DET_GT = {"boxes": [[0, 0, 10, 10]], "coord_space": "norm_1000", "label": "cat", "box": [0, 0, 10, 10]}
COMPLETIONS = [
    wrap("[{'Position': [0, 0, 10, 10], 'Confidence': 0.8}]"),
    wrap("[{'Position': [0, 0, 10, 6], 'Confidence': 0.5}, {'Position': [50, 50, 60, 60], 'Confidence': 0.1}]"),
    "<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 0.8}]</answer>",  # no think: format 0
    "garbage",
]


def test_weighted_sum_and_columns() -> None:
    out = compute_rewards(COMPLETIONS, [DET_GT] * 4, [("format", 0.5), ("iou", 1.0), ("confidence", 2.0)])
    assert isinstance(out, RewardBatch)
    assert list(out.scores) == ["format", "iou", "confidence"]
    torch.testing.assert_close(out.scores["format"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(out.scores["iou"], torch.tensor([1.0, 0.3, 1.0, 0.0]))
    torch.testing.assert_close(out.scores["confidence"], torch.tensor([0.8, 0.7, 0.8, 0.0]))
    want = 0.5 * out.scores["format"] + out.scores["iou"] + 2.0 * out.scores["confidence"]
    torch.testing.assert_close(out.total, want)
    assert out.total.shape == (4,) and out.total.dtype == torch.float32
    assert dict(out.failures["format"]) == {"bad_format": 2}
    assert dict(out.failures["iou"]) == {"no_answer_tag": 1}
    assert out.reasons["iou"] == [None, None, None, "no_answer_tag"]
    m = out.metrics()
    assert m["reward/iou/parse_fail/no_answer_tag"] == 0.25
    assert m["reward/format/parse_fail_rate"] == 0.5
    assert m["reward/total_mean"] == pytest.approx(float(want.mean()))


def test_options_are_forwarded_per_reward() -> None:
    texts = [wrap(""), wrap("cat")]
    gts = [{"label": "cat"}] * 2
    default = compute_rewards(texts, gts, [("accuracy", 1.0)])
    compat = compute_rewards(
        texts, gts, [("accuracy", 1.0)], reward_options={"accuracy": {"mode": "visual_rft_compat"}}
    )
    assert default.total.tolist() == [0.0, 1.0]
    assert compat.total.tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "rewards, kwargs, exc, match",
    [
        ([], {}, ValueError, "at least one"),
        ([("iou", 1.0), ("iou", 2.0)], {}, ValueError, "duplicate reward names"),
        ([("ioU", 1.0)], {}, KeyError, "unknown reward 'ioU'"),
        ([("iou", 1.0)], {"reward_options": {"format": {}}}, ValueError, "not in the list: \\['format'\\]"),
        ([("iou", 1.0)], {"reward_options": {"iou": {"matching": "optimal"}}}, ValueError, "matching"),
    ],
)
def test_configuration_errors_raise(rewards, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        compute_rewards(COMPLETIONS, [DET_GT] * 4, rewards, **kwargs)


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="4 completions but 3 ground truths"):
        compute_rewards(COMPLETIONS, [DET_GT] * 3, [("format", 1.0)])


def test_every_registered_reward_on_bad_completions() -> None:
    bad = ["", "garbage", None, "<answer>", "<answer> </answer>", "\x00" * 10, "<think>x</think><answer>[nan]", 7]
    gts = [DET_GT] * len(bad)
    for name in ALL:
        spec = get_reward(name)
        out = spec.fn(bad, gts)
        assert out.scores.shape == (len(bad),)
        assert torch.isfinite(out.scores).all()
        assert ((out.scores >= spec.min_score) & (out.scores <= spec.max_score)).all()
        assert out.failed.all(), (name, out.reasons)
        assert (out.scores == spec.failure_score).all(), name
        assert out.failures.num_failed() == len(bad)


def test_empty_batch() -> None:
    out = compute_rewards([], [], [("format", 1.0), ("iou", 1.0), ("grounding_giou", 1.0)])
    assert out.total.shape == (0,)
    assert out.metrics()["reward/total_mean"] == 0.0
