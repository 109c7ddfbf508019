"""The Visual-RFT released data format: a table with ``image``, ``problem``, ``solution`` columns.

Sources: a directory written by ``datasets`` ``save_to_disk`` (a ``Dataset`` or a
``DatasetDict``; ``split`` picks one), a ``.parquet`` file, or a directory of parquet files (the
hub layout ``data/<split>-00000-of-0000N.parquet``; files whose name starts with ``split`` are
used when any does, else all).

Columns:

- ``image``: a ``datasets.Image`` value (encoded bytes and/or a path) or a path string (relative
  to ``image_root``, default the source directory).
- ``problem``: the prompt text, used verbatim.
- ``solution``: the answer text, ``<answer>...</answer>`` (tags optional):

  - classification: the label, e.g. ``<answer>wallflower</answer>``;
  - detection: ``[{'Position': [x1, y1, x2, y2], 'Confidence': 1}, ...]`` (Python literal or
    JSON; an optional ``'Label'`` names the box's category, otherwise the category quoted in the
    problem ``category '<name>'`` is used), or ``No Objects`` / ``[]``;
  - grounding: ``[x1, y1, x2, y2]`` or ``(x1,y1),(x2,y2)``.

The task is given (``task=``) or inferred per row from the solution (a list of dicts ->
detection, four numbers -> grounding, otherwise classification). The coordinate space of the
solution boxes is not stored in the data and must be given (``coord_space=``).
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..boxes import CoordSpace, space_extent
from ..errors import (
    UNPARSEABLE_SOLUTION,
    DataError,
    OnError,
    OutOfBounds,
    SkipCounts,
    check_on_error,
)
from ..records import (
    EncodedImage,
    GroundTruth,
    ImageSource,
    RecordSet,
    VisualRecord,
    check_detection_boxes,
    check_grounding_box,
)
from .common import ImageChecker, finish_read, record_or_skip

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CATEGORY_RE = re.compile(r"category '([^']+)'")
_POINT_PAIR_RE = re.compile(
    r"^\(\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*\)\s*,\s*\(\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*\)$"
)
_EMPTY = {"no objects", "no object", "[]", "none"}
_POSITION_KEYS = ("position", "bbox", "box", "bbox_2d")
_LABEL_KEYS = ("label", "category", "class", "name")


def _answer_text(solution: str) -> str:
    m = _ANSWER_RE.search(solution)
    return (m.group(1) if m else solution).strip()


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def _four_numbers(value: Any) -> np.ndarray | None:
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value)
    ):
        value = [*value[0], *value[1]]
    if (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return np.asarray(value, dtype=np.float64)
    return None


def infer_task(solution: str) -> str:
    """``"detection"``, ``"grounding"`` or ``"classification"`` from a solution's answer text."""
    text = _answer_text(solution)
    if text.lower() in _EMPTY:
        return "detection"
    if _POINT_PAIR_RE.match(text):
        return "grounding"
    value = _literal(text)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        return "detection"
    if _four_numbers(value) is not None:
        return "grounding"
    return "classification"


def parse_visual_rft_solution(solution: str, *, task: str, problem: str, coord_space: CoordSpace) -> GroundTruth:
    """Ground truth from a ``solution`` string (see the module docstring).

    Raises:
        DataError: (reason ``unparseable_solution``) the text does not fit ``task``.
        ValueError: a box is inverted or not finite (:func:`solution_fields` then
            :func:`~megatron_vrft.data.records.check_detection_boxes` drops such boxes instead).
    """
    fields = solution_fields(solution, task=task, problem=problem)
    return GroundTruth(coord_space=None if "label" in fields else coord_space, **fields)


def solution_fields(solution: str, *, task: str, problem: str) -> dict[str, Any]:
    """The raw :class:`GroundTruth` fields of a ``solution`` string (boxes unchecked): ``label``;
    ``boxes`` ``(K, 4)`` and ``categories``; or ``box`` ``(4,)``.

    Raises:
        DataError: (reason ``unparseable_solution``) the text does not fit ``task``.
    """
    text = _answer_text(solution)
    if task == "classification":
        if not text:
            raise DataError("empty classification label in solution", UNPARSEABLE_SOLUTION)
        return {"label": text}
    if task == "grounding":
        m = _POINT_PAIR_RE.match(text)
        box = np.asarray([float(g) for g in m.groups()], dtype=np.float64) if m else _four_numbers(_literal(text))
        if box is None:
            raise DataError(f"grounding solution is not one box: {text[:120]!r}", UNPARSEABLE_SOLUTION)
        return {"box": box}
    if task != "detection":
        raise ValueError(f"unknown task {task!r}")
    m = _CATEGORY_RE.search(problem or "")
    default_cat = m.group(1) if m else "object"
    if text.lower() in _EMPTY:
        return {"boxes": np.zeros((0, 4)), "categories": ()}
    value = _literal(text)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"detection solution is not a list of boxes: {text[:120]!r}", UNPARSEABLE_SOLUTION)
    boxes, cats = [], []
    for entry in value:
        if not isinstance(entry, dict):
            raise DataError(f"detection solution entry is not a dict: {entry!r}", UNPARSEABLE_SOLUTION)
        lowered = {str(k).lower(): v for k, v in entry.items()}
        pos = next((lowered[k] for k in _POSITION_KEYS if k in lowered), None)
        box = _four_numbers(pos)
        if box is None:
            raise DataError(
                f"detection solution entry without a 4-number position: {entry!r}",
                UNPARSEABLE_SOLUTION,
            )
        label = next((lowered[k] for k in _LABEL_KEYS if k in lowered), None)
        boxes.append(box)
        cats.append(str(label) if label is not None else default_cat)
    return {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "categories": tuple(cats)}


