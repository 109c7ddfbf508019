"""Box mAP with pycocotools' COCOeval, built in memory from per-image ground truth and predictions.

COCO protocol: every category is evaluated on every image. LVIS is *federated*: each image lists the
categories verified present (``pos_category_ids``, implied by its annotations) and verified absent
(``neg_category_ids``); a prediction of a category that is neither is not evaluated on that image
(it can be neither a true nor a false positive). We apply that filter before COCOeval.
LVIS's ``not_exhaustive_category_ids`` (unmatched detections of such categories are ignored) needs
matching information COCOeval does not expose, so it is not applied: results for LVIS are then a
slight under-estimate on not-exhaustive categories, and the returned dict says so. The official LVIS
numbers (with that rule, and APr / APc / APf) come from :mod:`megatron_vrft.eval.lvis_map`.

Category names are compared after :func:`megatron_vrft.rewards.classification.normalize_label`, the
normalisation the detection rewards use (``match_categories``): a prediction labelled ``"Cat"``
counts for category ``"cat"``. Crowd regions (COCO ``iscrowd=1``) go to COCOeval as crowd
annotations: a detection on one is ignored (neither a true nor a false positive), as in the official
evaluation.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np

from megatron_vrft.rewards.classification import normalize_label


@dataclass(kw_only=True)
class ImageDetections:
    """Ground truth and predictions of one image, boxes ``(x1, y1, x2, y2)`` in one coordinate space."""

    image_id: int
    width: int
    height: int
    gt_boxes: np.ndarray  # (K, 4)
    gt_categories: list[str]
    pred_boxes: np.ndarray  # (P, 4)
    pred_scores: np.ndarray  # (P,)
    pred_categories: list[str]
    neg_categories: list[str] = field(default_factory=list)
    """LVIS: categories verified absent from the image (federated evaluation)."""
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    """``(C, 4)`` crowd regions (COCO ``iscrowd=1``): detections on them are ignored."""
    crowd_categories: list[str] = field(default_factory=list)
    """The category of each crowd region, length ``C``."""


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def compute_box_map(
    images: list[ImageDetections],
    categories: list[str],
    protocol: str = "coco",
    max_dets: int = 100,
) -> dict[str, float | dict[str, float] | str]:
    """COCO-style box AP. Returns ``mAP`` (AP@[.5:.95]), ``AP50``, ``AP75``, ``AR@max_dets`` and
    ``per_category`` AP@[.5:.95] (NaN where a category has no ground truth).

    ``protocol``: ``"coco"`` or ``"lvis"`` (federated filtering, see module docstring).
    Names (``categories``, ground truth, crowd regions, predictions) are matched after
    ``normalize_label``; two ``categories`` that normalise to the same name raise ``ValueError``,
    a prediction whose name matches no category is dropped (it cannot be matched).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if protocol not in ("coco", "lvis"):
        raise ValueError(f"protocol must be 'coco' or 'lvis', got {protocol!r}")
    if not images:
        raise ValueError("compute_box_map needs at least one image")
    cat_ids: dict[str, int] = {}  # normalised name -> COCO category id (1-based index into categories)
    for i, name in enumerate(categories):
        key = normalize_label(name)
        if not key:
            raise ValueError(f"category {name!r} is empty after label normalisation")
        if key in cat_ids:
            raise ValueError(
                f"categories {categories[cat_ids[key] - 1]!r} and {name!r} are the same "
                f"category after label normalisation ({key!r})"
            )
        cat_ids[key] = i + 1
    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}
    dets = []
    ann_id = 1
    for img in images:
        gt["images"].append({"id": img.image_id, "width": img.width, "height": img.height})
        crowd_boxes = np.asarray(img.crowd_boxes, dtype=np.float64).reshape(-1, 4)
        if len(img.crowd_categories) != len(crowd_boxes):
            raise ValueError(
                f"image {img.image_id}: {len(crowd_boxes)} crowd regions but "
                f"{len(img.crowd_categories)} crowd categories"
            )
        for boxes, names, crowd in ((img.gt_boxes, img.gt_categories, 0), (crowd_boxes, img.crowd_categories, 1)):
            for box, cat in zip(_xyxy_to_xywh(boxes), names):
                cat_id = cat_ids.get(normalize_label(cat))
                if cat_id is None:
                    kind = "crowd-region" if crowd else "ground-truth"
                    raise ValueError(f"image {img.image_id}: {kind} category {cat!r} is not in categories")
                gt["annotations"].append(
                    {
                        "id": ann_id,
                        "image_id": img.image_id,
                        "category_id": cat_id,
                        "bbox": box.tolist(),
                        "area": float(box[2] * box[3]),
                        "iscrowd": crowd,
                    }
                )
                ann_id += 1
        evaluated = {normalize_label(c) for c in (*img.gt_categories, *img.crowd_categories, *img.neg_categories)}
        for box, score, cat in zip(
            _xyxy_to_xywh(img.pred_boxes), np.asarray(img.pred_scores).reshape(-1), img.pred_categories
        ):
            key = normalize_label(cat)
            if key not in cat_ids:
                continue  # a hallucinated category name cannot be matched: it scores nothing
            if protocol == "lvis" and key not in evaluated:
                continue
            dets.append(
                {"image_id": img.image_id, "category_id": cat_ids[key], "bbox": box.tolist(), "score": float(score)}
            )

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not dets:
            return _empty_result(categories, coco_gt, protocol, max_dets)
        coco_dt = coco_gt.loadRes(dets)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    precision = evaluator.eval["precision"]  # (T, R, K, A, M)
    per_category = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_category[categories[cat_id - 1]] = float(p.mean()) if p.size else float("nan")
    result: dict = {
        "mAP": float(stats[0]),
        "AP50": float(stats[1]),
        "AP75": float(stats[2]),
        f"AR@{max_dets}": float(stats[8]),
        "per_category": per_category,
        "protocol": protocol,
    }
    if protocol == "lvis":
        result["note"] = "federated filter applied; not_exhaustive_category_ids not applied"
    return result


def _empty_result(categories, coco_gt, protocol, max_dets):
    # crowd regions are ignored ground truth: a category with only those has no AP (NaN)
    present = {coco_gt.cats[a["category_id"]]["name"] for a in coco_gt.dataset["annotations"] if not a["iscrowd"]}
    return {
        "mAP": 0.0,
        "AP50": 0.0,
        "AP75": 0.0,
        f"AR@{max_dets}": 0.0,
        "per_category": {c: (0.0 if c in present else float("nan")) for c in categories},
        "protocol": protocol,
    }
