"""Box coordinate spaces and conversions between them.

Three spaces, all ``(x1, y1, x2, y2)`` with x to the right and y down:

- ``"pixels_resized"``: absolute pixels of the image *after* the processor's resize (the
  ``resized_size`` the vision tower saw, e.g. Qwen2-VL's ``smart_resize`` output, multiples of 28).
  Qwen2.5-VL is trained to answer in this space (absolute coordinates).
- ``"norm_1000"``: each axis scaled to ``[0, 1000]`` of the image, independent of its size.
  Qwen2-VL's grounding format (``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``) and the Visual-RFT
  detection prompt ("bounding boxes (between 0 and 1000, integer)") use this space.
- ``"pixels_original"``: absolute pixels of the image as stored on disk (COCO/LVIS annotations).

Conversions go through the unit square: ``u = x / width_of_space``; ``norm_1000`` has width 1000.
Sizes are ``(width, height)``. Conversion is linear, so IoU is invariant under it only when both
axes scale by the same factor; rewards therefore convert predictions into the ground truth's space
before computing IoU, never the other way round.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_vrft.rewards.types import COORD_SPACES, CoordSpace

Size = Sequence[float]


def _space_size(
    space: str, image_size: Size | None, resized_size: Size | None
) -> tuple[float, float]:
    if space not in COORD_SPACES:
        raise ValueError(f"unknown coordinate space {space!r}; expected one of {COORD_SPACES}")
    if space == "norm_1000":
        return (1000.0, 1000.0)
    size = image_size if space == "pixels_original" else resized_size
    name = "image_size" if space == "pixels_original" else "resized_size"
    if size is None:
        raise ValueError(f"converting from/to {space!r} needs {name} (width, height)")
    w, h = float(size[0]), float(size[1])
    if not (w > 0 and h > 0):
        raise ValueError(f"{name} must be positive, got {tuple(size)}")
    return (w, h)


def convert_boxes(
    boxes: torch.Tensor,
    src: CoordSpace,
    dst: CoordSpace,
    *,
    image_size: Size | None = None,
    resized_size: Size | None = None,
) -> torch.Tensor:
    """Convert ``boxes (..., 4)`` from space ``src`` to space ``dst``.

    ``image_size``: original ``(width, height)``; ``resized_size``: the resized ``(width, height)``.
    Only the sizes the two spaces need are required; ``src == dst`` returns ``boxes`` unchanged.
    Floating point result (no rounding: the IoU of integer-rounded boxes is a different number).
    """
    if src == dst:
        _space_size(src, (1.0, 1.0), (1.0, 1.0))  # validates the name only
        return boxes
    sw, sh = _space_size(src, image_size, resized_size)
    dw, dh = _space_size(dst, image_size, resized_size)
    boxes = boxes if boxes.is_floating_point() else boxes.to(torch.float64)
    scale = boxes.new_tensor([dw / sw, dh / sh, dw / sw, dh / sh])
    return boxes * scale


def resized_to_norm1000(boxes: torch.Tensor, resized_size: Size) -> torch.Tensor:
    """``pixels_resized -> norm_1000``."""
    return convert_boxes(boxes, "pixels_resized", "norm_1000", resized_size=resized_size)


def norm1000_to_resized(boxes: torch.Tensor, resized_size: Size) -> torch.Tensor:
    """``norm_1000 -> pixels_resized``."""
    return convert_boxes(boxes, "norm_1000", "pixels_resized", resized_size=resized_size)


def original_to_resized(boxes: torch.Tensor, image_size: Size, resized_size: Size) -> torch.Tensor:
    """``pixels_original -> pixels_resized`` (annotation -> what the model saw)."""
    return convert_boxes(
        boxes, "pixels_original", "pixels_resized", image_size=image_size, resized_size=resized_size
    )


def resized_to_original(boxes: torch.Tensor, image_size: Size, resized_size: Size) -> torch.Tensor:
    """``pixels_resized -> pixels_original`` (model answer -> annotation space)."""
    return convert_boxes(
        boxes, "pixels_resized", "pixels_original", image_size=image_size, resized_size=resized_size
    )


def original_to_norm1000(boxes: torch.Tensor, image_size: Size) -> torch.Tensor:
    """``pixels_original -> norm_1000``."""
    return convert_boxes(boxes, "pixels_original", "norm_1000", image_size=image_size)


def norm1000_to_original(boxes: torch.Tensor, image_size: Size) -> torch.Tensor:
    """``norm_1000 -> pixels_original``."""
    return convert_boxes(boxes, "norm_1000", "pixels_original", image_size=image_size)
