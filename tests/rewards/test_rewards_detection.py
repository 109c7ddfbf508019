"""Detection IoU / confidence rewards: published semantics, matching, empty cases, fuzz."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rewards_fuzz_strategies import detection_near_miss, garbage_text, wrap

from megatron_vrft.rewards import (
    GroundTruth,
    compute_detection_scores,
    detection_confidence_reward,
    detection_iou_reward,
    match_greedy,
    match_hungarian,
)

FUZZ = settings(
    max_examples=10000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------ independent float64 reference


def ref_iou(a, b) -> float:
    """Plain-Python float64 IoU, written apart from megatron_vrft.ops.box_iou."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def ref_published(gt_boxes, preds, dedup="first", thr=0.5):
    """The Visual-RFT scoring rules (dedup, sort by confidence, greedy > thr), re-derived."""
    kept: dict = {}
    for box, conf in preds:
        key = tuple(box)
        if key not in kept or (dedup == "max_confidence" and conf > kept[key][1]):
            kept[key] = (key, conf) if key not in kept else (kept[key][0], conf)
    order = [kept[k] for k in kept]
    order = sorted(order, key=lambda bc: bc[1], reverse=True)
    used, results = set(), []
    for box, conf in order:
        best, best_i = 0.0, -1
        for i, g in enumerate(gt_boxes):
            if i in used:
                continue
            v = ref_iou(g, box)
            if v > best:
                best, best_i = v, i
        if best > thr:
            used.add(best_i)
            results.append((best, conf))
        else:
            results.append((0.0, conf))
    iou = sum(r[0] for r in results) / max(len(gt_boxes), len(results))
    conf = sum(c if i > 0 else 1 - c for i, c in results) / len(results)
    return min(iou, 1.0), min(max(conf, 0.0), 1.0)


def answer(preds, quote="'") -> str:
    q = quote
    return wrap("[" + ", ".join(f"{{{q}Position{q}: {list(b)}, {q}Confidence{q}: {c}}}" for b, c in preds) + "]")


def gt(boxes, **kw):
    return {"boxes": boxes, "coord_space": kw.pop("coord_space", "norm_1000"), **kw}


def scores(completion, g, **kw) -> tuple[float, float]:
    s = compute_detection_scores([completion], [g], **kw)
    return s.iou[0], s.confidence[0]


# --------------------------------------------------------------------------- hand-checked table

A = [0, 0, 10, 10]
TABLE = [
    # name, gt boxes, predictions, expected (iou, confidence)
    ("exact", [A], [(A, 0.9)], (1.0, 0.9)),
    ("iou_0.6_matched", [A], [([0, 0, 10, 6], 0.8)], (0.6, 0.8)),
    ("iou_0.5_not_matched", [A], [([0, 0, 10, 5], 0.8)], (0.0, 0.2)),  # strictly greater than 0.5
    ("disjoint", [A], [([20, 20, 30, 30], 0.25)], (0.0, 0.75)),
    ("extra_prediction", [A], [(A, 0.9), ([50, 50, 60, 60], 0.4)], (0.5, (0.9 + 0.6) / 2)),
    ("missing_prediction", [A, [50, 50, 60, 60]], [(A, 1.0)], (0.5, 1.0)),
    # duplicates: identical boxes collapse to one (the highest confidence is kept)
    ("duplicates", [A], [(A, 0.3), (A, 0.9), (A, 0.6)], (1.0, 0.9)),
    ("two_gts_one_pred_each", [A, [20, 0, 30, 10]], [([20, 0, 30, 10], 0.7), ([0, 0, 10, 8], 0.6)], (0.9, 0.65)),
    # confidence ordering: only one gt, two candidates; the higher confidence takes it
    ("low_conf_better_box_listed_first", [A], [([0, 0, 10, 9], 0.2), ([0, 0, 10, 7], 0.9)], (0.35, (0.9 + 0.8) / 2)),
    ("high_conf_better_box", [A], [([0, 0, 10, 9], 0.9), ([0, 0, 10, 7], 0.2)], (0.45, (0.9 + 0.8) / 2)),
]


