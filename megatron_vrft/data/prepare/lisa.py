"""LISA ReasonSeg release -> the grounding JSON ``read_lisa_grounding`` reads.

LISA ships each split as a folder of ``<name>.jpg`` + ``<name>.json`` pairs, the JSON in labelme
form: ``text`` (the questions / referring expressions), ``is_sentence`` (long reasoning query vs
short phrase) and ``shapes`` (polygons with ``points``; a ``label`` containing ``target`` marks the
referred object, ``ignore`` a region left out of evaluation, ``flag`` a deprecated annotation).

The box of an entry is the bounding box of the union of its target polygons, in original pixels,
clipped to the image. The output is one deterministic JSON (entries sorted by name) with paths
relative to the output directory, so the reader needs no ``image_root``; ``is_sentence`` (not a
reader key) selects entries with ``kind``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from .common import BuildSummary, atomic_dir, dump_json, require_dir

LisaKind = Literal["all", "sentence", "phrase"]
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def polygon_union_box(shapes: list, width: int, height: int) -> list[float] | None:
    """``[x1, y1, x2, y2]`` around every ``target`` polygon, clipped to ``(width, height)``; None
    when there is none (or the clipped box is empty)."""
    points = [
        np.asarray(s["points"], dtype=np.float64).reshape(-1, 2)
        for s in shapes
        if isinstance(s, dict) and "target" in str(s.get("label", "")).lower() and s.get("points")
    ]
    if not points:
        return None
    pts = np.concatenate(points)
    x1, y1 = np.clip(pts.min(axis=0), 0, [width, height])
    x2, y2 = np.clip(pts.max(axis=0), 0, [width, height])
    if x2 <= x1 or y2 <= y1:
        return None
    return [float(x1), float(y1), float(x2), float(y2)]


def build_lisa(
    split_dir: str | os.PathLike, out_dir: str | os.PathLike, *, kind: LisaKind = "all", overwrite: bool = False
) -> BuildSummary:
    """Write ``out_dir/lisa.json`` from a LISA split folder (module docstring). Entries without a
    target polygon, image or readable JSON are skipped and counted."""
    if kind not in ("all", "sentence", "phrase"):
        raise ValueError(f"kind must be 'all', 'sentence' or 'phrase', got {kind!r}")
    src = require_dir(split_dir, "LISA split folder")
    out = Path(out_dir)
    summary = BuildSummary(builder="lisa", output=out / "lisa.json")
    entries = []
    counts = {"sentence": 0, "phrase": 0}
    for json_path in sorted(src.glob("*.json")):
        name = json_path.stem
        try:
            anno = json.loads(json_path.read_text(encoding="utf-8"))
            texts = [t.strip() for t in anno["text"] if isinstance(t, str) and t.strip()]
            shapes = anno["shapes"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            summary.skip("bad_json", f"{json_path.name} ({type(exc).__name__})")
            continue
        sentence = bool(anno.get("is_sentence", False))
        if kind != "all" and sentence != (kind == "sentence"):
            summary.skip(f"not_{kind}", name)
            continue
        if not texts:
            summary.skip("no_text", name)
            continue
        image = next((p for p in (src / f"{name}{s}" for s in _IMAGE_SUFFIXES) if p.is_file()), None)
        if image is None:
            summary.skip("missing_image", name)
            continue
        try:
            with Image.open(image) as im:
                width, height = im.size
        except (OSError, UnidentifiedImageError):
            summary.skip("corrupt_image", image.name)
            continue
        box = polygon_union_box(shapes if isinstance(shapes, list) else [], width, height)
        if box is None:
            summary.skip("no_target_polygon", name)
            continue
        entries.append(
            {
                "id": name,
                "image": os.path.relpath(image.resolve(), out.resolve()),
                "query": texts,
                "box": box,
                "image_size": [width, height],
            }
        )
        counts["sentence" if sentence else "phrase"] += len(texts)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "lisa.json").write_text(dump_json({"entries": entries}), encoding="utf-8")
    summary.written = {f"{k} queries": v for k, v in counts.items() if v}
    summary.extra = {"num_entries": len(entries), "num_queries": sum(counts.values())}
    return summary
