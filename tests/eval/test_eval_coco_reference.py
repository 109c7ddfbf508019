"""Detection mAP from completions against pycocotools' COCOeval run independently on the same boxes.

A synthetic COCO instance file (images of many sizes and aspect ratios, crowd regions) goes through
the COCO reader, the one ``GroundTruth`` mapped into the model's space
(``ground_truth_in_model_space``, crowd regions included) and ``evaluate_completions``; completions
answer in the model's box space with case/punctuation variants of the category names. The reference
builds COCOeval straight from the instance JSON and the answers' boxes mapped back to original pixels
by this file's own arithmetic, with category ids known from how each answer was generated (not from
parsing its label).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from megatron_vrft.data import GroundTruth, ground_truth_in_model_space, read_coco_detection
from megatron_vrft.eval.detection_map import ImageDetections, compute_box_map
from megatron_vrft.eval.evaluate import evaluate_completions, evaluate_detection

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 4, "name": "dog"}, {"id": 9, "name": "traffic light"}]
# how a model may write each category (the evaluation must match these with the rewards' rule)
VARIANTS = {
    1: ["cat", "Cat", "CAT", "cat."],
    4: ["dog", "Dog", "DOG"],
    9: ["traffic light", "Traffic Light", "traffic_light", "TRAFFIC-LIGHT"],
}
NAMES = {c["id"]: c["name"] for c in CATEGORIES}
# (width, height): tall, wide, square, tiny, large
SIZES = [
    (640, 480),
    (480, 640),
    (1000, 90),
    (90, 700),
    (333, 333),
    (1280, 720),
    (57, 211),
    (800, 120),
    (250, 900),
    (1500, 1000),
    (700, 350),
    (120, 1100),
]


def _box_in(rng, x0, y0, x1, y1, min_frac=0.15, max_frac=0.6):
    """A random ``[x1, y1, x2, y2]`` inside ``[x0, x1] x [y0, y1]``."""
    w, h = x1 - x0, y1 - y0
    bw, bh = rng.uniform(min_frac, max_frac) * w, rng.uniform(min_frac, max_frac) * h
    x, y = x0 + rng.uniform(0, w - bw), y0 + rng.uniform(0, h - bh)
    return [x, y, x + bw, y + bh]


def make_dataset(tmp_path, seed=0):
    """Instance JSON + images, and predictions in original pixels:
    ``{image_id: [(box_xyxy, score, category_id, label or None), ...]}``."""
    rng = np.random.default_rng(seed)
    images, anns, preds = [], [], {}
    used_scores: set[int] = set()

    def score(lo, hi):  # distinct scores: COCOeval's ranking then has no ties to order
        while True:
            s = int(rng.integers(lo, hi))
            if s not in used_scores:
                used_scores.add(s)
                return s / 10000

    def label(cat):
        v = VARIANTS[cat]
        return v[int(rng.integers(len(v)))]

    for i, (w, h) in enumerate(SIZES):
        img_id = 10 + 3 * i
        fname = f"img_{img_id}.png"
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGB", (w, h), (i * 20 % 256, 80, 160)).save(tmp_path / "images" / fname)
        images.append({"id": img_id, "file_name": fname, "width": w, "height": h})
        preds[img_id] = []
        # ordinary objects (at least one per image), each found with a jitter or missed
        for k in range(int(rng.integers(1, 5))):
            cat = [1, 4, 9][(i + k) % 3] if k < 2 else [1, 4, 9][int(rng.integers(3))]
            box = _box_in(rng, 0, 0, w, h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": cat,
                    "iscrowd": 0,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": (box[2] - box[0]) * (box[3] - box[1]),
                }
            )
            if rng.random() < 0.85:
                bw, bh = box[2] - box[0], box[3] - box[1]
                jit = np.array([bw, bh, bw, bh]) * rng.normal(0, 0.08, 4)
                p = np.clip(np.array(box) + jit, 0, [w, h, w, h])
                preds[img_id].append((p.tolist(), score(0, 9000), cat, label(cat)))
        # crowd regions on half the images, of a category with ordinary objects on the image (so
        # image_category records carry them too) or not; several confident detections inside each
        if i % 2 == 0:
            cat = [1, 4, 9][i % 3] if i % 4 == 0 else [9, 1, 4][i % 3]
            region = _box_in(rng, 0, 0, w, h, 0.4, 0.8)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": cat,
                    "iscrowd": 1,
                    "bbox": [region[0], region[1], region[2] - region[0], region[3] - region[1]],
                    "area": (region[2] - region[0]) * (region[3] - region[1]),
                }
            )
            for _ in range(int(rng.integers(1, 4))):
                preds[img_id].append((_box_in(rng, *region, 0.2, 0.5), score(9000, 10000), cat, label(cat)))
        # false positives of any category
        for _ in range(int(rng.integers(0, 3))):
            cat = [1, 4, 9][int(rng.integers(3))]
            preds[img_id].append((_box_in(rng, 0, 0, w, h), score(0, 9000), cat, label(cat)))
    data = {"images": images, "annotations": anns, "categories": CATEGORIES}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, data, preds


def resized_size(w, h):
    """Some anisotropic resize, multiples of 28 (only the numbers matter here)."""
    return max(28, round(w * 0.6 / 28) * 28), max(28, round(h * 0.45 / 28) * 28)


def to_space(box, space, w, h):
    if space == "pixels_original":
        return list(box)
    sw, sh = (1000.0, 1000.0) if space == "norm_1000" else resized_size(w, h)
    return [box[0] * sw / w, box[1] * sh / h, box[2] * sw / w, box[3] * sh / h]


def from_space(box, space, w, h):
    if space == "pixels_original":
        return list(box)
    sw, sh = (1000.0, 1000.0) if space == "norm_1000" else resized_size(w, h)
    return [box[0] * w / sw, box[1] * h / sh, box[2] * w / sw, box[3] * h / sh]


def completion(entries):
    """``entries``: ``(box_text_values, score, label or None)``."""
    items = []
    for box, s, lab in entries:
        item = f"{{'Position': [{', '.join(f'{v:.3f}' for v in box)}], 'Confidence': {s:.4f}"
        items.append(item + (f", 'Label': '{lab}'}}" if lab is not None else "}"))
    return f"<think>looking</think><answer>[{', '.join(items)}]</answer>"


def reference_coco_eval(data, dets, *, with_crowd=True):
    """Independent COCOeval: ground truth straight from the instance JSON (original pixels)."""
    gt_data = {
        "images": data["images"],
        "categories": data["categories"],
        "annotations": [dict(a) for a in data["annotations"] if with_crowd or not a["iscrowd"]],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(
            [
                {"image_id": img_id, "category_id": cat, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                for img_id, b, s, cat in dets
            ]
        )
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"mAP": ev.stats[0], "AP50": ev.stats[1], "AP75": ev.stats[2], "AR@100": ev.stats[8]}


def run_case(tmp_path, space, group_by, seed=0):
    path, data, preds = make_dataset(tmp_path, seed)
    records = read_coco_detection(path, tmp_path / "images", box_space=space, group_by=group_by)
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    completions, gts_crowd, gts_plain, dets = [], [], [], []
    for r in records:
        img_id = r.metadata["image_id"]
        w, h = sizes[img_id]
        resized = resized_size(w, h) if space == "pixels_resized" else None
        gt = ground_truth_in_model_space(r, space, resized_size=resized)
        gts_crowd.append(gt)
        gts_plain.append(dataclasses.replace(gt, crowd_boxes=None, crowd_categories=()))
        entries = []
        for box, s, cat, lab in preds[img_id]:
            if group_by == "image_category":
                if cat not in r.metadata["category_ids"]:
                    continue  # that (image, category) has its own record, or none
                if lab == NAMES[cat] and s < 0.5:
                    lab = None  # an unlabelled answer answers the record's one category
            text_box = [float(f"{v:.3f}") for v in to_space(box, space, w, h)]
            entries.append((text_box, s, lab))
            dets.append((img_id, from_space(text_box, space, w, h), s, cat))
        completions.append(completion(entries))
    return data, dets, completions, gts_crowd, gts_plain


@pytest.mark.parametrize("group_by", ["image", "image_category"])
@pytest.mark.parametrize("space", ["pixels_original", "norm_1000", "pixels_resized"])
def test_map_from_completions_equals_independent_cocoeval(tmp_path, space, group_by):
    data, dets, completions, gts_crowd, gts_plain = run_case(tmp_path, space, group_by)
    assert len(dets) > 30 and sum(len(g.crowd_boxes) for g in gts_crowd) >= 3
    ours = evaluate_completions("detection", completions, gts_crowd)
    ref = reference_coco_eval(data, dets)
    assert ours["parse_failures"] == {}
    for key in ("mAP", "AP50", "AP75", "AR@100"):
        assert ours[key] - ref[key] == 0.0, (key, ours[key], ref[key])
    assert 0.2 < ref["mAP"] < 0.95

    # Old behaviour 1: crowd regions dropped by the reader -> detections on them are false positives.
    ref_no_crowd = reference_coco_eval(data, dets, with_crowd=False)
    assert ref["mAP"] - ref_no_crowd["mAP"] > 0.02
    assert ref["AP50"] - ref_no_crowd["AP50"] > 0.02
    # ... and the same pipeline without the crowd regions reproduces exactly that number
    plain = evaluate_completions("detection", completions, gts_plain)
    assert plain["mAP"] - ref_no_crowd["mAP"] == 0.0
    # Old behaviour 2: labels compared verbatim -> every "Cat" / "traffic_light" answer dropped.
    verbatim = [d for d, text in zip(dets, _labels(completions)) if text is None or text == NAMES[d[3]]]
    assert len(verbatim) < len(dets) - 10
    ref_verbatim = reference_coco_eval(data, verbatim)
    assert abs(ref["mAP"] - ref_verbatim["mAP"]) > 0.02


def _labels(completions):
    """The label of each answer entry, in ``dets`` order (None: no label)."""
    from megatron_vrft.rewards import extract_answer, parse_boxes

    out = []
    for text in completions:
        boxes, reason = parse_boxes(extract_answer(text)[0])
        assert reason is None
        out.extend(p.label for p in boxes)
    return out


def test_case_variant_labels_score_like_pycocotools():
    """The issue's case: every answer labelled "Cat" for category "cat" used to give mAP 0.0."""
    rng = np.random.default_rng(5)
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}
    completions, gts, dets = [], [], []
    for i, (w, h) in enumerate(SIZES[:6]):
        data["images"].append({"id": i + 1, "width": w, "height": h})
        gt_boxes = [_box_in(rng, 0, 0, w, h) for _ in range(2)]
        for b in gt_boxes:
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "iscrowd": 0,
                    "area": (b[2] - b[0]) * (b[3] - b[1]),
                }
            )
        entries = []
        for b in gt_boxes[:1] + [_box_in(rng, 0, 0, w, h)]:
            b = [float(f"{v:.3f}") for v in b]
            s = float(f"{rng.uniform(0.05, 0.95):.4f}")
            entries.append((b, s, "Cat"))
            dets.append((i + 1, b, s, 1))
        completions.append(completion(entries))
        gts.append(
            {
                "boxes": np.asarray(gt_boxes),
                "categories": ("cat", "cat"),
                "coord_space": "pixels_original",
                "image_size": (w, h),
            }
        )
    ours = evaluate_detection(completions, gts)
    ref = reference_coco_eval(data, dets)
    assert ours["mAP"] - ref["mAP"] == 0.0 and ours["AP50"] - ref["AP50"] == 0.0
    assert ref["mAP"] > 0.1  # the old verbatim comparison dropped every answer: 0.0
    assert ours["per_category"] == {"cat": pytest.approx(ref["mAP"])}