@pytest.mark.parametrize("name, gt_boxes, preds, expected", TABLE, ids=[t[0] for t in TABLE])
def test_detection_table(name, gt_boxes, preds, expected) -> None:
    iou, conf = scores(answer(preds), gt(gt_boxes))
    assert iou == pytest.approx(expected[0], abs=1e-9)
    assert conf == pytest.approx(expected[1], abs=1e-9)
    # and the independent re-derivation of the published rules agrees (except dedup policy)
    assert (iou, conf) == pytest.approx(ref_published(gt_boxes, preds, dedup="max_confidence"), abs=1e-9)


def test_duplicates_compat_keeps_first_written() -> None:
    preds = [(A, 0.3), (A, 0.9)]
    assert scores(answer(preds), gt([A]), mode="visual_rft_compat") == pytest.approx((1.0, 0.3))
    assert scores(answer(preds), gt([A])) == pytest.approx((1.0, 0.9))


def test_listing_order_does_not_matter_only_confidence() -> None:
    p1, p2 = ([0, 0, 10, 9], 0.2), ([0, 0, 10, 7], 0.9)
    assert scores(answer([p1, p2]), gt([A])) == pytest.approx(scores(answer([p2, p1]), gt([A])))


@pytest.mark.parametrize(
    "completion, gt_boxes, default, compat",
    [
        (wrap("No Objects"), [], (1.0, 1.0), (0.0, 0.0)),
        (wrap("[]"), [], (1.0, 1.0), (0.0, 0.0)),
        (wrap("No Objects"), [A], (0.0, 0.0), (0.0, 0.0)),
        (answer([(A, 0.8), ([1, 1, 5, 5], 0.4)]), [], (0.0, (0.2 + 0.6) / 2), (0.0, (0.2 + 0.6) / 2)),
    ],
)
def test_empty_cases(completion, gt_boxes, default, compat) -> None:
    assert scores(completion, gt(gt_boxes)) == pytest.approx(default)
    assert scores(completion, gt(gt_boxes), mode="visual_rft_compat") == pytest.approx(compat)


def test_hungarian_differs_from_greedy() -> None:
    # gts A=[0,10], B=[5,15] (x-intervals, y in [0,10]); p1 (conf .9)=[3,13]: IoU(A)=7/13, IoU(B)=8/12;
    # p2 (conf .8) = B exactly, IoU(A)=5/15. Greedy: p1 takes B, p2 is left with A (< .5).
    gts = [[0, 0, 10, 10], [5, 0, 15, 10]]
    preds = [([3, 0, 13, 10], 0.9), ([5, 0, 15, 10], 0.8)]
    g_iou, g_conf = scores(answer(preds), gt(gts), matching="greedy")
    h_iou, h_conf = scores(answer(preds), gt(gts), matching="hungarian")
    assert g_iou == pytest.approx((8 / 12) / 2)
    assert g_conf == pytest.approx((0.9 + 0.2) / 2)
    assert h_iou == pytest.approx((7 / 13 + 1.0) / 2)
    assert h_conf == pytest.approx((0.9 + 0.8) / 2)


def _total(iou: torch.Tensor, match: torch.Tensor) -> float:
    return sum(float(iou[p, g]) for p, g in enumerate(match.tolist()) if g >= 0)


def _random_iou_matrix(rng: random.Random, num_p: int, num_g: int) -> torch.Tensor:
    def box():
        x, y = rng.uniform(0, 80), rng.uniform(0, 80)
        return [x, y, x + rng.uniform(5, 30), y + rng.uniform(5, 30)]

    gts = [box() for _ in range(num_g)]
    # predictions are jittered ground truths, so many pairs clear the threshold
    preds = [[v + rng.uniform(-4, 4) for v in rng.choice(gts)] for _ in range(num_p)]
    preds = [[min(b[0], b[2] - 1), min(b[1], b[3] - 1), b[2], b[3]] for b in preds]
    return torch.tensor([[ref_iou(g, p) for g in gts] for p in preds], dtype=torch.float64)


