"""Box coordinate spaces and the maps between them: the project's one coordinate module.

Data readers, preprocessing, rewards, evaluation and the pictures all convert boxes here. Boxes are
``(..., 4)`` ``(x1, y1, x2, y2)`` with x to the right and y down, continuous coordinates whose image
edges are 0 and the image size (pixel ``i`` covers ``[i, i + 1)``).

Spaces (``CoordSpace``):

- ``"pixels_original"``: absolute pixels of the image as stored on disk (COCO/LVIS/LISA annotations).
- ``"pixels_resized"``: absolute pixels of the image *after* the processor's resize (the
  ``resized_size`` the vision tower saw, e.g. Qwen2-VL's ``smart_resize`` output, multiples of 28).
  Qwen2.5-VL is trained to answer in this space (absolute coordinates).
- ``"norm_1000"``: each axis scaled to ``[0, 1000]`` of the image, independent of its size.
  Qwen2-VL's grounding format and the Visual-RFT detection prompt ("between 0 and 1000, integer").
- ``"norm_1"``: ``[0, 1]`` normalised: an annotation space only. A model answers in one of
  ``MODEL_COORD_SPACES``, and rewards only accept those.

Conversions go through the unit square: ``u = x / width_of_space``. The resize is a separable
linear map of continuous coordinates (PIL resamples with pixel edges aligned), so ``x' = x * W' / W``
exactly. Sizes are ``(width, height)``. Conversion is linear, so IoU is invariant under it only when
both axes scale by the same factor; rewards therefore convert predictions into the ground truth's
space before computing IoU, never the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

CoordSpace = Literal["pixels_original", "pixels_resized", "norm_1000", "norm_1"]
COORD_SPACES: tuple[str, ...] = ("pixels_original", "pixels_resized", "norm_1000", "norm_1")
ModelCoordSpace = Literal["pixels_resized", "norm_1000", "pixels_original"]
MODEL_COORD_SPACES: tuple[str, ...] = ("pixels_resized", "norm_1000", "pixels_original")
"""Spaces a model answers in, and that ground truth given to the rewards may be in."""

Size = Sequence[float]


def space_extent(
    space: str, *, image_size: Size | None = None, resized_size: Size | None = None
) -> tuple[float, float]:
    """The ``(width, height)`` bounds of ``space`` (e.g. ``(1000, 1000)`` for ``"norm_1000"``).

    Raises ``ValueError`` for an unknown space, or a pixel space whose size is missing or not positive.
    """
    if space not in COORD_SPACES:
        raise ValueError(f"unknown coordinate space {space!r}; expected one of {COORD_SPACES}")
    if space == "norm_1000":
        return (1000.0, 1000.0)
    if space == "norm_1":
        return (1.0, 1.0)
    size = image_size if space == "pixels_original" else resized_size
    name = "image_size" if space == "pixels_original" else "resized_size"
    if size is None:
        raise ValueError(f"coordinate space {space!r} needs {name}=(width, height)")
    w, h = float(size[0]), float(size[1])
    if not (w > 0 and h > 0):
        raise ValueError(f"{name} must be positive, got {tuple(size)}")
    return (w, h)


def convert_boxes(
    boxes: Any,
    src: CoordSpace,
    dst: CoordSpace,
    *,
    image_size: Size | None = None,
    resized_size: Size | None = None,
) -> Any:
    """Convert ``boxes (..., 4)`` from space ``src`` to space ``dst``.

    A torch tensor comes back as a tensor (floating point; integers become float64); anything else
    (numpy, lists) as a new float64 numpy array. ``image_size``: original ``(width, height)``;
    ``resized_size``: the resized ``(width, height)``; only the sizes the two spaces need are
    required. No rounding (the IoU of integer-rounded boxes is a different number).
    """
    if src == dst:
        space_extent(src, image_size=(1.0, 1.0), resized_size=(1.0, 1.0))  # validates the name only
        return boxes if torch.is_tensor(boxes) else _as_array(boxes).copy()
    sw, sh = space_extent(src, image_size=image_size, resized_size=resized_size)
    dw, dh = space_extent(dst, image_size=image_size, resized_size=resized_size)
    scale = [dw / sw, dh / sh, dw / sw, dh / sh]
    if torch.is_tensor(boxes):
        boxes = boxes if boxes.is_floating_point() else boxes.to(torch.float64)
        return boxes * boxes.new_tensor(scale)
    return _as_array(boxes) * np.asarray(scale, dtype=np.float64)


def _as_array(boxes: Any) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.shape[-1:] != (4,):
        raise ValueError(f"boxes must have a last dimension of 4, got shape {arr.shape}")
    return arr


def resized_to_norm1000(boxes: torch.Tensor, resized_size: Size) -> torch.Tensor:
    """``pixels_resized -> norm_1000``."""
    return convert_boxes(boxes, "pixels_resized", "norm_1000", resized_size=resized_size)


def norm1000_to_resized(boxes: torch.Tensor, resized_size: Size) -> torch.Tensor:
    """``norm_1000 -> pixels_resized``."""
    return convert_boxes(boxes, "norm_1000", "pixels_resized", resized_size=resized_size)


def original_to_resized(boxes: torch.Tensor, image_size: Size, resized_size: Size) -> torch.Tensor:
    """``pixels_original -> pixels_resized`` (annotation -> what the model saw)."""
    return convert_boxes(boxes, "pixels_original", "pixels_resized", image_size=image_size, resized_size=resized_size)


def resized_to_original(boxes: torch.Tensor, image_size: Size, resized_size: Size) -> torch.Tensor:
    """``pixels_resized -> pixels_original`` (model answer -> annotation space)."""
    return convert_boxes(boxes, "pixels_resized", "pixels_original", image_size=image_size, resized_size=resized_size)


def original_to_norm1000(boxes: torch.Tensor, image_size: Size) -> torch.Tensor:
    """``pixels_original -> norm_1000``."""
    return convert_boxes(boxes, "pixels_original", "norm_1000", image_size=image_size)


def norm1000_to_original(boxes: torch.Tensor, image_size: Size) -> torch.Tensor:
    """``norm_1000 -> pixels_original``."""
    return convert_boxes(boxes, "norm_1000", "pixels_original", image_size=image_size)
