"""COCO / LVIS instance annotations -> detection records, with k-shot sampling and category subsets.

Reads the instance JSON with pycocotools (``images``, ``annotations`` with ``bbox = [x, y, w, h]``
in original pixels, ``categories``). LVIS files work too: an image without ``file_name`` uses the
basename of its ``coco_url``; LVIS categories' ``synonyms`` go to the record metadata.

Records (``group_by``):

- ``"image_category"`` (Visual-RFT): one record per (image, category) with every box of that
  category in the image; the prompt asks for that one category.
- ``"image"``: one record per image with the boxes of all selected categories present; the prompt
  lists those categories and asks for a label per box.

Crowd annotations (``iscrowd=1``) are not training targets: they go to the ground truth's
``crowd_boxes`` / ``crowd_categories`` (original pixels, as annotated, not clipped), which the
rewards never read and the evaluation passes to COCOeval as crowd regions (detections on them are
ignored, as in the official evaluation). Per record: the crowd regions of its category
(``"image_category"``), or of every selected category on the image (``"image"``, the prompt lists
the categories present). Only non-crowd annotations make an image a candidate for a category.
``include_crowd=True`` restores the old behaviour: crowd boxes become ordinary boxes.

k-shot (``k_shot=k``): per selected category, ``k`` images that contain it (seeded, see
:mod:`megatron_vrft.data.sampling`); with ``on_error="skip"`` an unreadable image is passed over
and the next one in the seeded order is taken, so each category gets exactly ``k`` images where
``k`` usable ones exist. Base/novel splits: ``categories=`` / ``exclude_categories=`` take names
or ids.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ..boxes import CoordSpace, xywh_to_xyxy
from ..errors import (
    BAD_ANNOTATION,
    DEGENERATE_BOX,
    EMPTY_CATEGORIES,
    DataError,
    OnError,
    OutOfBounds,
    SkipCounts,
    check_on_error,
    raise_or_skip,
)
from ..prompts import build_detection_prompt
from ..records import GroundTruth, RecordSet, VisualRecord, check_detection_boxes
from ..sampling import sample_k_shot
from .common import ImageChecker, finish_read, record_or_skip


def load_coco(annotation_file: str | os.PathLike):
    """A ``pycocotools.coco.COCO`` index of ``annotation_file``; errors name the file."""
    from pycocotools.coco import COCO

    path = Path(annotation_file)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}", "missing_file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read annotation JSON {path}: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: not a COCO instance file (missing list '{key}')")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def resolve_category_ids(coco, selection: Sequence[str | int] | None, *, source: str) -> list[int]:
    """Category ids for names or ids in ``selection`` (all when None), sorted. Unknown entries
    raise ``DataError`` listing them."""
    cats = coco.dataset["categories"]
    by_name = {str(c["name"]): int(c["id"]) for c in cats}
    ids = {int(c["id"]) for c in cats}
    if selection is None:
        return sorted(ids)
    out, unknown = set(), []
    for item in selection:
        if isinstance(item, (int, np.integer)) and int(item) in ids:
            out.add(int(item))
        elif str(item) in by_name:
            out.add(by_name[str(item)])
        else:
            unknown.append(item)
    if unknown:
        raise DataError(f"{source}: unknown categories {unknown}", EMPTY_CATEGORIES)
    return sorted(out)


def _xyxy_of(ann: dict) -> np.ndarray:
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(f"annotation {ann.get('id')}: bad 'bbox' {bbox!r}", BAD_ANNOTATION)
    try:
        return xywh_to_xyxy(np.asarray(bbox, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise DataError(f"annotation {ann.get('id')}: bad 'bbox' {bbox!r}", BAD_ANNOTATION) from exc


def _image_file_name(img: dict) -> str:
    if img.get("file_name"):
        return str(img["file_name"])
    if img.get("coco_url"):  # LVIS
        return str(img["coco_url"]).rsplit("/", 1)[-1]
    raise DataError(f"image id {img.get('id')}: neither 'file_name' nor 'coco_url'")


def read_coco_detection(
    annotation_file: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    box_space: CoordSpace,
    categories: Sequence[str | int] | None = None,
    exclude_categories: Sequence[str | int] | None = None,
    k_shot: int | None = None,
    seed: int = 0,
    group_by: Literal["image_category", "image"] = "image_category",
    include_crowd: bool = False,
    verify_images: bool = True,
    on_error: OnError = "raise",
    out_of_bounds: OutOfBounds = "clip",
) -> RecordSet:
    """Detection records from a COCO / LVIS instance file (see the module docstring).

    Args:
        annotation_file: the instance JSON.
        image_root: directory holding the images (``file_name`` is relative to it).
        box_space: the model's box space, named in the prompt; boxes stay in
            ``"pixels_original"`` in the record and are mapped at preprocessing.
        categories: names or ids to keep (None: all); ``exclude_categories`` removes names/ids.
        k_shot: images per category (None: every image with an annotation of a kept category).
        seed: k-shot seed.
        group_by: ``"image_category"`` or ``"image"``.
        include_crowd: make ``iscrowd=1`` boxes ordinary ground-truth boxes (training targets).
            Default False: they are kept apart as ``crowd_boxes`` (evaluation-only crowd regions).
        verify_images: fully decode each used image (catches truncated files) instead of reading
            the header only.
        on_error: ``"raise"`` or ``"skip"`` (counted) for missing/corrupt images and bad boxes.
        out_of_bounds: ``"clip"`` (counted) or ``"error"`` for boxes leaving the image.

    Raises:
        DataError: unreadable JSON, unknown or empty category selection, bad records under
            ``on_error="raise"``, or no records at all.
    """
    check_on_error(on_error)
    if group_by not in ("image_category", "image"):
        raise ValueError(f"group_by must be 'image_category' or 'image', got {group_by!r}")
    source = str(annotation_file)
    coco = load_coco(annotation_file)
    keep = resolve_category_ids(coco, categories, source=source)
    if exclude_categories is not None:
        drop = set(resolve_category_ids(coco, exclude_categories, source=source))
        keep = [c for c in keep if c not in drop]
    if not keep:
        raise DataError(f"{source}: empty category selection", EMPTY_CATEGORIES)
    cat_names = {int(c["id"]): str(c["name"]) for c in coco.dataset["categories"]}
    cat_synonyms = {int(c["id"]): list(c.get("synonyms", [])) for c in coco.dataset["categories"]}
    skips = SkipCounts()
    root = Path(image_root)
    checker = ImageChecker(decode=verify_images)

    def anns_of(img_id: int, cat_id: int) -> list[dict]:
        ids = coco.getAnnIds(imgIds=[img_id], catIds=[cat_id], iscrowd=None)
        return [a for a in coco.loadAnns(ids) if include_crowd or not a.get("iscrowd", 0)]

    def crowd_anns_of(img_id: int, cat_ids: Sequence[int]) -> list[dict]:
        if include_crowd:
            return []  # they are ordinary boxes then
        wanted = set(cat_ids)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id], iscrowd=None))
        return [a for a in anns if a.get("iscrowd", 0) and int(a["category_id"]) in wanted]

    def image_ok(img_id: int) -> bool:
        img = coco.imgs[img_id]
        name = f"{source}: image id {img_id}"
        try:
            path = root / _image_file_name(img)
            size = checker.size(path, str(path))
            want = (int(img.get("width", size[0])), int(img.get("height", size[1])))
            if want != size:
                raise DataError(f"{path}: annotated size {want} differs from the image's {size}", BAD_ANNOTATION)
            return True
        except DataError as exc:
            error = DataError(f"{name}: {exc}", exc.reason)
            raise_or_skip(on_error, skips, error, name, skip_message=str(exc))
            return False

    # Candidate images per category, in id order.
    per_cat: dict[int, list[int]] = {}
    for cat_id in keep:
        imgs = sorted(
            {
                int(a["image_id"])
                for a in coco.loadAnns(coco.getAnnIds(catIds=[cat_id]))
                if include_crowd or not a.get("iscrowd", 0)
            }
        )
        if not imgs:
            skips.add("category_without_examples", cat_names[cat_id], "no annotated image")
        per_cat[cat_id] = imgs
    num_candidates = sum(len(v) for v in per_cat.values())
    if k_shot is not None:
        picked = sample_k_shot(per_cat, k_shot, seed=seed, accept=image_ok)
    else:
        picked = {c: [i for i in imgs if image_ok(i)] for c, imgs in per_cat.items()}

    if group_by == "image_category":
        units = [(img_id, [cat_id]) for cat_id, imgs in picked.items() for img_id in sorted(imgs)]
    else:
        cats_of: dict[int, list[int]] = defaultdict(list)
        for cat_id, imgs in picked.items():
            for img_id in imgs:
                cats_of[img_id].append(cat_id)
        units = [(img_id, sorted(cats_of[img_id])) for img_id in sorted(cats_of)]

    records: list[VisualRecord] = []
    for img_id, cat_ids in units:
        img = coco.imgs[img_id]
        name = f"{source}: image id {img_id} ({'/'.join(cat_names[c] for c in cat_ids)})"

        def build(img=img, img_id=img_id, cat_ids=cat_ids, name=name) -> VisualRecord:
            path = root / _image_file_name(img)
            width, height = checker.size(path, str(path))
            boxes, box_cats, ann_ids = [], [], []
            for cat_id in cat_ids:
                for a in anns_of(img_id, cat_id):
                    boxes.append(_xyxy_of(a))
                    box_cats.append(cat_names[cat_id])
                    ann_ids.append(a.get("id"))
            crowd_cat_ids = cat_ids if group_by == "image_category" else keep
            crowd = sorted(crowd_anns_of(img_id, crowd_cat_ids), key=lambda a: a["id"])
            crowd_boxes = [_xyxy_of(a) for a in crowd]
            for a, box in zip(crowd, crowd_boxes):
                if not np.isfinite(box).all() or box[2] < box[0] or box[3] < box[1]:
                    raise DataError(
                        f"annotation {a.get('id')}: bad crowd 'bbox' {a.get('bbox')!r}",
                        BAD_ANNOTATION,
                    )
            checked, checked_cats = check_detection_boxes(
                np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                box_cats,
                width=width,
                height=height,
                out_of_bounds=out_of_bounds,
                on_error=on_error,
                name=name,
                skips=skips,
            )
            gt = GroundTruth(
                coord_space="pixels_original",
                boxes=checked,
                categories=checked_cats,
                crowd_boxes=np.asarray(crowd_boxes, dtype=np.float64).reshape(-1, 4),
                crowd_categories=tuple(cat_names[int(a["category_id"])] for a in crowd),
                image_size=(width, height),
                name=name,
            )
            if boxes and len(gt.boxes) == 0:
                # Not a "no objects" example: the category is there, its boxes were unusable.
                raise DataError(f"{name}: every box is degenerate", DEGENERATE_BOX)
            names = [cat_names[c] for c in cat_ids]
            return VisualRecord(
                source_id=name,
                task="detection",
                images=[path],
                problem=build_detection_prompt(names, box_space=box_space),
                ground_truth=gt,
                image_size=(width, height),
                query=", ".join(names),
                metadata={
                    "image_id": img_id,
                    "category_ids": list(cat_ids),
                    "annotation_ids": ann_ids,
                    "crowd_annotation_ids": [a.get("id") for a in crowd],
                    "synonyms": {cat_names[c]: cat_synonyms[c] for c in cat_ids if cat_synonyms[c]},
                },
            )

        rec = record_or_skip(build, on_error=on_error, skips=skips, name=name)
        if rec is not None:
            records.append(rec)
    return finish_read(records, skips, source, num_candidates)
