"""COCO / LVIS few-shot subsets and open-vocabulary category splits.

Few-shot subset (``build_coco_fewshot``): a COCO-format instance JSON holding at most ``k`` images
per selected category, where an image *counts* for a category when it has a non-crowd annotation
of it (what makes it a candidate for the ``coco`` reader). Two ways to pick, both seeded:

- ``"per-category"`` (default; the TFA-style few-shot splits): per category, the first ``k``
  images of its own seeded order (the same order ``read_coco_detection(k_shot=k)`` uses, so the
  subset holds the reader's k-shot pick for the same seed). On a picked image only that category's
  annotations are kept (its crowd regions too), so an image picked for "cat" that also shows a dog
  does not count as a "dog" shot. Exactly ``min(k, available)`` images per category; the price is
  that such an image is no longer exhaustively annotated.
- ``"greedy"``: one seeded order over all candidate images; an image is taken when none of the
  selected categories it contains is already at ``k``, and then keeps every annotation of every
  selected category (crowd ones included). Images stay exhaustively annotated; a category may end
  below ``k`` (reported).

Images keep their dicts unchanged except that LVIS's ``neg_category_ids`` /
``not_exhaustive_category_ids`` are restricted to the selected categories. ``categories`` keeps the
selected ones in file order (LVIS ``frequency``, ``synonyms``, counts as in the source).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml

from ..errors import EMPTY_CATEGORIES, DataError
from ..sampling import seeded_permutation
from .common import BuildSummary, atomic_dir, atomic_write_text, dump_json, read_json

FewShotMode = Literal["per-category", "greedy"]

# The open-vocabulary COCO split of Bansal et al. (ECCV 2018), used by OVR-CNN, ViLD and later
# work: 48 base (seen) and 17 novel (unseen) of the 80 COCO 2017 categories.
COCO_OV_BASE_48: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
    "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis",
    "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop",
    "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock", "vase",
    "toothbrush",
)  # fmt: skip
COCO_OV_NOVEL_17: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
    "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)  # fmt: skip


def load_instances(annotation_file: str | os.PathLike) -> dict:
    """The instance JSON as a dict, checked for the three COCO lists."""
    path = Path(annotation_file)
    data = read_json(path, "annotation file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: not a COCO instance file (missing list '{key}')")
    return data


def is_lvis(data: dict) -> bool:
    """LVIS files give each category a ``frequency`` (``r`` / ``c`` / ``f``)."""
    return bool(data["categories"]) and all("frequency" in c for c in data["categories"])


def select_category_ids(data: dict, selection: Sequence[str | int] | None, *, source: str) -> list[int]:
    """Ids (file order) of the categories named (or numbered) in ``selection``; all when None."""
    cats = data["categories"]
    if selection is None:
        return [int(c["id"]) for c in cats]
    by_name = {str(c["name"]): int(c["id"]) for c in cats}
    ids = {int(c["id"]) for c in cats}
    wanted, unknown = set(), []
    for item in selection:
        if str(item) in by_name:
            wanted.add(by_name[str(item)])
        elif str(item).isdigit() and int(item) in ids:
            wanted.add(int(item))
        else:
            unknown.append(item)
    if unknown:
        raise DataError(f"{source}: unknown categories {unknown}", EMPTY_CATEGORIES)
    return [int(c["id"]) for c in cats if int(c["id"]) in wanted]


def build_coco_fewshot(
    annotation_file: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    k: int,
    seed: int = 0,
    categories: Sequence[str | int] | None = None,
    mode: FewShotMode = "per-category",
    overwrite: bool = False,
) -> BuildSummary:
    """Write a k-shot COCO/LVIS subset of ``annotation_file`` to ``out_file`` (module docstring).

    Raises:
        DataError: missing/unreadable file, unknown categories, ``out_file`` exists (without
            ``overwrite``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if mode not in ("per-category", "greedy"):
        raise ValueError(f"mode must be 'per-category' or 'greedy', got {mode!r}")
    source = str(annotation_file)
    data = load_instances(annotation_file)
    lvis = is_lvis(data)
    summary = BuildSummary(builder="lvis-fewshot" if lvis else "coco-fewshot", output=Path(out_file))
    cat_ids = select_category_ids(data, categories, source=source)
    if not cat_ids:
        raise DataError(f"{source}: empty category selection", EMPTY_CATEGORIES)
    selected = set(cat_ids)
    names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    images = {int(img["id"]): img for img in data["images"]}

    anns_of: dict[tuple[int, int], list[dict]] = defaultdict(list)  # (image, category) -> anns
    counted_on: dict[int, set[int]] = defaultdict(set)  # image -> selected cats with a non-crowd ann
    for ann in data["annotations"]:
        cat, img = int(ann["category_id"]), int(ann["image_id"])
        if cat not in selected:
            continue
        if img not in images:
            summary.skip("annotation_without_image", f"annotation {ann.get('id')}")
            continue
        anns_of[img, cat].append(ann)
        if not ann.get("iscrowd", 0):
            counted_on[img].add(cat)

    kept: dict[int, set[int]] = defaultdict(set)  # image -> categories whose annotations are kept
    if mode == "per-category":
        for cat in cat_ids:
            candidates = sorted(img for img, cats in counted_on.items() if cat in cats)
            for img in seeded_permutation(candidates, seed=seed, key=cat)[:k]:
                kept[img].add(cat)
    else:
        counts = dict.fromkeys(cat_ids, 0)
        for img in seeded_permutation(sorted(counted_on), seed=seed, key="greedy"):
            if all(counts[c] >= k for c in cat_ids):
                break
            cats = counted_on[img]
            if any(counts[c] >= k for c in cats):
                summary.skip("would_exceed_k", f"image {img}")
                continue
            for c in cats:
                counts[c] += 1
            kept[img] = _cats_on(img, anns_of, cat_ids)

    out_anns = sorted(
        (a for img, cats in kept.items() for c in cats for a in anns_of[img, c]), key=lambda a: int(a["id"])
    )
    out_images = []
    for img_id in sorted(kept):
        img = dict(images[img_id])
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key in img:
                img[key] = [c for c in img[key] if int(c) in selected]
        out_images.append(img)
    per_cat = {names[c]: 0 for c in cat_ids}
    for img, cats in kept.items():
        for c in cats & counted_on[img]:
            per_cat[names[c]] += 1
    for c in cat_ids:
        if per_cat[names[c]] == 0:
            summary.skip("category_without_examples", names[c])
        elif per_cat[names[c]] < k:
            summary.skip("category_below_k", f"{names[c]} ({per_cat[names[c]]}/{k})")
    out = {key: value for key, value in data.items() if key not in ("images", "annotations", "categories")}
    out.update(
        images=out_images,
        annotations=out_anns,
        categories=[c for c in data["categories"] if int(c["id"]) in selected],
        fewshot={"k": k, "seed": seed, "mode": mode, "source": Path(source).name},
    )
    atomic_write_text(out_file, dump_json(out), overwrite=overwrite)
    summary.written = per_cat
    summary.extra = {
        "num_images": len(out_images),
        "num_annotations": len(out_anns),
        "num_crowd_annotations": sum(1 for a in out_anns if a.get("iscrowd", 0)),
    }
    return summary


def _cats_on(img: int, anns_of: dict, cat_ids: Sequence[int]) -> set[int]:
    """Selected categories with any annotation (crowd or not) on ``img``."""
    return {c for c in cat_ids if anns_of.get((img, c))}


def _fragment(names: Sequence[str]) -> str:
    """A config fragment ``data.categories: [...]`` (YAML), loadable with the run-config loader."""
    return yaml.safe_dump({"data": {"categories": list(names)}}, sort_keys=False, width=100, allow_unicode=True)


def build_ov_split(
    out_dir: str | os.PathLike,
    *,
    split: Literal["coco-48-17", "lvis-rare"],
    annotation_file: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> BuildSummary:
    """Write ``base.yaml``, ``novel.yaml`` (each ``data: {categories: [...]}``) and ``split.json``.

    ``"coco-48-17"``: the standard COCO open-vocabulary split (constants above); with an
    ``annotation_file`` every name is checked against its categories. ``"lvis-rare"``: LVIS rare
    categories (``frequency == "r"``) are novel, common and frequent ones base; needs the file.
    """
    if split == "coco-48-17":
        base, novel = list(COCO_OV_BASE_48), list(COCO_OV_NOVEL_17)
        if annotation_file is not None:
            known = {str(c["name"]) for c in load_instances(annotation_file)["categories"]}
            missing = [n for n in base + novel if n not in known]
            if missing:
                raise DataError(
                    f"{annotation_file}: categories of the COCO OV split not in the file: {missing}", EMPTY_CATEGORIES
                )
    elif split == "lvis-rare":
        if annotation_file is None:
            raise DataError("split 'lvis-rare' needs the LVIS annotation file", "missing_file")
        data = load_instances(annotation_file)
        if not is_lvis(data):
            raise DataError(f"{annotation_file}: not an LVIS file (categories without 'frequency')")
        novel = [str(c["name"]) for c in data["categories"] if c["frequency"] == "r"]
        base = [str(c["name"]) for c in data["categories"] if c["frequency"] != "r"]
    else:
        raise ValueError(f"unknown split {split!r}; expected 'coco-48-17' or 'lvis-rare'")
    summary = BuildSummary(
        builder=f"ov-split {split}", output=Path(out_dir), written={"base": len(base), "novel": len(novel)}
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "base.yaml").write_text(_fragment(base), encoding="utf-8")
        (tmp / "novel.yaml").write_text(_fragment(novel), encoding="utf-8")
        (tmp / "split.json").write_text(dump_json({"split": split, "base": base, "novel": novel}), encoding="utf-8")
    summary.extra = {"usage": "paste base.yaml into a run config, or pass data.categories=<list> as an override"}
    return summary
