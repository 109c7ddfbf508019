"""Box checks of the data layer: clipping, bounds, degenerate boxes, COCO ``xywh``.

Coordinate spaces and conversions live in the project's one coordinate module,
:mod:`megatron_vrft.rewards.coords` (re-exported here for the data layer).
"""

from __future__ import annotations

import numpy as np

from megatron_vrft.rewards.coords import (  # noqa: F401  (re-exported)
    COORD_SPACES,
    MODEL_COORD_SPACES,
    CoordSpace,
    convert_boxes,
    space_extent,
)


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
    return (arr[:, 0] < -tol) | (arr[:, 1] < -tol) | (arr[:, 2] > width + tol) | (arr[:, 3] > height + tol)


def degenerate_boxes(boxes) -> np.ndarray:
    """``(K,)`` bool: zero or negative width or height, or non-finite coordinates."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.all(np.isfinite(arr), axis=-1)
    return ~finite | (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])


def xywh_to_xyxy(boxes) -> np.ndarray:
    """COCO ``(x, y, w, h)`` -> ``(x1, y1, x2, y2)``, float64 ``(..., 4)``."""
    arr = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([arr[..., :2], arr[..., :2] + arr[..., 2:]], axis=-1)
