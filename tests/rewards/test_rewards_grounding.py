"""Grounding rewards (IoU, GIoU, GIoU+1) and coordinate spaces, against a float64 formula."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rewards_fuzz_strategies import garbage_text, grounding_near_miss, wrap

from megatron_vrft.rewards import (
    GroundTruth,
    compute_grounding_scores,
    convert_boxes,
    get_reward,
    grounding_giou_reward,
    grounding_giou_shifted_reward,
    grounding_iou_reward,
    norm1000_to_original,
    norm1000_to_resized,
    original_to_norm1000,
    original_to_resized,
    resized_to_norm1000,
    resized_to_original,
)

FUZZ = settings(
    max_examples=10000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def ref_iou_giou(a, b) -> tuple[float, float]:
    """Float64 IoU and GIoU written out independently of megatron_vrft.ops.box_iou."""
    ax1, ay1, ax2, ay2 = map(float, a)
    bx1, by1, bx2, by2 = map(float, b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    iou = inter / union
    return iou, iou - (hull - union) / hull


def _gt(box, space="norm_1000", **kw) -> dict:
    return {"box": box, "coord_space": space, **kw}


def test_iou_giou_match_float64_formula_on_random_boxes() -> None:
    rng = random.Random(0)
    completions, gts, want = [], [], []
    for _ in range(400):

        def box():
            x, y = rng.uniform(0, 900), rng.uniform(0, 900)
            return [round(x, 2), round(y, 2), round(x + rng.uniform(0.5, 300), 2), round(y + rng.uniform(0.5, 300), 2)]

        p, g = box(), box()
        if rng.random() < 0.3:  # overlapping pairs too
            p = [v + rng.uniform(-20, 20) for v in g]
            p = [round(p[0], 2), round(p[1], 2), round(max(p[2], p[0] + 1), 2), round(max(p[3], p[1] + 1), 2)]
        completions.append(wrap(str(p)))
        gts.append(_gt(g))
        want.append(ref_iou_giou(p, g))
    iou = grounding_iou_reward(completions, gts)
    giou = grounding_giou_reward(completions, gts)
    shifted = grounding_giou_shifted_reward(completions, gts)
    assert iou.failures.num_failed() == 0
    w_iou = torch.tensor([w[0] for w in want], dtype=torch.float64)
    w_giou = torch.tensor([w[1] for w in want], dtype=torch.float64)
    torch.testing.assert_close(iou.scores.double(), w_iou, atol=1e-6, rtol=0)
    torch.testing.assert_close(giou.scores.double(), w_giou, atol=1e-6, rtol=0)
    torch.testing.assert_close(shifted.scores.double(), w_giou + 1, atol=1e-6, rtol=0)
    assert (w_giou < 0).any() and (w_iou > 0.5).any()  # both regimes covered


@pytest.mark.parametrize(
    "answer",
    [
        "[100, 200, 300, 400]",
        "[100.0, 200.0, 300.0, 400.0]",
        '{"bbox_2d": [100, 200, 300, 400]}',
        '[{"bbox_2d": [100, 200, 300, 400], "label": "the red car"}]',
        "[{'Position': [100, 200, 300, 400], 'Confidence': 0.9}]",
        "(100,200),(300,400)",
        "<|box_start|>(100, 200), (300, 400)<|box_end|>",
        "```json\n[100, 200, 300, 400]\n```",
        "The box is [100, 200, 300, 400].",
    ],
)
def test_accepted_single_box_forms(answer: str) -> None:
    out = grounding_iou_reward([wrap(answer)], [_gt([100, 200, 300, 400])])
    assert out.reasons == [None] and out.scores.item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("[[1, 2, 3, 4], [5, 6, 7, 8]]", "multiple_boxes"),
        ("(1,2),(3,4) (5,6),(7,8)", "multiple_boxes"),
        ("[]", "missing_box"),
        ("No Objects", "missing_box"),
        ("", "empty_answer"),
        ("[300, 200, 100, 400]", "inverted_box"),
        ("[100, 200, 100, 400]", "degenerate_box"),
        ("[100, 200, 300]", "bad_entry"),
        ('{"bbox_2d": [100, 200, 300]}', "bad_box_length"),
        ('{"bbox_2d": [100, NaN, 300, 400]}', "nonfinite"),
        ("[1e9, 0, 2e9, 10]", "out_of_range"),
        ("somewhere top left", "not_a_list"),
    ],
)
def test_grounding_failures_score_the_minimum(answer: str, reason: str) -> None:
    completions, gts = [wrap(answer)], [_gt([100, 200, 300, 400])]
    for name, fail in (("grounding_iou", 0.0), ("grounding_giou", -1.0), ("grounding_giou_shifted", 0.0)):
        spec = get_reward(name)
        out = spec.fn(completions, gts)
        assert out.reasons == [reason]
        assert out.scores.item() == fail == spec.failure_score == spec.min_score
        assert dict(out.failures) == {reason: 1}


def test_giou_failure_is_below_every_real_box() -> None:
    far = grounding_giou_reward([wrap("[900, 900, 901, 901]")], [_gt([0, 0, 1, 1])]).scores.item()
    junk = grounding_giou_reward([wrap("junk")], [_gt([0, 0, 1, 1])]).scores.item()
    assert -1.0 == junk < far < 0.0


def test_coordinate_conversions() -> None:
    orig, resized = (640, 480), (644, 476)  # e.g. smart_resize to multiples of 28
    b = torch.tensor([[64.0, 48.0, 320.0, 240.0], [0.0, 0.0, 640.0, 480.0]], dtype=torch.float64)
    n = original_to_norm1000(b, orig)
    torch.testing.assert_close(
        n, torch.tensor([[100.0, 100.0, 500.0, 500.0], [0.0, 0.0, 1000.0, 1000.0]], dtype=torch.float64)
    )
    r = original_to_resized(b, orig, resized)
    torch.testing.assert_close(r[:, 0::2], b[:, 0::2] * 644 / 640)
    torch.testing.assert_close(r[:, 1::2], b[:, 1::2] * 476 / 480)
    torch.testing.assert_close(resized_to_original(r, orig, resized), b)
    torch.testing.assert_close(norm1000_to_original(n, orig), b)
    torch.testing.assert_close(norm1000_to_resized(resized_to_norm1000(r, resized), resized), r)
    torch.testing.assert_close(convert_boxes(b, "pixels_original", "pixels_original"), b)
    with pytest.raises(ValueError, match="image_size"):
        convert_boxes(b, "pixels_original", "norm_1000")
    with pytest.raises(ValueError, match="unknown coordinate space"):
        convert_boxes(b, "pixels", "norm_1000")


def test_grounding_converts_prediction_into_gt_space() -> None:
    gts = [_gt([64, 48, 320, 240], "pixels_original", image_size=(640, 480), resized_size=(644, 476))]
    # the model answered in 0-1000 space
    out = grounding_iou_reward([wrap("[100, 100, 500, 500]")], gts, pred_space="norm_1000")
    assert out.scores.item() == pytest.approx(1.0)
    # and in resized-pixel space (Qwen2.5-VL style)
    resized = [64 * 644 / 640, 48 * 476 / 480, 320 * 644 / 640, 240 * 476 / 480]
    out = grounding_iou_reward([wrap(str(resized))], gts, pred_space="pixels_resized")
    assert out.scores.item() == pytest.approx(1.0, abs=1e-6)
    # not converting is wrong: the same numbers read as original pixels
    assert grounding_iou_reward([wrap("[100, 100, 500, 500]")], gts).scores.item() < 0.5
    with pytest.raises(ValueError, match="resized_size"):
        grounding_iou_reward(
            [wrap("junk")], [_gt([0, 0, 1, 1], "pixels_original", image_size=(9, 9))], pred_space="pixels_resized"
        )


def test_bad_ground_truth_raises() -> None:
    with pytest.raises(ValueError, match=r"ground_truths\[0\]\.box: grounding rewards need"):
        grounding_iou_reward([wrap("[1,2,3,4]")], [{"label": "x"}])
    with pytest.raises(ValueError, match=r"ground_truths\[0\]\.coord_space"):
        grounding_iou_reward([wrap("[1,2,3,4]")], [{"box": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"ground_truths\[0\]\.box: inverted"):
        GroundTruth(box=[5, 0, 1, 1], coord_space="norm_1000", name="ground_truths[0]")
    with pytest.raises(ValueError, match="non-finite"):
        GroundTruth(boxes=[[0, 0, float("nan"), 1]], coord_space="norm_1000")
    # a typed ground truth's error names the batch position and the record
    with pytest.raises(ValueError, match=r"ground_truths\[1\] \(coco: image 7\)\.box: grounding rewards need"):
        grounding_iou_reward([wrap("[1,2,3,4]")] * 2, [_gt([0, 0, 1, 1]), GroundTruth(label="x", name="coco: image 7")])
    # "norm_1" is an annotation space: the rewards need the ground truth mapped into a model space first
    norm1 = GroundTruth(box=[0.1, 0.1, 0.5, 0.5], coord_space="norm_1")
    with pytest.raises(ValueError, match=r"ground_truths\[0\]\.coord_space: box rewards need"):
        grounding_iou_reward([wrap("[1,2,3,4]")], [norm1])
    assert grounding_iou_reward([wrap("[100, 100, 500, 500]")], [norm1.in_space("norm_1000")]).scores.item() == 1.0


_FUZZ_GT = [
    GroundTruth(box=b, coord_space="norm_1000") for b in ([0, 0, 1000, 1000], [100, 200, 300, 400], [5, 5, 6, 6])
]


@pytest.mark.slow
@FUZZ
@given(garbage=garbage_text, near=grounding_near_miss(), g=st.sampled_from(_FUZZ_GT))
def test_grounding_fuzz(garbage, near, g) -> None:
    """The three rewards are columns of ``compute_grounding_scores``: one call checks all three."""
    completion, must_fail = near
    out = compute_grounding_scores([garbage, completion], [g, g])
    assert out.output("giou").failures.num_failed() == sum(r is not None for r in out.reasons)
    for metric, lo, hi in (("iou", 0.0, 1.0), ("giou", -1.0, 1.0), ("giou_shifted", 0.0, 2.0)):
        s = getattr(out, metric).tolist()
        assert all(math.isfinite(v) and lo <= v <= hi for v in s)
        for v, r in zip(s, out.reasons):
            assert r is None or v == lo
        if must_fail:
            assert out.reasons[1] is not None and s[1] == lo


def test_reward_wrappers_are_the_shared_columns() -> None:
    texts = [wrap("[0, 0, 10, 10]"), wrap("[20, 20, 30, 30]"), "junk"]
    gts = [_gt([0, 0, 10, 5])] * 3
    s = compute_grounding_scores(texts, gts)
    for fn, col in (
        (grounding_iou_reward, s.iou),
        (grounding_giou_reward, s.giou),
        (grounding_giou_shifted_reward, s.giou_shifted),
    ):
        out = fn(texts, gts)
        torch.testing.assert_close(out.scores, col)
        assert out.reasons == s.reasons == [None, None, "no_answer_tag"]
        assert dict(out.failures) == {"no_answer_tag": 1}
    torch.testing.assert_close(s.giou_shifted, s.giou + 1)


def test_convert_boxes_numpy_and_torch_agree_with_a_float64_formula():
    """The one coordinate module: numpy in -> numpy out, tensors in -> tensors out, every space
    pair against x * dst_extent / src_extent computed here."""
    import numpy as np

    from megatron_vrft.rewards.coords import COORD_SPACES, convert_boxes

    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 1, (5, 4))
    sizes = dict(image_size=(640, 480), resized_size=(644, 476))
    extent = {"pixels_original": (640, 480), "pixels_resized": (644, 476), "norm_1000": (1000, 1000), "norm_1": (1, 1)}
    for src in COORD_SPACES:
        for dst in COORD_SPACES:
            (sw, sh), (dw, dh) = extent[src], extent[dst]
            want = boxes * np.array([dw / sw, dh / sh, dw / sw, dh / sh])
            got = convert_boxes(boxes, src, dst, **sizes)
            assert isinstance(got, np.ndarray) and np.allclose(got, want, rtol=1e-15, atol=0)
            t = convert_boxes(torch.as_tensor(boxes), src, dst, **sizes)
            assert torch.is_tensor(t) and np.allclose(t.numpy(), want, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="image_size"):
        convert_boxes(boxes, "pixels_original", "norm_1000")
    with pytest.raises(ValueError, match="unknown coordinate space"):
        convert_boxes(boxes, "norm_2", "norm_1000")
