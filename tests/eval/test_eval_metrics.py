import math

import numpy as np
import pytest
import torch

from megatron_vrft.eval.detection_map import ImageDetections, compute_box_map
from megatron_vrft.eval.grounding import compute_grounding_metrics


def random_boxes(rng, n, size=200.0):
    xy = rng.uniform(0, size * 0.7, size=(n, 2))
    wh = rng.uniform(5, size * 0.3, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def iou_one(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def independent_ap(images, threshold):
    """101-point interpolated AP of one category, written from the COCO definition."""
    dets = []
    num_gt = 0
    for img_index, img in enumerate(images):
        num_gt += len(img.gt_boxes)
        for box, score in zip(img.pred_boxes, img.pred_scores):
            dets.append((float(score), img_index, box))
    dets.sort(key=lambda d: -d[0])
    used = [set() for _ in images]
    tp = []
    for _, img_index, box in dets:
        best, best_iou = None, threshold - 1e-12
        for g, gt_box in enumerate(images[img_index].gt_boxes):
            if g in used[img_index]:
                continue
            value = iou_one(box, gt_box)
            if value >= best_iou:
                best, best_iou = g, value
        if best is None:
            tp.append(0)
        else:
            used[img_index].add(best)
            tp.append(1)
    tp = np.array(tp, dtype=np.float64)
    ctp = np.cumsum(tp)
    recall = ctp / num_gt
    precision = ctp / np.arange(1, len(tp) + 1)
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    total = 0.0
    for r in np.linspace(0, 1, 101):
        idx = np.searchsorted(recall, r, side="left")
        total += precision[idx] if idx < len(precision) else 0.0
    return total / 101


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap50_matches_independent_definition(seed):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(6):
        gt = random_boxes(rng, int(rng.integers(1, 4)))
        # predictions: noisy copies of some gts plus random false positives
        keep = gt[rng.random(len(gt)) < 0.8]
        noisy = keep + rng.normal(0, 6, size=keep.shape)
        noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
        preds = np.concatenate([noisy, random_boxes(rng, int(rng.integers(0, 3)))])
        images.append(
            ImageDetections(
                image_id=i + 1,
                width=200,
                height=200,
                gt_boxes=gt,
                gt_categories=["obj"] * len(gt),
                pred_boxes=preds,
                pred_scores=rng.random(len(preds)),
                pred_categories=["obj"] * len(preds),
            )
        )
    result = compute_box_map(images, ["obj"])
    assert result["AP50"] == pytest.approx(independent_ap(images, 0.5), abs=1e-9)
    assert result["AP75"] == pytest.approx(independent_ap(images, 0.75), abs=1e-9)
    assert 0.0 <= result["mAP"] <= result["AP50"]


def test_perfect_predictions_score_one_and_hallucinated_category_ignored():
    rng = np.random.default_rng(3)
    images = []
    for i in range(3):
        gt = random_boxes(rng, 2)
        images.append(
            ImageDetections(
                image_id=i + 1,
                width=200,
                height=200,
                gt_boxes=gt,
                gt_categories=["cat", "dog"],
                pred_boxes=np.concatenate([gt, gt[:1]]),
                pred_scores=np.array([0.9, 0.8, 0.1]),
                pred_categories=["cat", "dog", "unicorn"],
            )
        )
    result = compute_box_map(images, ["cat", "dog"])
    assert result["mAP"] == pytest.approx(1.0)
    assert result["per_category"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}


def test_lvis_federated_filter_ignores_unverified_categories():
    rng = np.random.default_rng(4)
    gt1, gt2 = random_boxes(rng, 1), random_boxes(rng, 1)
    far = np.array([[150.0, 150.0, 199.0, 199.0]])

    def build(neg):
        return [
            ImageDetections(
                image_id=1,
                width=200,
                height=200,
                gt_boxes=gt1,
                gt_categories=["cat"],
                pred_boxes=gt1,
                pred_scores=np.array([0.5]),
                pred_categories=["cat"],
            ),
            # image 2 has a dog; a high-scoring 'cat' box there is a false positive only if 'cat'
            # was verified absent (neg) on image 2
            ImageDetections(
                image_id=2,
                width=200,
                height=200,
                gt_boxes=gt2,
                gt_categories=["dog"],
                pred_boxes=np.concatenate([gt2, far]),
                pred_scores=np.array([0.9, 0.95]),
                pred_categories=["dog", "cat"],
                neg_categories=neg,
            ),
        ]

    coco = compute_box_map(build([]), ["cat", "dog"], protocol="coco")
    lvis_unverified = compute_box_map(build([]), ["cat", "dog"], protocol="lvis")
    lvis_negative = compute_box_map(build(["cat"]), ["cat", "dog"], protocol="lvis")
    assert lvis_unverified["per_category"]["cat"] == pytest.approx(1.0)
    assert coco["per_category"]["cat"] < 0.9
    assert lvis_negative["per_category"]["cat"] == pytest.approx(coco["per_category"]["cat"])


def test_map_errors_and_empty_predictions():
    with pytest.raises(ValueError, match="at least one image"):
        compute_box_map([], ["a"])
    img = ImageDetections(
        image_id=1,
        width=10,
        height=10,
        gt_boxes=np.array([[1, 1, 5, 5.0]]),
        gt_categories=["zebra"],
        pred_boxes=np.zeros((0, 4)),
        pred_scores=np.zeros(0),
        pred_categories=[],
    )
    with pytest.raises(ValueError, match="'zebra'"):
        compute_box_map([img], ["a"])
    img.gt_categories = ["a"]
    result = compute_box_map([img], ["a", "b"])
    assert result["mAP"] == 0.0
    assert result["per_category"]["a"] == 0.0 and math.isnan(result["per_category"]["b"])


def test_grounding_metrics_match_float64_loop():
    gen = torch.Generator().manual_seed(0)
    n = 50
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 100
    gt = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 50], dim=1)
    pred = gt + torch.randn(n, 4, generator=gen, dtype=torch.float64) * 8
    valid = torch.rand(n, generator=gen) > 0.2
    out = compute_grounding_metrics(pred, gt, valid, thresholds=(0.5, 0.75))
    ious, inters, unions = [], [], []
    for p, g, v in zip(pred.tolist(), gt.tolist(), valid.tolist()):
        area_g = (g[2] - g[0]) * (g[3] - g[1])
        if not v:
            ious.append(0.0)
            inters.append(0.0)
            unions.append(area_g)
            continue
        iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
        ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
        area_p = max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1])
        inter = iw * ih
        union = area_p + area_g - inter
        ious.append(inter / union)
        inters.append(inter)
        unions.append(union)
    assert out["mIoU"] == pytest.approx(sum(ious) / n, rel=1e-12)
    assert out["cIoU"] == pytest.approx(sum(inters) / sum(unions), rel=1e-12)
    assert out["Acc@0.5"] == pytest.approx(sum(i > 0.5 for i in ious) / n)
    assert out["Acc@0.75"] == pytest.approx(sum(i > 0.75 for i in ious) / n)
    assert out["num_unparsed"] == float((~valid).sum())


