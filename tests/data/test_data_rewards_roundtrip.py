"""Data -> rewards hand-off: answers written from the model-space ground truth, in the format the
prompts ask for, score (near) full marks with the rewards package; wrong answers do not."""

from __future__ import annotations

import numpy as np
import pytest
from data_test_helpers import tiny_processor

from megatron_vrft.data import (
    build_synthetic_classification,
    build_synthetic_detection,
    build_synthetic_grounding,
    preprocess_records,
)


def _rewards():
    import megatron_vrft.rewards as rewards

    return rewards


def _det_answer(boxes, shift=0.0):
    items = [f"{{'Position': [{', '.join(str(int(round(v + shift))) for v in b)}], 'Confidence': 0.9}}" for b in boxes]
    body = f"[{', '.join(items)}]" if items else "No Objects"
    return f"<think> I see shapes. </think> <answer>{body}</answer>"


@pytest.mark.parametrize("box_space", ["pixels_resized", "norm_1000"])
def test_detection_and_grounding_answers_from_ground_truth_score_high(box_space):
    rewards = _rewards()
    proc = tiny_processor(max_pixels=28 * 28 * 40)
    det, _ = preprocess_records(
        build_synthetic_detection(4, seed=2, empty_fraction=0.25, image_size=(150, 110)),
        proc,
        box_space=box_space,
    )
    gts = [e.ground_truth for e in det]
    assert all(g.coord_space == box_space for g in gts)
    good = [_det_answer(e.ground_truth.boxes) for e in det]
    bad = [_det_answer(e.ground_truth.boxes, shift=40.0 if box_space == "pixels_resized" else 300.0) for e in det]
    iou = rewards.get_reward("iou").fn
    good_scores = iou(good, gts).scores
    assert float(good_scores.min()) > 0.85, good_scores
    assert float(rewards.get_reward("format").fn(good, gts).scores.min()) == 1.0
    bad_scores = iou(bad, gts).scores
    has_boxes = np.array([len(e.ground_truth.boxes) > 0 for e in det])
    assert has_boxes.any()
    assert float(bad_scores[has_boxes].max()) < 0.5

    grd, _ = preprocess_records(build_synthetic_grounding(3, seed=1, image_size=(150, 110)), proc, box_space=box_space)
    ggts = [e.ground_truth for e in grd]
    answers = [
        "<think>.</think> <answer>[" + ", ".join(str(int(round(v))) for v in e.ground_truth.box) + "]</answer>"
        for e in grd
    ]
    scores = rewards.get_reward("grounding_iou").fn(answers, ggts).scores
    assert float(scores.min()) > 0.85, scores


def test_classification_answers_score_exactly():
    rewards = _rewards()
    proc = tiny_processor(max_pixels=28 * 28 * 16)
    cls, _ = preprocess_records(build_synthetic_classification(3, seed=0, kind="shape"), proc)
    gts = [e.ground_truth for e in cls]
    right = [f"<think>.</think> <answer>{e.ground_truth.label}</answer>" for e in cls]
    wrong = ["<think>.</think> <answer>hexagon</answer>"] * len(cls)
    acc = rewards.get_reward("accuracy").fn
    assert acc(right, gts).scores.tolist() == [1.0] * 3
    assert acc(wrong, gts).scores.tolist() == [0.0] * 3
