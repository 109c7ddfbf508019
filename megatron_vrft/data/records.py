"""One training / evaluation example (:class:`VisualRecord`), checks of its boxes, and image loading.

The ground truth is :class:`megatron_vrft.rewards.types.GroundTruth` (re-exported here), the one
type the data layer, the rewards and the evaluation share.

Images stay lazy: a record holds a path, encoded bytes or a PIL image and :func:`load_image`
decodes on use, raising :class:`~megatron_vrft.data.errors.DataError` that names the file for a
missing, unreadable or truncated image.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from megatron_vrft.rewards.types import GroundTruth

from .boxes import (
    boxes_out_of_bounds,
    clip_boxes,
    degenerate_boxes,
)
from .errors import (
    BOX_CLIPPED,
    BOX_OUT_OF_BOUNDS,
    CORRUPT_IMAGE,
    DEGENERATE_BOX,
    MISSING_IMAGE,
    DataError,
    OnError,
    OutOfBounds,
    SkipCounts,
    raise_or_skip,
)

TaskType = Literal["classification", "detection", "grounding"]
TASKS: tuple[str, ...] = ("classification", "detection", "grounding")


@dataclass(frozen=True)
class EncodedImage:
    """Encoded image bytes (PNG/JPEG/...) with a name for error messages."""

    data: bytes
    name: str


ImageSource = str | os.PathLike | EncodedImage | Image.Image


def image_source_name(source: ImageSource) -> str:
    """A human-readable name for error messages: the path, the encoded image's name, or ``<PIL>``."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, EncodedImage):
        return source.name
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return f"<{type(source).__name__}>"


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, EncodedImage):
        return Image.open(io.BytesIO(source.data))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"image file not found: {path}", MISSING_IMAGE)
        return Image.open(path)
    raise DataError(
        f"unsupported image source of type {type(source).__name__}; expected a path, EncodedImage or PIL image",
        CORRUPT_IMAGE,
    )


def load_image(source: ImageSource) -> Image.Image:
    """Decode ``source`` fully into an RGB PIL image.

    Raises:
        DataError: (reason ``missing_image``) the file does not exist; (reason ``corrupt_image``)
            it cannot be identified or decoding fails (e.g. truncated JPEG/PNG bytes). The message
            names the file.
    """
    name = image_source_name(source)
    try:
        img = _open(source)
        img.load()  # force the decode now: truncated data fails here, not later in the processor
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {name}", MISSING_IMAGE) from exc
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise DataError(f"cannot decode image {name}: {exc}", CORRUPT_IMAGE) from exc


def read_image_size(source: ImageSource) -> tuple[int, int]:
    """``(W, H)`` from the image header (no full decode). Same errors as :func:`load_image`."""
    name = image_source_name(source)
    try:
        img = _open(source)
        size = int(img.size[0]), int(img.size[1])
        if img is not source:  # we opened it: release the file handle now
            img.close()
        return size
    except DataError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise DataError(f"cannot read image {name}: {exc}", CORRUPT_IMAGE) from exc


