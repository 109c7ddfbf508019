"""LVIS metrics: the project's ``compute_lvis_map`` equals a direct run of the official LVISEval on
an LVIS JSON built here independently (federated negatives, not-exhaustive categories, r/c/f)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_vrft.eval.detection_map import ImageDetections
from megatron_vrft.eval.lvis_map import LvisLabels, compute_lvis_map, import_lvis_api, lvis_labels_from_file

NAMES = ["cat", "dog", "bus", "kite", "fork", "horse", "papaya", "omelet", "die"]
FREQ = {n: "rcf"[i % 3] for i, n in enumerate(NAMES)}


def synthetic_lvis(seed: int):
    """(LVIS JSON dict in xywh, detections list in xywh, per-image xyxy data for the project)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": n, "frequency": FREQ[n]} for i, n in enumerate(NAMES)]
    images, anns, dets, per_image = [], [], [], []
    for img_id in range(1, 16):
        w, h = int(rng.integers(60, 400)), int(rng.integers(60, 400))
        present = sorted(rng.choice(len(NAMES), size=int(rng.integers(1, 4)), replace=False) + 1)
        absent = [c for c in range(1, len(NAMES) + 1) if c not in present]
        neg = sorted(int(c) for c in rng.choice(absent, size=3, replace=False))
        not_exh = [int(present[0])] if rng.random() < 0.4 else []
        images.append(
            {"id": img_id, "width": w, "height": h, "neg_category_ids": neg, "not_exhaustive_category_ids": not_exh}
        )
        gt_xyxy, gt_names, pred_xyxy, pred_names, scores = [], [], [], [], []
        for c in present:
            for _ in range(int(rng.integers(1, 4))):
                x1, y1 = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
                x2, y2 = rng.uniform(x1 + 4, w), rng.uniform(y1 + 4, h)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": img_id,
                        "category_id": int(c),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                    }
                )
                gt_xyxy.append([x1, y1, x2, y2])
                gt_names.append(NAMES[c - 1])
                if rng.random() < 0.8:  # a detection near it
                    j = rng.normal(0, 0.08 * (x2 - x1), size=4)
                    (px1, px2), (py1, py2) = sorted([x1 + j[0], x2 + j[2]]), sorted([y1 + j[1], y2 + j[3]])
                    pred_xyxy.append([px1, py1, px2, py2])  # never inverted: the answer parser rejects those
                    pred_names.append(NAMES[c - 1].upper() if rng.random() < 0.3 else NAMES[c - 1])
                    scores.append(float(rng.uniform(0.2, 1)))
        for _ in range(int(rng.integers(1, 5))):  # false positives, some on unverified categories
            c = int(rng.integers(1, len(NAMES) + 1))
            x1, y1 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
            pred_xyxy.append([x1, y1, x1 + rng.uniform(4, w * 0.2), y1 + rng.uniform(4, h * 0.2)])
            pred_names.append(NAMES[c - 1])
            scores.append(float(rng.uniform(0, 1)))
        for box, name, score in zip(pred_xyxy, pred_names, scores):
            dets.append(
                {
                    "image_id": img_id,
                    "category_id": NAMES.index(name.lower()) + 1,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
        per_image.append(
            dict(
                image_id=img_id,
                width=w,
                height=h,
                gt_boxes=np.array(gt_xyxy),
                gt_categories=gt_names,
                pred_boxes=np.array(pred_xyxy).reshape(-1, 4),
                pred_scores=np.array(scores),
                pred_categories=pred_names,
            )
        )
    return {"images": images, "annotations": anns, "categories": cats}, dets, per_image


def direct_lvis_eval(gt: dict, dets: list[dict], tmp_path, monkeypatch) -> dict:
    LVIS, LVISResults, LVISEval = import_lvis_api()
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 predates NumPy 1.24
    path = tmp_path / "lvis_gt.json"
    path.write_text(json.dumps(gt))
    lvis_gt = LVIS(str(path))
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, json.loads(json.dumps(dets))), iou_type="bbox")
    ev.run()
    return ev.get_results()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_lvis_map_equals_official_lvis_eval(seed, tmp_path, monkeypatch):
    gt, dets, per_image = synthetic_lvis(seed)
    want = direct_lvis_eval(gt, dets, tmp_path, monkeypatch)
    monkeypatch.undo()
    assert not hasattr(np, "float")
    path = tmp_path / "lvis_file.json"
    path.write_text(json.dumps(gt))
    labels = lvis_labels_from_file(path, [img["id"] for img in gt["images"]])
    got = compute_lvis_map([ImageDetections(**d) for d in per_image], labels)
    assert not hasattr(np, "float")  # the alias does not leak
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR@300"):
        w = float("nan") if want[key] == -1 else float(want[key])
        assert (math.isnan(w) and math.isnan(got[key])) or got[key] == w, key
    assert 0 < got["AP"] < 1
    assert len({round(got[k], 6) for k in ("APr", "APc", "APf")}) == 3  # the groups differ
    # the federated fields change the result (so they are really passed through)
    plain = compute_lvis_map(
        [ImageDetections(**d) for d in per_image],
        LvisLabels(frequency=labels.frequency, neg_categories=labels.neg_categories),
    )
    assert plain != got


def test_compute_lvis_map_rejects_unknown_frequency():
    img = ImageDetections(
        image_id=1,
        width=10,
        height=10,
        gt_boxes=np.array([[0, 0, 5, 5]]),
        gt_categories=["cat"],
        pred_boxes=np.zeros((0, 4)),
        pred_scores=np.zeros(0),
        pred_categories=[],
    )
    with pytest.raises(ValueError, match="frequency"):
        compute_lvis_map([img], LvisLabels(frequency={"cat": "x"}))
    with pytest.raises(ValueError, match="no frequency"):
        compute_lvis_map([img], LvisLabels(frequency={"dog": "r"}))


def test_evaluate_detection_from_completions_reports_official_lvis_numbers(tmp_path, monkeypatch):
    from megatron_vrft.eval.evaluate import evaluate_detection

    gt, _, per_image = synthetic_lvis(7)
    completions, gts, dets = [], [], []
    for d in per_image:
        items = []
        for box, score, name in zip(d["pred_boxes"], d["pred_scores"], d["pred_categories"]):
            b = [float(f"{v:.3f}") for v in box]
            s = float(f"{score:.4f}")
            items.append(f"{{'Position': {b}, 'Confidence': {s}, 'Label': '{name}'}}")
            dets.append(
                {
                    "image_id": d["image_id"],
                    "category_id": NAMES.index(name.lower()) + 1,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": s,
                }
            )
        completions.append(f"<think>t</think><answer>[{', '.join(items)}]</answer>")
        gts.append(
            {
                "boxes": d["gt_boxes"],
                "categories": tuple(d["gt_categories"]),
                "coord_space": "pixels_original",
                "image_size": (d["width"], d["height"]),
            }
        )
    path = tmp_path / "lvis_file.json"
    path.write_text(json.dumps(gt))
    labels = lvis_labels_from_file(path, [img["id"] for img in gt["images"]])
    ours = evaluate_detection(completions, gts, protocol="lvis", lvis=labels)
    want = direct_lvis_eval(gt, dets, tmp_path, monkeypatch)
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert ours["lvis"][key] == pytest.approx(want[key], abs=1e-12), key
    assert ours["APr"] == ours["lvis"]["APr"] and 0 < ours["lvis"]["AP"] < 1