def test_hungarian_is_optimal_and_never_worse_than_greedy() -> None:
    rng = random.Random(0)
    num_diff = 0
    for _ in range(300):
        num_p, num_g = rng.randint(1, 4), rng.randint(1, 4)
        iou = _random_iou_matrix(rng, num_p, num_g)
        mg, mh = match_greedy(iou), match_hungarian(iou)
        for m in (mg, mh):  # valid matchings: above threshold, each gt at most once
            used = [g for g in m.tolist() if g >= 0]
            assert len(used) == len(set(used))
            assert all(float(iou[p, g]) > 0.5 for p, g in enumerate(m.tolist()) if g >= 0)
        tg, th = _total(iou, mg), _total(iou, mh)
        assert th >= tg - 1e-12
        num_diff += th > tg + 1e-9
        # brute force optimum over all injective partial assignments (-1: unmatched)
        best = 0.0
        for assign in itertools.product(range(-1, num_g), repeat=num_p):
            used = [g for g in assign if g >= 0]
            if len(used) == len(set(used)):
                best = max(best, sum(float(iou[p, g]) for p, g in enumerate(assign) if g >= 0 and iou[p, g] > 0.5))
        assert th == pytest.approx(best, abs=1e-12)
    assert num_diff > 0  # the random cases do exercise a difference


def test_greedy_matches_published_on_random_cases() -> None:
    rng = random.Random(1)
    for trial in range(300):
        gts = []
        for _ in range(rng.randint(1, 4)):
            x, y = rng.randint(0, 900), rng.randint(0, 900)
            gts.append([x, y, x + rng.randint(1, 100), y + rng.randint(1, 100)])
        preds = []
        for _ in range(rng.randint(1, 6)):
            g = rng.choice(gts)
            if rng.random() < 0.2 and preds:
                preds.append((preds[-1][0], rng.randint(0, 100) / 100))  # duplicate box
                continue
            b = [v + rng.randint(-15, 15) for v in g]
            b = [b[0], b[1], max(b[2], b[0] + 1), max(b[3], b[1] + 1)]
            preds.append((b, rng.randint(0, 100) / 100))
        mode = "visual_rft_compat" if trial % 2 else "default"
        got = scores(answer(preds, quote=rng.choice("'\"")), gt(gts), mode=mode)
        want = ref_published(gts, preds, dedup="first" if mode == "visual_rft_compat" else "max_confidence")
        assert got == pytest.approx(want, abs=1e-9), (gts, preds)


def test_coordinate_spaces() -> None:
    size = (640, 480)
    box_px = [64.0, 48.0, 320.0, 240.0]
    box_norm = [100, 100, 500, 500]
    g = gt([box_px], coord_space="pixels_original", image_size=size)
    assert scores(answer([(box_norm, 0.9)]), g, pred_space="norm_1000") == pytest.approx((1.0, 0.9))
    # same numbers read as pixels would be wrong
    assert scores(answer([(box_norm, 0.9)]), g)[0] < 0.5
    g2 = gt([[28.0, 28.0, 140.0, 112.0]], coord_space="pixels_resized", resized_size=(280, 224))
    assert scores(answer([([100, 125, 500, 500], 0.5)]), g2, pred_space="norm_1000") == pytest.approx((1.0, 0.5))
    with pytest.raises(ValueError, match="resized_size"):
        scores(wrap("garbage"), gt([box_px], coord_space="pixels_resized"), pred_space="norm_1000")


def test_match_categories_and_default_confidence() -> None:
    g = gt([A, [20, 0, 30, 10]], categories=["cat", "dog"])
    text = wrap(
        "[{'bbox': [0,0,10,10], 'label': 'Dog', 'score': 0.9}, {'bbox': [20,0,30,10], 'label': 'dog', 'score': 0.8}]"
    )
    assert scores(text, g)[0] == pytest.approx(1.0)  # labels ignored by default
    assert scores(text, g, match_categories=True)[0] == pytest.approx(0.5)
    s = compute_detection_scores([wrap("[[0,0,10,10]]")], [g], match_categories=True, default_confidence=0.5)
    assert s.reasons == ["missing_label"]
    s = compute_detection_scores([wrap("[[0,0,10,10]]")] * 2, [g, gt([A])], default_confidence=0.5)
    assert s.reasons == [None, None] and s.iou == pytest.approx([0.5, 1.0])
    assert compute_detection_scores([wrap("[[0,0,10,10]]")], [g]).reasons == ["missing_confidence"]


