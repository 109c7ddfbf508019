"""The scripted policy (tests/helpers): full marks at quality 1, rewards falling with quality,
malformed completions counted, seeded."""

import numpy as np
import pytest
from helpers.scripted_policy import ScriptedPolicy

from megatron_vrft.rewards import compute_rewards

DET_GT = {
    "boxes": np.array([[10.0, 20.0, 60.0, 90.0], [100.0, 40.0, 150.0, 80.0]]),
    "categories": ["star", "star"],
    "coord_space": "pixels_resized",
    "resized_size": (224, 168),
    "image_size": (224, 168),
}
GROUND_GT = {
    "box": np.array([30.0, 30.0, 90.0, 120.0]),
    "coord_space": "pixels_resized",
    "resized_size": (224, 168),
    "image_size": (224, 168),
}
CLS_GT = {"label": "cat", "synonyms": ["kitty"]}


@pytest.mark.parametrize(
    "task, gt, reward",
    [
        ("detection", DET_GT, "iou"),
        ("grounding", GROUND_GT, "grounding_iou"),
        ("classification", CLS_GT, "accuracy"),
    ],
)
def test_perfect_policy_scores_full_marks(task, gt, reward):
    completions = ScriptedPolicy(quality=1.0, class_names=["cat", "dog"], seed=0).sample(task, gt, 16)
    batch = compute_rewards(completions, [gt] * 16, [("format", 1.0), (reward, 1.0)])
    assert batch.scores["format"].min() == 1.0
    assert batch.scores[reward].min() > 0.999


@pytest.mark.parametrize(
    "task, gt, reward",
    [
        ("detection", DET_GT, "iou"),
        ("grounding", GROUND_GT, "grounding_iou"),
        ("classification", CLS_GT, "accuracy"),
    ],
)
def test_reward_decreases_with_quality(task, gt, reward):
    means = []
    for quality in (0.0, 0.5, 1.0):
        completions = ScriptedPolicy(quality=quality, class_names=["cat", "dog", "owl"], seed=1).sample(task, gt, 200)
        means.append(float(compute_rewards(completions, [gt] * 200, [(reward, 1.0)]).total.mean()))
    assert means[0] < means[1] < means[2]


def test_low_quality_emits_malformed_completions_that_are_counted():
    completions = ScriptedPolicy(quality=0.0, seed=2).sample("detection", DET_GT, 300)
    batch = compute_rewards(completions, [DET_GT] * 300, [("format", 1.0), ("iou", 1.0)])
    assert batch.failures["iou"].num_failed() > 30
    assert batch.failures["format"].num_failed() > 30


def test_seeded_and_validated():
    a = ScriptedPolicy(quality=0.3, seed=5).sample("grounding", GROUND_GT, 5)
    b = ScriptedPolicy(quality=0.3, seed=5).sample("grounding", GROUND_GT, 5)
    assert a == b
    with pytest.raises(ValueError, match="quality"):
        ScriptedPolicy(quality=1.5)
    with pytest.raises(ValueError, match="unknown task"):
        ScriptedPolicy(quality=0.5).sample("segmentation", GROUND_GT, 1)