def _load_rows(path: Path, split: str) -> list[dict]:
    """Rows as dicts with ``image`` kept encoded (``{"bytes", "path"}``) or as a string."""
    if path.is_file() and path.suffix == ".parquet":
        files = [path]
    elif path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; splits: {sorted(ds)}")
            ds = ds[split]
        if "image" in ds.column_names and isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))
        return [dict(r) for r in ds]
    elif path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        chosen = [f for f in files if f.name.startswith(split)]
        files = chosen or files
        if not files:
            raise DataError(f"{path}: no saved dataset and no parquet files", "missing_file")
    else:
        raise DataError(f"Visual-RFT data not found: {path}", "missing_file")
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for f in files:
        try:
            rows.extend(pq.read_table(f).to_pylist())
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"cannot read parquet file {f}: {exc}") from exc
    return rows


def _image_source(value: Any, *, name: str, root: Path) -> ImageSource:
    if isinstance(value, dict) and value.get("bytes"):
        return EncodedImage(data=value["bytes"], name=f"{name}.image ({value.get('path') or 'bytes'})")
    path = value.get("path") if isinstance(value, dict) else value
    if isinstance(path, str) and path:
        p = Path(path)
        return p if p.is_absolute() else root / p
    raise DataError(f"{name}: 'image' holds neither bytes nor a path", "missing_image")


def read_visual_rft(
    path: str | os.PathLike,
    *,
    coord_space: CoordSpace,
    task: Literal["classification", "detection", "grounding"] | None = None,
    split: str = "train",
    image_root: str | os.PathLike | None = None,
    verify_images: bool = True,
    on_error: OnError = "raise",
    out_of_bounds: OutOfBounds = "clip",
) -> RecordSet:
    """Records from a Visual-RFT table (see the module docstring).

    Args:
        path: ``save_to_disk`` directory, parquet file or directory of parquet files.
        coord_space: space of the solution boxes (e.g. ``"norm_1000"`` when the problem says
            "between 0 and 1000"); checked against the image bounds when known.
        task: the task of every row (None: inferred per row).
        split: split of a ``DatasetDict`` / parquet file-name prefix.
        image_root: base of relative image paths (default: ``path``'s directory).
        verify_images: fully decode each image instead of reading the header.
        on_error: ``"raise"`` or ``"skip"`` (counted) for bad rows and images.
        out_of_bounds: ``"clip"`` (counted) or ``"error"``.
    """
    check_on_error(on_error)
    src = Path(path)
    rows = _load_rows(src, split)
    root = Path(image_root) if image_root is not None else (src if src.is_dir() else src.parent)
    skips = SkipCounts()
    checker = ImageChecker(decode=verify_images)
    records: list[VisualRecord] = []
    for i, row in enumerate(rows):
        name = f"{src}[{split}][{i}]"

        def build(row=row, name=name, i=i) -> VisualRecord:
            for key in ("image", "problem", "solution"):
                if key not in row or row[key] is None:
                    raise DataError(f"{name}: missing column value '{key}'", "bad_annotation")
            problem, solution = str(row["problem"]), str(row["solution"])
            row_task = task or infer_task(solution)
            image = _image_source(row["image"], name=name, root=root)
            width, height = checker.size(image, f"{name}.image")
            fields = solution_fields(solution, task=row_task, problem=problem)
            if coord_space != "pixels_resized":  # the resized size is not known yet
                w, h = space_extent(coord_space, image_size=(width, height))
                kw = dict(width=w, height=h, out_of_bounds=out_of_bounds, name=name, skips=skips)
                if "boxes" in fields:
                    fields["boxes"], fields["categories"] = check_detection_boxes(
                        fields["boxes"], fields["categories"], on_error=on_error, **kw
                    )
                if "box" in fields:
                    fields["box"] = check_grounding_box(fields["box"], **kw)
            gt = GroundTruth(
                coord_space=None if "label" in fields else coord_space,
                image_size=(width, height),
                name=name,
                **fields,
            )
            query = None
            if row_task == "detection":
                query = ", ".join(dict.fromkeys(gt.categories)) or (
                    m.group(1) if (m := _CATEGORY_RE.search(problem)) else None
                )
            return VisualRecord(
                source_id=name,
                task=row_task,  # type: ignore[arg-type]
                images=[image],
                problem=problem,
                ground_truth=gt,
                image_size=(width, height),
                query=query,
                metadata={"row": i},
            )

        rec = record_or_skip(build, on_error=on_error, skips=skips, name=name)
        if rec is not None:
            records.append(rec)
    return finish_read(records, skips, str(src), len(rows))