def grounding_reference(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, t: float) -> dict:
    """Every grounding metric in float64 numpy, vectorised (degenerate or inverted boxes have area 0;
    an unparsed prediction scores IoU 0, GIoU -1 and contributes the ground-truth area to the union)."""
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    iw = np.clip(np.minimum(pred[:, 2], gt[:, 2]) - np.maximum(pred[:, 0], gt[:, 0]), 0, None)
    ih = np.clip(np.minimum(pred[:, 3], gt[:, 3]) - np.maximum(pred[:, 1], gt[:, 1]), 0, None)
    inter = iw * ih
    union = area(pred) + area(gt) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    cw = np.clip(np.maximum(pred[:, 2], gt[:, 2]) - np.minimum(pred[:, 0], gt[:, 0]), 0, None)
    ch = np.clip(np.maximum(pred[:, 3], gt[:, 3]) - np.minimum(pred[:, 1], gt[:, 1]), 0, None)
    enclosing = cw * ch
    giou = iou - np.divide(enclosing - union, enclosing, out=np.zeros_like(inter), where=enclosing > 0)
    iou, giou = np.where(valid, iou, 0.0), np.where(valid, giou, -1.0)
    inter, union = np.where(valid, inter, 0.0), np.where(valid, union, area(gt))
    return {
        "mIoU": iou.mean(),
        "mGIoU": giou.mean(),
        "cIoU": inter.sum() / union.sum(),
        f"Acc@{t:g}": (iou > t).mean(),
        "num_unparsed": float((~valid).sum()),
    }


@pytest.mark.parametrize("seed", range(5))
def test_grounding_metrics_match_numpy_formula(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    gt = random_boxes(rng, n)
    pred = gt + rng.normal(0, rng.uniform(1, 40), size=(n, 4))  # some far off, some inverted
    pred[rng.random(n) < 0.1] = random_boxes(rng, 1)  # disjoint-ish: GIoU < 0
    valid = rng.random(n) > 0.25  # unparsed predictions (their box is ignored)
    out = compute_grounding_metrics(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(valid))
    want = grounding_reference(pred, gt, valid, 0.5)
    for key, value in want.items():
        assert out[key] == pytest.approx(float(value), rel=1e-12, abs=1e-15), key
    assert -1.0 <= out["mGIoU"] <= out["mIoU"] <= 1.0


def test_grounding_giou_orders_misses_by_distance():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3, dtype=torch.float64)
    pred = torch.tensor([[11.0, 0.0, 21.0, 10.0], [50.0, 0.0, 60.0, 10.0], [0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    near = compute_grounding_metrics(pred[:1], gt[:1])
    far = compute_grounding_metrics(pred[1:2], gt[1:2])
    assert near["mIoU"] == far["mIoU"] == 0.0 and near["mGIoU"] > far["mGIoU"] > -1.0
    assert near["mGIoU"] == pytest.approx(0 - (21 * 10 - 200) / (21 * 10))
    unparsed = compute_grounding_metrics(pred, gt, torch.tensor([True, True, False]))
    assert unparsed["mGIoU"] == pytest.approx((near["mGIoU"] + far["mGIoU"] - 1.0) / 3)


def test_grounding_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="two \\(N, 4\\)"):
        compute_grounding_metrics(torch.zeros(3, 4), torch.zeros(2, 4))
