"""One training / evaluation example (:class:`VisualRecord`), its ground truth, and image loading.

Images stay lazy: a record holds a path, encoded bytes or a PIL image and :func:`load_image`
decodes on use, raising :class:`~megatron_vrft.data.errors.DataError` that names the file for a
missing, unreadable or truncated image.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .boxes import (
    COORD_SPACES,
    CoordSpace,
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
)

TaskType = Literal["classification", "detection", "grounding"]
TASKS: tuple[str, ...] = ("classification", "detection", "grounding")


@dataclass(frozen=True)
class EncodedImage:
    """Encoded image bytes (PNG/JPEG/...) with a name for error messages."""

    data: bytes
    name: str


ImageSource = Union[str, os.PathLike, EncodedImage, Image.Image]


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
        f"unsupported image source of type {type(source).__name__}; expected a path, "
        "EncodedImage or PIL image",
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
class GroundTruth:
    """What a reward compares an answer against. Fields unused by the task stay at defaults."""

    coord_space: CoordSpace = "pixels_original"
    """Space of ``boxes`` and ``box`` (see :mod:`megatron_vrft.data.boxes`)."""
    label: str | None = None
    """Classification: the class name."""
    synonyms: tuple[str, ...] = ()
    """Classification: other accepted names for ``label``."""
    boxes: np.ndarray | None = None
    """Detection: ``(K, 4)`` float64 ``x1, y1, x2, y2``; ``K = 0`` means no object of the asked
    categories is present."""
    categories: tuple[str, ...] = ()
    """Detection: the category name of each box, length ``K``."""
    box: np.ndarray | None = None
    """Grounding: ``(4,)`` float64, the one referred box."""
    crowd_boxes: np.ndarray | None = None
    """Detection, evaluation only: ``(C, 4)`` float64 crowd regions (COCO ``iscrowd=1``) in
    ``coord_space``, kept apart from ``boxes`` so rewards never see them; evaluation ignores
    detections on them. ``None``: the source has no crowd information."""
    crowd_categories: tuple[str, ...] = ()
    """The category name of each crowd region, length ``C``."""

    def __post_init__(self) -> None:
        if self.coord_space not in COORD_SPACES:
            raise ValueError(f"unknown coord_space {self.coord_space!r}; expected {COORD_SPACES}")
        self.synonyms = tuple(self.synonyms)
        self.categories = tuple(self.categories)
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
            if len(self.categories) != len(self.boxes):
                raise ValueError(
                    f"detection ground truth has {len(self.boxes)} boxes but "
                    f"{len(self.categories)} category names"
                )
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float64).reshape(4)
        self.crowd_categories = tuple(self.crowd_categories)
        if self.crowd_boxes is not None:
            self.crowd_boxes = np.asarray(self.crowd_boxes, dtype=np.float64).reshape(-1, 4)
        num_crowd = 0 if self.crowd_boxes is None else len(self.crowd_boxes)
        if len(self.crowd_categories) != num_crowd:
            raise ValueError(
                f"detection ground truth has {num_crowd} crowd boxes but "
                f"{len(self.crowd_categories)} crowd category names"
            )


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
    """Ground truth in ``ground_truth.coord_space``."""
    image_size: tuple[int, int] | None = None
    """Original ``(W, H)`` of ``images[0]``; needed to map ``"pixels_original"`` boxes. Read from the image
    header when a reader can; ``None`` if unknown."""
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
            skips.add(
                BOX_CLIPPED, name, f"box clipped to [0, {width:g}] x [0, {height:g}], e.g. {first}"
            )
    keep = ~degenerate_boxes(boxes)
    return boxes, keep


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
    """Validate ``gt``'s boxes against ``[0, width] x [0, height]`` (the bounds of its space).

    Detection: degenerate boxes are dropped and counted (``on_error="skip"``) or raise.
    Grounding: a degenerate box always fails the record (raises ``DataError``; a reader in skip
    mode counts the record). Crowd regions are passed through unchecked. Returns a new
    :class:`GroundTruth`.
    """
    if gt.boxes is not None:
        boxes, keep = sanitize_boxes(
            gt.boxes,
            width=width,
            height=height,
            out_of_bounds=out_of_bounds,
            name=name,
            skips=skips,
        )
        if not keep.all():
            bad = boxes[np.argmin(keep)].tolist()
            message = (
                f"{int((~keep).sum())} degenerate box(es) (zero area or non-finite), first {bad}"
            )
            if on_error == "raise":
                raise DataError(f"{name}: {message}", DEGENERATE_BOX)
            for _ in range(int((~keep).sum())):
                skips.add(DEGENERATE_BOX, name, message + "; box dropped")
        categories = tuple(c for c, k in zip(gt.categories, keep) if k)
        gt = dataclasses.replace(gt, boxes=boxes[keep], categories=categories)
    if gt.box is not None:
        boxes, keep = sanitize_boxes(
            gt.box[None],
            width=width,
            height=height,
            out_of_bounds=out_of_bounds,
            name=name,
            skips=skips,
        )
        if not keep[0]:
            raise DataError(f"{name}: degenerate grounding box {boxes[0].tolist()}", DEGENERATE_BOX)
        gt = dataclasses.replace(gt, box=boxes[0])
    return gt


def check_images(record: VisualRecord, *, decode: bool) -> tuple[int, int]:
    """Check every image of ``record`` exists and is readable (fully decoded if ``decode``);
    returns ``(W, H)`` of the first. Raises :class:`DataError` naming the file."""
    sizes = []
    for source in record.images:
        if decode:
            sizes.append(load_image(source).size)
        else:
            sizes.append(read_image_size(source))
    return int(sizes[0][0]), int(sizes[0][1])


def as_image_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    if isinstance(images, (str, os.PathLike, EncodedImage, Image.Image)):
        return [images]
    return list(images)


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