def test_crowd_region_detection_is_ignored_not_false_positive():
    gt = np.array([[10.0, 10.0, 50.0, 50.0]])
    crowd = np.array([[100.0, 100.0, 190.0, 190.0]])
    on_crowd = np.array([[120.0, 120.0, 150.0, 150.0]])  # plain IoU 0.11; COCO's crowd rule: 1.0

    def img(crowd_boxes, crowd_categories):
        return ImageDetections(
            image_id=1,
            width=200,
            height=200,
            gt_boxes=gt,
            gt_categories=["Cat"],
            pred_boxes=np.concatenate([on_crowd, gt]),
            pred_scores=np.array([0.9, 0.5]),
            pred_categories=["CAT", "cat"],
            crowd_boxes=crowd_boxes,
            crowd_categories=crowd_categories,
        )

    with_crowd = compute_box_map([img(crowd, ["cat"])], ["cat"])
    without = compute_box_map([img(np.zeros((0, 4)), [])], ["cat"])
    assert with_crowd["mAP"] == pytest.approx(1.0)
    assert without["AP50"] == pytest.approx(0.5, abs=0.01)  # the confident crowd hit ranks first as a false positive
    # a crowd region of another category does not excuse the detection
    other = compute_box_map([img(crowd, ["dog"])], ["cat", "dog"])
    assert other["per_category"]["cat"] == pytest.approx(without["per_category"]["cat"])