def test_failure_reasons_table() -> None:
    cases = {
        "no_answer_tag": "[{'Position': [0,0,10,10], 'Confidence': 0.9}]",
        "unclosed_answer_tag": "<answer>[{'Position': [0,0,10,10], 'Confidence': 0.9}",
        "not_a_list": wrap("I see a cat at the top left."),
        "nonfinite": wrap('[{"Position": [0, 0, NaN, 10], "Confidence": 0.9}]'),
        "inverted_box": wrap("[{'Position': [10,0,0,10], 'Confidence': 0.9}]"),
        "degenerate_box": wrap("[{'Position': [0,0,0,10], 'Confidence': 0.9}]"),
        "bad_confidence": wrap("[{'Position': [0,0,10,10], 'Confidence': 1.2}]"),
        "bad_number": wrap("[{'Position': [0,'x',10,10], 'Confidence': 0.9}]"),
        "bad_box_length": wrap("[{'Position': [0,0,10], 'Confidence': 0.9}]"),
        "out_of_range": wrap("[{'Position': [0,0,1e30,10], 'Confidence': 0.9}]"),
        "too_many_boxes": wrap("[" + ", ".join(["{'Position': [0,0,10,10], 'Confidence': 0.9}"] * 101) + "]"),
        "too_deep": wrap("[[[[[[[[0,0,10,10]]]]]]]]"),
        "missing_box": wrap("[{'Confidence': 0.9}]"),
        "bad_entry": wrap("[{'Position': [0,0,10,10], 'Confidence': 0.9}, 7]"),
        "empty_answer": wrap("  "),
    }
    out = detection_iou_reward(list(cases.values()), [gt([A])] * len(cases))
    assert out.reasons == list(cases)
    assert out.scores.tolist() == [0.0] * len(cases)
    assert dict(out.failures) == {k: 1 for k in cases}


_FUZZ_GTS = [
    GroundTruth(boxes=b, coord_space="norm_1000")
    for b in ([], [A], [[100, 100, 400, 400], [500, 500, 900, 700]], [[0, 0, 1000, 1000]] * 3)
]


@pytest.mark.slow
@FUZZ
@given(
    garbage=garbage_text,
    near=detection_near_miss(),
    g=st.sampled_from(_FUZZ_GTS),
    hungarian=st.booleans(),
)
def test_detection_fuzz(garbage, near, g, hungarian) -> None:
    """``iou`` and ``confidence`` share ``compute_detection_scores``: one call checks both."""
    completion, must_fail = near
    s = compute_detection_scores([garbage, completion], [g, g], matching="hungarian" if hungarian else "greedy")
    for col in (s.iou, s.confidence):
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in col)
        for v, r in zip(col, s.reasons):
            assert r is None or v == 0.0
        if must_fail:
            assert s.reasons[1] is not None and col[1] == 0.0


def test_reward_wrappers_are_the_shared_columns() -> None:
    texts = [answer([(A, 0.9), ([50, 50, 60, 60], 0.4)]), "junk", wrap("No Objects")]
    gts = [gt([A]), gt([A]), gt([])]
    s = compute_detection_scores(texts, gts)
    iou, conf = detection_iou_reward(texts, gts), detection_confidence_reward(texts, gts)
    assert iou.scores.tolist() == pytest.approx(s.iou) and conf.scores.tolist() == pytest.approx(s.confidence)
    assert iou.reasons == conf.reasons == s.reasons == [None, "no_answer_tag", None]
    assert iou.failures == conf.failures and iou.failures.num_failed() == 1
    assert iou.scores.dtype == torch.float32 and iou.scores.shape == (3,)


def test_crowd_regions_never_reach_matching() -> None:
    """Crowd regions ride on the one GroundTruth for evaluation; the rewards match ``boxes`` only."""
    crowd = [[50, 50, 90, 90]]
    g = GroundTruth(boxes=[A], categories=["cat"], crowd_boxes=crowd, crowd_categories=["cat"], coord_space="norm_1000")
    assert scores(answer([(crowd[0], 0.9)]), g) == (0.0, pytest.approx(0.1))
    assert scores(answer([(A, 0.9), (crowd[0], 0.5)]), g) == (0.5, pytest.approx(0.7))
    no_objects = GroundTruth(boxes=[], crowd_boxes=crowd, crowd_categories=["cat"], coord_space="norm_1000")
    assert scores(answer([(crowd[0], 1.0)]), no_objects) == (0.0, 0.0)
