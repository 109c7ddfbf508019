"""LISA-style reasoning grounding: image + query text + one box, from a JSON file.

Accepted JSON schema (this project's; LISA's ReasonSeg polygons are converted to it offline):

.. code-block:: json

    {
      "entries": [
        {
          "id": "train_0001",
          "image": "images/0001.jpg",
          "query": "the object people use to keep dry in the rain",
          "box": [x1, y1, x2, y2],
          "box_format": "xyxy",
          "coord_space": "pixels_original",
          "image_size": [W, H]
        }
      ]
    }

- The top level is either ``{"entries": [...]}`` or the list itself.
- ``image`` (required): path relative to ``image_root`` (default: the JSON file's directory), or
  absolute.
- ``query`` (required): a non-empty string, or a list of strings (one record per query, the
  LISA convention of several questions per image).
- ``box`` (required): four numbers.
- ``box_format`` (optional): ``"xyxy"`` (default) or ``"xywh"``.
- ``coord_space`` (optional): ``"pixels_original"`` (default), ``"norm_1000"`` or ``"norm_1"``.
- ``id`` (optional): defaults to the entry's index. ``image_size`` (optional): checked against
  the image when given.
Unknown keys are rejected (a typo must not silently drop a field).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..boxes import CoordSpace, space_extent, xywh_to_xyxy
from ..errors import (
    BAD_ANNOTATION,
    DataError,
    OnError,
    OutOfBounds,
    SkipCounts,
    check_on_error,
)
from ..prompts import build_grounding_prompt
from ..records import GroundTruth, RecordSet, VisualRecord, check_grounding_box
from .common import ImageChecker, finish_read, record_or_skip

LISA_KEYS = frozenset({"id", "image", "query", "box", "box_format", "coord_space", "image_size"})
_INPUT_SPACES = ("pixels_original", "norm_1000", "norm_1")


def read_lisa_grounding(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    box_space: CoordSpace,
    verify_images: bool = True,
    on_error: OnError = "raise",
    out_of_bounds: OutOfBounds = "clip",
) -> RecordSet:
    """Grounding records from a JSON file in the schema above.

    Args:
        json_file: the JSON file.
        image_root: base of relative image paths (default: the JSON file's directory).
        box_space: the model's box space, named in the prompt.
        verify_images: fully decode each image instead of reading the header.
        on_error: ``"raise"`` or ``"skip"`` (counted) for bad entries and images.
        out_of_bounds: ``"clip"`` (counted) or ``"error"`` for boxes leaving the image.
    """
    check_on_error(on_error)
    path = Path(json_file)
    if not path.is_file():
        raise DataError(f"grounding JSON not found: {path}", "missing_file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read grounding JSON {path}: {exc}") from exc
    entries = data.get("entries") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a list of entries or {{'entries': [...]}}")
    root = Path(image_root) if image_root is not None else path.parent
    skips = SkipCounts()
    checker = ImageChecker(decode=verify_images)
    records: list[VisualRecord] = []
    num_candidates = 0

    for index, entry in enumerate(entries):
        entry_name = f"{path}[{index}]"
        queries: list[str] = []

        def parse_entry(entry=entry, entry_name=entry_name):
            if not isinstance(entry, dict):
                raise DataError(f"{entry_name}: entry is not an object", BAD_ANNOTATION)
            unknown = sorted(set(entry) - LISA_KEYS)
            if unknown:
                raise DataError(
                    f"{entry_name}: unknown keys {unknown}; allowed {sorted(LISA_KEYS)}",
                    BAD_ANNOTATION,
                )
            for key in ("image", "query", "box"):
                if key not in entry:
                    raise DataError(f"{entry_name}: missing '{key}'", BAD_ANNOTATION)
            q = entry["query"]
            qs = [q] if isinstance(q, str) else q
            if not isinstance(qs, list) or not qs or not all(isinstance(x, str) and x.strip() for x in qs):
                raise DataError(
                    f"{entry_name}: 'query' must be a non-empty string or list of them",
                    BAD_ANNOTATION,
                )
            box = entry["box"]
            if (
                not isinstance(box, (list, tuple))
                or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            ):
                raise DataError(f"{entry_name}: 'box' must be 4 numbers, got {box!r}", BAD_ANNOTATION)
            fmt = entry.get("box_format", "xyxy")
            if fmt not in ("xyxy", "xywh"):
                raise DataError(
                    f"{entry_name}: 'box_format' must be 'xyxy' or 'xywh', got {fmt!r}",
                    BAD_ANNOTATION,
                )
            space = entry.get("coord_space", "pixels_original")
            if space not in _INPUT_SPACES:
                raise DataError(
                    f"{entry_name}: 'coord_space' must be one of {_INPUT_SPACES}, got {space!r}",
                    BAD_ANNOTATION,
                )
            arr = np.asarray(box, dtype=np.float64)
            return qs, (xywh_to_xyxy(arr) if fmt == "xywh" else arr), space

        parsed = record_or_skip(parse_entry, on_error=on_error, skips=skips, name=entry_name)
        if parsed is None:
            num_candidates += 1
            continue
        queries, box, space = parsed
        num_candidates += len(queries)
        image_path = Path(entry["image"])
        if not image_path.is_absolute():
            image_path = root / image_path
        entry_id = str(entry.get("id", index))

        for qi, query in enumerate(queries):
            name = f"{path}: id {entry_id}" + (f" query {qi}" if len(queries) > 1 else "")

            def build(
                query=query,
                name=name,
                box=box,
                space=space,
                entry=entry,
                image_path=image_path,
                entry_id=entry_id,
            ) -> VisualRecord:
                width, height = checker.size(image_path, str(image_path))
                if "image_size" in entry and tuple(int(v) for v in entry["image_size"]) != (
                    width,
                    height,
                ):
                    raise DataError(
                        f"{name}: image_size {entry['image_size']} differs from {image_path}'s {(width, height)}",
                        BAD_ANNOTATION,
                    )
                w, h = space_extent(space, image_size=(width, height))
                box = check_grounding_box(
                    box,
                    width=w,
                    height=h,
                    out_of_bounds=out_of_bounds,
                    name=name,
                    skips=skips,
                )
                gt = GroundTruth(coord_space=space, box=box, image_size=(width, height), name=name)
                return VisualRecord(
                    source_id=name,
                    task="grounding",
                    images=[image_path],
                    problem=build_grounding_prompt(query, box_space=box_space),
                    ground_truth=gt,
                    image_size=(width, height),
                    query=query.strip(),
                    metadata={"entry_id": entry_id},
                )

            rec = record_or_skip(build, on_error=on_error, skips=skips, name=name)
            if rec is not None:
                records.append(rec)
    return finish_read(records, skips, str(path), num_candidates)
