"""Import a released Visual-RFT table into image files + a parquet table of paths.

Input: what ``read_visual_rft`` reads (a ``.parquet`` file, a folder of them, a ``save_to_disk``
folder) or rows as ``.json`` (a list) / ``.jsonl``, with ``image`` (``{"bytes", "path"}``, bytes
base64-encoded in JSON, or a path relative to the input's folder), ``problem`` and ``solution``.

Output (``out_dir``): ``images/<sha256 prefix>.<ext>`` (identical images stored once, the
extension from the decoded format) and ``<split>.parquet`` with ``image`` as a relative path,
``problem``, ``solution``: ``read_visual_rft(out_dir, split=split, ...)`` reads it. Rows keep their
input order. With ``k``, at most ``k`` rows per class (classification: the answer label; detection:
the category the problem names, else the first box label), picked with the seeded per-class
sampler; rows without a class (grounding) are all kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..readers.visual_rft import _load_rows, infer_task, parse_visual_rft_solution
from ..sampling import sample_k_shot
from .common import BuildSummary, atomic_dir, read_json, require_file

_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}
NO_CLASS = "(no class)"


def _read_rows(path: Path, split: str) -> list[dict]:
    if path.suffix == ".jsonl":
        require_file(path, "Visual-RFT rows")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not JSON: {exc}") from exc
        return rows
    if path.suffix == ".json":
        rows = read_json(path, "Visual-RFT rows")
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return rows
    return _load_rows(path, split)


def _image_bytes(value: Any, root: Path) -> bytes:
    """Encoded image bytes of a row's ``image`` value; ``DataError`` (reason set) when missing."""
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
        if isinstance(data, str):
            try:
                return base64.b64decode(data, validate=True)
            except binascii.Error as exc:
                raise DataError(f"image bytes are not base64: {exc}", "corrupt_image") from exc
        return bytes(data)
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise DataError("'image' holds neither bytes nor a path", "missing_image")
    p = Path(path) if Path(path).is_absolute() else root / path
    if not p.is_file():
        raise DataError(f"image not found: {p}", "missing_image")
    return p.read_bytes()


def _class_of(problem: str, solution: str) -> str:
    task = infer_task(solution)
    if task == "grounding":
        return NO_CLASS
    gt = parse_visual_rft_solution(solution, task=task, problem=problem, coord_space="norm_1000")
    if task == "classification":
        return gt.label
    return gt.categories[0] if gt.categories else NO_CLASS


def build_visual_rft(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    k: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> BuildSummary:
    """Import ``source`` into ``out_dir`` (module docstring)."""
    src = Path(source)
    if not src.exists():
        raise DataError(f"Visual-RFT data not found: {src}", "missing_file")
    rows = _read_rows(src, split)
    root = src if src.is_dir() else src.parent
    summary = BuildSummary(builder="visual-rft", output=Path(out_dir))
    classes: dict[int, str] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(row.get(key) is None for key in ("image", "problem", "solution")):
            summary.skip("missing_column", f"row {i}")
            continue
        try:
            classes[i] = _class_of(str(row["problem"]), str(row["solution"]))
        except ValueError as exc:  # DataError (unparseable) or an invalid box
            summary.skip(getattr(exc, "reason", "bad_annotation"), f"row {i}")
    if k is not None:
        groups: dict[str, list[int]] = {}
        for i, cls in classes.items():
            groups.setdefault(cls, []).append(i)
        capped = {c: v for c, v in groups.items() if c != NO_CLASS}
        chosen = {i for v in sample_k_shot(capped, k, seed=seed).values() for i in v}
        chosen |= set(groups.get(NO_CLASS, []))
        for i in sorted(set(classes) - chosen):
            summary.skip("over_k", f"row {i}")
        classes = {i: c for i, c in classes.items() if i in chosen}

    out_rows: dict[str, list[str]] = {"image": [], "problem": [], "solution": []}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        for i in sorted(classes):
            row = rows[i]
            try:
                data = _image_bytes(row["image"], root)
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
                    fmt = im.format
            except DataError as exc:
                summary.skip(exc.reason, f"row {i}")
                continue
            except (OSError, UnidentifiedImageError, SyntaxError):
                summary.skip("corrupt_image", f"row {i}")
                continue
            rel = f"images/{hashlib.sha256(data).hexdigest()[:20]}{_EXT.get(fmt, '.img')}"
            if not (tmp / rel).exists():
                (tmp / rel).write_bytes(data)
            out_rows["image"].append(rel)
            out_rows["problem"].append(str(row["problem"]))
            out_rows["solution"].append(str(row["solution"]))
            summary.written[classes[i]] = summary.written.get(classes[i], 0) + 1
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(out_rows), tmp / f"{split}.parquet")
    summary.extra = {
        "num_rows": len(out_rows["image"]),
        "num_images": len(set(out_rows["image"])),
        "table": f"{split}.parquet",
    }
    return summary
