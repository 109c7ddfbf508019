"""Box coordinate spaces and the maps between them.

Boxes are ``(..., 4)`` arrays ``(x1, y1, x2, y2)`` with x to the right and y down, continuous
coordinates whose image edges are 0 and the image size (pixel ``i`` covers ``[i, i + 1)``).

Coordinate spaces (``CoordSpace``):

``"pixels_original"``
    Absolute pixels of the ORIGINAL image, ``[0, W] x [0, H]``. COCO/LVIS/LISA annotations.
``"pixels_resized"``
    Absolute pixels of the image as the model sees it after the Qwen2-VL processor's
    ``smart_resize`` to ``(W', H')`` (multiples of ``patch_size * merge_size``). What Qwen2.5-VL
    answers in; the default model space here.
``"norm_1000"``
    ``[0, 1000]`` normalised (Qwen2-VL's original grounding convention; some released Visual-RFT
    data uses it).
``"norm_1"``
    ``[0, 1]`` normalised (an input space for annotations only; the rewards package does not know
    it, so model-facing ground truth is never in it).

The names of the first three match :mod:`megatron_vrft.rewards.coords`.

The resize is a separable linear map of continuous coordinates (PIL resamples with pixel edges
aligned), so ``x' = x * W' / W`` and ``y' = y * H' / H`` exactly; converting goes through the
``[0, 1]`` space. All maps are float64.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

CoordSpace = Literal["pixels_original", "pixels_resized", "norm_1000", "norm_1"]
COORD_SPACES: tuple[str, ...] = ("pixels_original", "pixels_resized", "norm_1000", "norm_1")
# Spaces a model may answer in (the rewards package's spaces).
MODEL_COORD_SPACES: tuple[str, ...] = ("pixels_resized", "norm_1000", "pixels_original")


def _extent(space: str, image_size: Sequence[int] | None, resized_size: Sequence[int] | None):
    """(width, height) of ``space`` as floats."""
    if space == "pixels_original":
        if image_size is None:
            raise ValueError("coordinate space 'pixels_original' needs image_size=(W, H)")
        return float(image_size[0]), float(image_size[1])
    if space == "pixels_resized":
        if resized_size is None:
            raise ValueError("coordinate space 'pixels_resized' needs resized_size=(W', H')")
        return float(resized_size[0]), float(resized_size[1])
    if space == "norm_1000":
        return 1000.0, 1000.0
    if space == "norm_1":
        return 1.0, 1.0
    raise ValueError(f"unknown coordinate space {space!r}; expected one of {COORD_SPACES}")


def convert_boxes(
    boxes,
    src: CoordSpace,
    dst: CoordSpace,
    *,
    image_size: Sequence[int] | None = None,
    resized_size: Sequence[int] | None = None,
) -> np.ndarray:
    """Map boxes ``(..., 4)`` from ``src`` to ``dst`` space; returns float64 ``(..., 4)``.

    ``image_size`` is the original ``(W, H)`` (needed for ``"pixels_original"``), ``resized_size``
    the processor's ``(W', H')`` (needed for ``"pixels_resized"``).
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.shape[-1:] != (4,):
        raise ValueError(f"boxes must have a last dimension of 4, got shape {arr.shape}")
    sw, sh = _extent(src, image_size, resized_size)
    dw, dh = _extent(dst, image_size, resized_size)
    if src == dst:
        return arr.copy()
    scale = np.array([dw / sw, dh / sh, dw / sw, dh / sh], dtype=np.float64)
    return arr * scale


def space_extent(
    space: CoordSpace,
    *,
    image_size: Sequence[int] | None = None,
    resized_size: Sequence[int] | None = None,
) -> tuple[float, float]:
    """The ``(width, height)`` bounds of ``space`` (e.g. ``(1000, 1000)`` for ``"norm_1000"``)."""
    return _extent(space, image_size, resized_size)


def clip_boxes(boxes, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``(K, 4)`` boxes to ``[0, width] x [0, height]``.

    Returns ``(clipped (K, 4) float64, changed (K,) bool)``; ``changed`` marks boxes that moved.
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    hi = np.array([width, height, width, height], dtype=np.float64)
    clipped = np.clip(arr, 0.0, hi)
    changed = np.any(clipped != arr, axis=-1)
    return clipped, changed


def boxes_out_of_bounds(boxes, width: float, height: float, tol: float = 1e-6) -> np.ndarray:
    """``(K,)`` bool: the box extends outside ``[0, width] x [0, height]`` by more than ``tol``."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (
        (arr[:, 0] < -tol)
        | (arr[:, 1] < -tol)
        | (arr[:, 2] > width + tol)
        | (arr[:, 3] > height + tol)
    )


def degenerate_boxes(boxes) -> np.ndarray:
    """``(K,)`` bool: zero or negative width or height, or non-finite coordinates."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.all(np.isfinite(arr), axis=-1)
    return ~finite | (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])


def xywh_to_xyxy(boxes) -> np.ndarray:
    """COCO ``(x, y, w, h)`` -> ``(x1, y1, x2, y2)``, float64 ``(..., 4)``."""
    arr = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([arr[..., :2], arr[..., :2] + arr[..., 2:]], axis=-1)