def test_category_and_crowd_input_errors():
    img = ImageDetections(
        image_id=1,
        width=10,
        height=10,
        gt_boxes=np.array([[1, 1, 5, 5.0]]),
        gt_categories=["cat"],
        pred_boxes=np.zeros((0, 4)),
        pred_scores=np.zeros(0),
        pred_categories=[],
    )
    with pytest.raises(ValueError, match="'cat' and 'Cat' are the same category"):
        compute_box_map([img], ["cat", "Cat"])
    img.crowd_boxes = np.array([[0, 0, 3, 3.0]])
    with pytest.raises(ValueError, match="1 crowd regions but 0 crowd categories"):
        compute_box_map([img], ["cat"])
    img.crowd_categories = ["zebra"]
    with pytest.raises(ValueError, match="crowd-region category 'zebra'"):
        compute_box_map([img], ["cat"])
    gt = {
        "boxes": np.array([[1, 1, 5, 5.0]]),
        "categories": ("cat",),
        "coord_space": "pixels_original",
        "crowd_boxes": np.array([[0, 0, 3, 3.0]]),
        "crowd_categories": ("cat", "dog"),
    }
    with pytest.raises(ValueError, match="one category per crowd box"):
        evaluate_detection(["<answer>[]</answer>"], [gt])
    gt["crowd_boxes"], gt["crowd_categories"] = np.array([[3, 0, 1, 3.0]]), ("cat",)
    with pytest.raises(ValueError, match="inverted"):
        evaluate_detection(["<answer>[]</answer>"], [gt])


def test_crowd_regions_map_into_the_model_space_with_the_ground_truth():
    gt = GroundTruth(
        boxes=np.zeros((0, 4)),
        categories=(),
        crowd_boxes=np.array([[100.0, 50.0, 200.0, 100.0]]),
        crowd_categories=["cat"],
        coord_space="pixels_original",
        image_size=(400, 100),
    )
    out = gt.in_space("pixels_resized", resized_size=(56, 28))
    np.testing.assert_allclose(out.crowd_boxes, [[14.0, 14.0, 28.0, 28.0]])
    assert out.crowd_categories == ("cat",) and out.resized_size == (56, 28)
    np.testing.assert_array_equal(gt.crowd_boxes, [[100.0, 50.0, 200.0, 100.0]])  # unchanged
    back = out.in_space("pixels_original")
    np.testing.assert_allclose(back.crowd_boxes, gt.crowd_boxes)