@dataclass(kw_only=True)
class VisualRecord:
    """One example: image(s), the prompt, the ground truth and where it came from."""

    source_id: str
    """Stable identifier: file and row / annotation id; used in every error message."""
    task: TaskType
    """``"classification"``, ``"detection"`` or ``"grounding"``."""
    images: list[ImageSource]
    """Image sources, decoded lazily by :func:`load_image`; usually exactly one. Boxes and
    ``image_size`` refer to ``images[0]``."""
    problem: str
    """User prompt text shown to the model (no image placeholder; the chat template adds it)."""
    ground_truth: GroundTruth
    """Ground truth in ``ground_truth.coord_space`` (the annotation's space); its ``image_size`` is
    this record's (filled in from ``image_size`` when missing)."""
    image_size: tuple[int, int] | None = None
    """Original ``(W, H)`` of ``images[0]``; needed to map ``"pixels_original"`` boxes. Read from the image
    header when a reader can; ``None`` if unknown (taken from ``ground_truth.image_size`` if that has one)."""
    query: str | None = None
    """The task-specific query: the referring expression (grounding) or the comma-joined asked
    categories (detection); None for classification."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form reader extras (e.g. COCO image id, category ids)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"{self.source_id}: unknown task {self.task!r}; expected {TASKS}")
        if not self.images:
            raise ValueError(f"{self.source_id}: a record needs at least one image")
        gt = self.ground_truth
        if self.task == "classification" and not gt.label:
            raise ValueError(f"{self.source_id}: classification record without a label")
        if self.task == "detection" and gt.boxes is None:
            raise ValueError(f"{self.source_id}: detection record without boxes (use shape (0, 4))")
        if self.task == "grounding" and gt.box is None:
            raise ValueError(f"{self.source_id}: grounding record without a box")
        # One image size: the record's and its ground truth's agree. The ground truth's errors
        # name this record.
        if self.image_size is None and gt.image_size is not None:
            self.image_size = (int(gt.image_size[0]), int(gt.image_size[1]))
        fill: dict[str, Any] = {}
        if self.image_size is not None:
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
            if gt.image_size is None:
                fill["image_size"] = self.image_size
            elif tuple(gt.image_size) != self.image_size:
                raise ValueError(
                    f"{self.source_id}: image_size {self.image_size} but the ground truth's is "
                    f"{tuple(int(v) for v in gt.image_size)}"
                )
        if gt.name == "ground_truth":
            fill["name"] = self.source_id
        if fill:
            self.ground_truth = dataclasses.replace(gt, **fill)


def sanitize_boxes(
    boxes: np.ndarray,
    *,
    width: float,
    height: float,
    out_of_bounds: OutOfBounds,
    name: str,
    skips: SkipCounts,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the out-of-bounds policy and find degenerate boxes.

    Returns ``(boxes (K, 4), keep (K,) bool)``: boxes clipped to ``[0, width] x [0, height]``
    (each clip counted under ``box_clipped`` and logged), ``keep`` False for boxes that are
    degenerate after clipping. The caller decides what a degenerate box costs (drop the box and
    count it, or fail the record).

    Raises:
        DataError: (reason ``box_out_of_bounds``) a box leaves the image and ``out_of_bounds`` is
            ``"error"``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    outside = boxes_out_of_bounds(boxes, width, height)
    if outside.any():
        first = boxes[np.argmax(outside)].tolist()
        if out_of_bounds == "error":
            raise DataError(
                f"{name}: {int(outside.sum())} box(es) outside the image bounds "
                f"[0, {width:g}] x [0, {height:g}], first {first}",
                BOX_OUT_OF_BOUNDS,
            )
        if out_of_bounds != "clip":
            raise ValueError(f"out_of_bounds must be 'clip' or 'error', got {out_of_bounds!r}")
        boxes, _ = clip_boxes(boxes, width, height)
        for _ in range(int(outside.sum())):
            skips.add(BOX_CLIPPED, name, f"box clipped to [0, {width:g}] x [0, {height:g}], e.g. {first}")
    keep = ~degenerate_boxes(boxes)
    return boxes, keep


def check_detection_boxes(
    boxes,
    categories: Sequence[str] | None,
    *,
    width: float,
    height: float,
    out_of_bounds: OutOfBounds,
    on_error: OnError,
    name: str,
    skips: SkipCounts,
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Raw ``(K, 4)`` detection boxes (and their ``K`` category names, or None) checked against
    ``[0, width] x [0, height]`` (the bounds of their space), ready for a :class:`GroundTruth`.

    Outside boxes are clipped and counted (``out_of_bounds="clip"``) or raise; degenerate boxes
    (zero area, inverted or non-finite) are dropped and counted (``on_error="skip"``) or raise
    ``DataError`` (reason ``degenerate_box``). Returns ``(boxes (K', 4), categories)``.
    """
    boxes, keep = sanitize_boxes(boxes, width=width, height=height, out_of_bounds=out_of_bounds, name=name, skips=skips)
    if not keep.all():
        bad = boxes[np.argmin(keep)].tolist()
        num_bad = int((~keep).sum())
        message = f"{num_bad} degenerate box(es) (zero area or non-finite), first {bad}"
        raise_or_skip(
            on_error,
            skips,
            DataError(f"{name}: {message}", DEGENERATE_BOX),
            name,
            count=num_bad,
            skip_message=message + "; box dropped",
        )
    if categories is not None:
        categories = tuple(c for c, k in zip(categories, keep) if k)
    return boxes[keep], categories


def check_grounding_box(
    box,
    *,
    width: float,
    height: float,
    out_of_bounds: OutOfBounds,
    name: str,
    skips: SkipCounts,
) -> np.ndarray:
    """A raw ``(4,)`` grounding box checked like :func:`check_detection_boxes`, except that a
    degenerate box always fails the record (``DataError``, reason ``degenerate_box``; a reader in
    skip mode counts the record)."""
    boxes, keep = sanitize_boxes(
        np.asarray(box, dtype=np.float64).reshape(1, 4),
        width=width,
        height=height,
        out_of_bounds=out_of_bounds,
        name=name,
        skips=skips,
    )
    if not keep[0]:
        raise DataError(f"{name}: degenerate grounding box {boxes[0].tolist()}", DEGENERATE_BOX)
    return boxes[0]


def check_ground_truth_boxes(
    gt: GroundTruth,
    *,
    width: float,
    height: float,
    out_of_bounds: OutOfBounds,
    on_error: OnError,
    name: str,
    skips: SkipCounts,
) -> GroundTruth:
    """``gt`` with :func:`check_detection_boxes` / :func:`check_grounding_box` applied to its
    ``boxes`` / ``box`` (crowd regions pass unchecked). Returns a new :class:`GroundTruth`."""
    checked: dict[str, Any] = {}
    kw = dict(width=width, height=height, out_of_bounds=out_of_bounds, name=name, skips=skips)
    if gt.boxes is not None:
        checked["boxes"], checked["categories"] = check_detection_boxes(
            gt.boxes, gt.categories, on_error=on_error, **kw
        )
    if gt.box is not None:
        checked["box"] = check_grounding_box(gt.box, **kw)
    return dataclasses.replace(gt, **checked) if checked else gt


@dataclass(kw_only=True)
class RecordSet:
    """What a reader returns: the records and the skip counts of the read."""

    records: list[VisualRecord]
    """The records, in a deterministic order."""
    skips: SkipCounts
    """Skipped records and clipped / dropped boxes, by reason."""
    source: str
    """The file or directory read."""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i: int) -> VisualRecord:
        return self.records[i]
