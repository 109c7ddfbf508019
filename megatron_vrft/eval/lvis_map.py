"""LVIS box metrics (AP, APr, APc, APf, ...) through the official LVIS API (PyPI ``lvis``).

Why the official API rather than COCOeval: LVIS is federated. Besides filtering predictions to the
categories verified present or absent on an image (``neg_category_ids``), it ignores unmatched
predictions of categories marked ``not_exhaustive_category_ids`` on that image and groups AP by
category frequency (rare / common / frequent), neither of which COCOeval can express.

Two shims, both local to this module:

- ``lvis/__init__.py`` imports its visualisation module, which needs OpenCV (``cv2``), a large
  dependency the metrics never touch. The package is installed with ``--no-deps`` and, when
  ``cv2`` is absent, its ``lvis.lvis`` / ``lvis.results`` / ``lvis.eval`` modules are imported
  under an empty ``lvis`` package (without ``LVISVis``).
- ``lvis`` 0.5.3 (the latest release) calls ``np.float``, removed in NumPy 1.24; the evaluation
  runs with ``np.float = float`` set for its duration only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import sys
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_vrft.eval.detection_map import ImageDetections, _xyxy_to_xywh
from megatron_vrft.rewards.classification import normalize_label

FREQUENCIES = ("r", "c", "f")
LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@dataclass(kw_only=True)
class LvisLabels:
    """What the LVIS protocol needs beyond boxes: per-category frequency and per-image id lists."""

    frequency: Mapping[str, str]
    """Category name -> ``"r"`` / ``"c"`` / ``"f"`` (every category evaluated, from the LVIS file)."""
    neg_categories: Sequence[Sequence[str]] = field(default_factory=list)
    """Per image (in the order of the images evaluated): categories verified absent. Empty: none."""
    not_exhaustive_categories: Sequence[Sequence[str]] = field(default_factory=list)
    """Per image: categories whose annotation on it is not exhaustive. Empty: none."""


def lvis_labels_from_file(annotation_file: str | Path, image_ids: Sequence[int]) -> LvisLabels:
    """:class:`LvisLabels` for ``image_ids`` (one entry each, repeats allowed, e.g. one record per
    (image, category)) from an LVIS annotation JSON. Raises ``ValueError`` when the file's
    categories have no ``frequency`` (not an LVIS file)."""
    data = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
    cats = {int(c["id"]): c for c in data["categories"]}
    if not cats or not all("frequency" in c for c in cats.values()):
        raise ValueError(f"{annotation_file}: not an LVIS file (categories without 'frequency')")
    imgs = {int(i["id"]): i for i in data["images"]}
    names = lambda ids: [str(cats[int(c)]["name"]) for c in ids if int(c) in cats]  # noqa: E731
    return LvisLabels(
        frequency={str(c["name"]): str(c["frequency"]) for c in cats.values()},
        neg_categories=[names(imgs[i].get("neg_category_ids", [])) for i in image_ids],
        not_exhaustive_categories=[names(imgs[i].get("not_exhaustive_category_ids", [])) for i in image_ids],
    )


def import_lvis_api():
    """``(LVIS, LVISResults, LVISEval)`` from the official package (see the module docstring)."""
    if not getattr(sys.modules.get("lvis"), "_without_vis", False):
        try:
            from lvis import LVIS, LVISEval, LVISResults

            return LVIS, LVISResults, LVISEval
        except ModuleNotFoundError as exc:
            if exc.name == "lvis":
                raise ModuleNotFoundError(
                    "LVIS metrics need the official LVIS API: pip install --no-deps lvis==0.5.3 "
                    "(tools/install.sh does this)",
                    name="lvis",
                ) from exc
            if exc.name != "cv2":
                raise
        spec = importlib.util.find_spec("lvis")
        shell = types.ModuleType("lvis", "the LVIS API without its OpenCV visualisation (megatron_vrft)")
        shell.__path__ = list(spec.submodule_search_locations)
        shell.__spec__ = spec
        shell._without_vis = True
        sys.modules["lvis"] = shell
    results = importlib.import_module("lvis.results")
    evaluation = importlib.import_module("lvis.eval")
    return importlib.import_module("lvis.lvis").LVIS, results.LVISResults, evaluation.LVISEval


@contextlib.contextmanager
def numpy_float_alias() -> Iterator[None]:
    """``np.float = float`` while the block runs, where NumPy no longer has it."""
    if "float" in np.__dict__:
        yield
        return
    np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del np.float  # type: ignore[attr-defined]


def run_lvis_eval(gt: dict, detections: list[dict], *, max_dets: int = 300) -> dict[str, float]:
    """The LVIS API on an in-memory ground-truth dict (LVIS JSON layout) and result list; returns
    its results dict with undefined entries (-1) as NaN. No detections: every AP is 0 where the
    category has ground truth."""
    LVIS, LVISResults, LVISEval = import_lvis_api()
    logging.getLogger("lvis").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:  # LVIS() reads a path only
        path = Path(tmp) / "gt.json"
        path.write_text(json.dumps(gt))
        lvis_gt = LVIS(str(path))
    if not detections:
        return {key: 0.0 for key in LVIS_KEYS} | {f"AR@{max_dets}": 0.0}
    with numpy_float_alias():
        evaluator = LVISEval(lvis_gt, LVISResults(lvis_gt, detections, max_dets=max_dets), iou_type="bbox")
        evaluator.params.max_dets = max_dets
        evaluator.run()
    return {k: (float("nan") if v == -1 else float(v)) for k, v in evaluator.get_results().items()}


def compute_lvis_map(images: Sequence[ImageDetections], labels: LvisLabels, *, max_dets: int = 300) -> dict[str, float]:
    """LVIS metrics of ``images`` (boxes ``(x1, y1, x2, y2)``): ``AP``, ``AP50``, ``AP75``,
    ``APs/m/l``, ``APr``, ``APc``, ``APf``, ``AR@max_dets`` from ``LVISEval``.

    Names are matched after ``normalize_label`` (as in :func:`compute_box_map`); a prediction of a
    name outside ``labels.frequency`` is dropped. Crowd regions are not an LVIS notion and are not
    passed on. ``images[i].neg_categories`` are used when ``labels.neg_categories`` is empty.
    """
    if not images:
        raise ValueError("compute_lvis_map needs at least one image")
    cat_ids: dict[str, int] = {}
    categories = []
    for name, freq in labels.frequency.items():
        if freq not in FREQUENCIES:
            raise ValueError(f"category {name!r}: frequency must be one of {FREQUENCIES}, got {freq!r}")
        key = normalize_label(name)
        if key in cat_ids:
            raise ValueError(f"category {name!r} repeats another after label normalisation ({key!r})")
        cat_ids[key] = len(cat_ids) + 1
        categories.append({"id": cat_ids[key], "name": name, "frequency": freq})
    for what, lists in (
        ("neg_categories", labels.neg_categories),
        ("not_exhaustive_categories", labels.not_exhaustive_categories),
    ):
        if lists and len(lists) != len(images):
            raise ValueError(f"labels.{what}: {len(lists)} entries for {len(images)} images")

    def ids_of(names: Sequence[str], where: str) -> list[int]:
        out = []
        for n in names:
            if normalize_label(n) not in cat_ids:
                raise ValueError(f"{where}: category {n!r} has no frequency")
            out.append(cat_ids[normalize_label(n)])
        return sorted(set(out))

    gt = {"images": [], "annotations": [], "categories": categories}
    dets = []
    for i, img in enumerate(images):
        neg = labels.neg_categories[i] if labels.neg_categories else img.neg_categories
        not_exhaustive = labels.not_exhaustive_categories[i] if labels.not_exhaustive_categories else []
        gt["images"].append(
            {
                "id": img.image_id,
                "width": img.width,
                "height": img.height,
                "neg_category_ids": ids_of(neg, f"image {img.image_id}"),
                "not_exhaustive_category_ids": ids_of(not_exhaustive, f"image {img.image_id}"),
            }
        )
        for box, cat in zip(_xyxy_to_xywh(img.gt_boxes), img.gt_categories):
            (cat_id,) = ids_of([cat], f"image {img.image_id} ground truth")
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": img.image_id,
                    "category_id": cat_id,
                    "bbox": box.tolist(),
                    "area": float(box[2] * box[3]),
                }
            )
        for box, score, cat in zip(
            _xyxy_to_xywh(img.pred_boxes), np.asarray(img.pred_scores).reshape(-1), img.pred_categories
        ):
            if normalize_label(cat) in cat_ids:
                dets.append(
                    {
                        "image_id": img.image_id,
                        "category_id": cat_ids[normalize_label(cat)],
                        "bbox": box.tolist(),
                        "score": float(score),
                    }
                )
    results = run_lvis_eval(gt, dets, max_dets=max_dets)
    return {key: results[key] for key in (*LVIS_KEYS, f"AR@{max_dets}")}
