"""One entry point from a source name to a ``RecordSet``: synthetic tasks or a reader.

Takes explicit arguments (the data layer knows nothing of config objects); the entry points map
``DataConfig`` fields onto them.
"""

from __future__ import annotations

from collections.abc import Sequence

from .boxes import CoordSpace
from .errors import DataError, OnError
from .readers import read_coco_detection, read_image_folder, read_lisa_grounding, read_visual_rft
from .records import RecordSet
from .synthetic import build_synthetic_classification, build_synthetic_detection, build_synthetic_grounding

SOURCES = ("synthetic", "visual_rft", "coco", "lvis", "image_folder", "lisa")
SOURCE_TASKS = {
    "coco": ("detection",),
    "lvis": ("detection",),
    "image_folder": ("classification",),
    "lisa": ("grounding",),
}


def load_records(
    source: str,
    task: str,
    *,
    path: str | None = None,
    image_root: str | None = None,
    box_space: CoordSpace = "pixels_resized",
    annotation_coord_space: CoordSpace = "pixels_original",
    k_shot: int | None = None,
    categories: Sequence[str] | None = None,
    num_synthetic: int = 64,
    synthetic_kind: str = "photo",
    seed: int = 0,
    on_error: OnError = "raise",
) -> RecordSet:
    """Records of ``task`` from ``source``.

    ``box_space``: the space the model answers in (prompt wording; preprocessing maps ground truth
    into it). ``annotation_coord_space``: the space a Visual-RFT table's boxes are stored in (the
    table does not record it). Raises ``DataError`` naming the source when it yields no record.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES}")
    allowed = SOURCE_TASKS.get(source)
    if allowed is not None and task not in allowed:
        raise ValueError(f"data source {source!r} provides {allowed[0]} records, not {task!r}")
    if source != "synthetic" and path is None:
        raise ValueError(f"data source {source!r} needs a path")
    if source == "synthetic":
        if task == "classification":
            records = build_synthetic_classification(num_synthetic, seed=seed, classes=categories, kind=synthetic_kind)
        elif task == "detection":
            kwargs = {"categories": categories} if categories else {}
            records = build_synthetic_detection(num_synthetic, seed=seed, box_space=box_space, **kwargs)
        elif task == "grounding":
            records = build_synthetic_grounding(num_synthetic, seed=seed, box_space=box_space)
        else:
            raise ValueError(f"unknown task {task!r}")
    elif source == "visual_rft":
        records = read_visual_rft(
            path, coord_space=annotation_coord_space, task=task, image_root=image_root, on_error=on_error
        )
    elif source in ("coco", "lvis"):
        records = read_coco_detection(
            path,
            image_root or "",
            box_space=box_space,
            categories=categories,
            k_shot=k_shot,
            seed=seed,
            on_error=on_error,
        )
    elif source == "image_folder":
        records = read_image_folder(path, classes=categories, k_shot=k_shot, seed=seed, on_error=on_error)
    else:
        records = read_lisa_grounding(path, image_root, box_space=box_space, on_error=on_error)
    if len(records) == 0:
        raise DataError(f"data source {source!r} ({path}) yielded no {task} records")
    return records
