"""Typed inputs and outputs shared by every reward: ground truth, parse failures, reward output.

:class:`GroundTruth` is the project's one ground-truth type: the data layer builds it (in the
annotation's space), preprocessing maps it into the model's box space (:meth:`GroundTruth.in_space`),
the rewards and the evaluation read it. Rewards never raise on a bad *completion* (model output): it
scores the reward's failure score and one failure reason is counted. A bad *ground truth* is a data
bug and raises ``ValueError`` naming the record (``GroundTruth.name``: its source id, or
``ground_truths[i]`` for one built from a plain dict) and the field.

Fields (every one optional; each reward checks what it needs):

================  ===================================================  ============================
field             meaning                                              read by
================  ===================================================  ============================
label             class name, e.g. ``"black footed albatross"``        ``accuracy``
synonyms          other accepted names for ``label``                    ``accuracy``
boxes             ``(K, 4)`` boxes ``x1, y1, x2, y2`` in                ``iou``, ``confidence``
                  ``coord_space``; ``K = 0``: no object of the
                  category
categories        ``K`` category names, one per box (optional)          ``iou``/``confidence`` with
                                                                       ``match_categories=True``
box               one ``(4,)`` box in ``coord_space``                   ``grounding_*``
crowd_boxes       ``(C, 4)`` COCO ``iscrowd=1`` regions in              evaluation only (COCOeval
                  ``coord_space``, apart from ``boxes``                 crowd); never the rewards
crowd_categories  ``C`` names, one per crowd region                     evaluation only
coord_space       space of all the boxes (see ``coords``)               detection, grounding
image_size        original image ``(width, height)`` in pixels          coordinate conversion
resized_size      image ``(width, height)`` the model saw, in pixels    coordinate conversion
================  ===================================================  ============================

Boxes are stored as float64 numpy arrays (finite, ``x2 >= x1`` and ``y2 >= y1``); the rewards
convert them to CPU float64 tensors where they compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np
import torch

from megatron_vrft.rewards.coords import COORD_SPACES, MODEL_COORD_SPACES, CoordSpace, convert_boxes


class FailureReason(str, Enum):
    """Why a completion could not be scored. Each failed completion counts exactly one reason."""

    NOT_A_STRING = "not_a_string"  # completion is not ``str``
    TOO_LONG = "too_long"  # completion or answer longer than the documented caps
    BAD_FORMAT = "bad_format"  # format reward: no ``<think>..</think><answer>..</answer>`` match
    NO_ANSWER_TAG = "no_answer_tag"  # no ``<answer>``
    UNCLOSED_ANSWER_TAG = "unclosed_answer_tag"  # ``<answer>`` without ``</answer>`` (truncated)
    MULTIPLE_ANSWER_TAGS = "multiple_answer_tags"  # ambiguous: which answer counts?
    EMPTY_ANSWER = "empty_answer"  # nothing (or only punctuation) inside the answer tags
    NOT_A_LIST = "not_a_list"  # no parseable list/dict of boxes in the answer
    TOO_DEEP = "too_deep"  # brackets nested deeper than any valid answer needs
    TOO_MANY_BOXES = "too_many_boxes"  # more than ``MAX_BOXES`` predictions
    BAD_ENTRY = "bad_entry"  # a list element is neither a box dict nor a 4-number list
    MISSING_BOX = "missing_box"  # entry without a position key, or no box at all (grounding)
    MULTIPLE_BOXES = "multiple_boxes"  # grounding answer with more than one box
    BAD_BOX_LENGTH = "bad_box_length"  # a box that is not exactly 4 numbers
    BAD_NUMBER = "bad_number"  # non-numeric coordinate / confidence
    NONFINITE = "nonfinite"  # NaN or +-inf
    OUT_OF_RANGE = "out_of_range"  # |coordinate| > MAX_ABS_COORD
    INVERTED_BOX = "inverted_box"  # x2 < x1 or y2 < y1 (rejected, never swapped)
    DEGENERATE_BOX = "degenerate_box"  # x2 == x1 or y2 == y1 (zero area)
    MISSING_CONFIDENCE = "missing_confidence"  # detection entry without a confidence
    BAD_CONFIDENCE = "bad_confidence"  # confidence outside [0, 1] (or [0 %, 100 %])
    MISSING_LABEL = "missing_label"  # ``match_categories=True`` and an entry has no label


class ParseFailures(Counter):
    """Counter ``reason (str) -> number of completions`` that failed for that reason."""

    def add(self, reason: FailureReason | str) -> None:
        self[FailureReason(reason).value] += 1

    def num_failed(self) -> int:
        return sum(self.values())

    def as_metrics(self, prefix: str, num_completions: int) -> dict[str, float]:
        """``{f"{prefix}/parse_fail/{reason}": fraction}`` plus the total fraction."""
        denom = max(num_completions, 1)
        out = {f"{prefix}/parse_fail/{r}": n / denom for r, n in sorted(self.items())}
        out[f"{prefix}/parse_fail_rate"] = self.num_failed() / denom
        return out


@dataclass(kw_only=True)
class RewardOutput:
    """What every reward function returns."""

    scores: torch.Tensor
    """``(B,)`` float32 rewards, finite, inside the reward's ``[min_score, max_score]``."""
    reasons: list[str | None]
    """``(B,)`` the failure reason of each completion, ``None`` where it parsed."""
    failures: ParseFailures
    """Per-reason counts of ``reasons`` (the batch's parse-failure metric)."""

    @property
    def failed(self) -> torch.Tensor:
        """``(B,)`` bool: completion failed to parse."""
        return torch.tensor([r is not None for r in self.reasons], dtype=torch.bool)


def build_reward_output(scores: Sequence[float], reasons: Sequence[str | None]) -> RewardOutput:
    failures = ParseFailures()
    for r in reasons:
        if r is not None:
            failures.add(r)
    return RewardOutput(
        scores=torch.tensor(list(scores), dtype=torch.float32).reshape(-1),
        reasons=list(reasons),
        failures=failures,
    )


def _as_size(value: Any, where: str, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}.{name}: expected (width, height), got {value!r}") from None
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"{where}.{name}: width/height must be > 0, got {value!r}")
    return (w, h)


def _as_boxes(value: Any, where: str, name: str, single: bool) -> np.ndarray | None:
    """``value`` as a new float64 array ``(4,)`` (``single``) or ``(K, 4)``; raises ``ValueError``
    for anything else, non-finite coordinates or an inverted box (``x2 < x1`` or ``y2 < y1``)."""
    if value is None:
        return None
    if torch.is_tensor(value):
        value = value.detach().cpu()
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}.{name}: not numeric: {value!r}") from None
    if single:
        if arr.shape != (4,):
            raise ValueError(f"{where}.{name}: expected shape (4,), got {arr.shape}")
    else:
        if arr.size == 0:
            arr = arr.reshape(0, 4)
        if arr.ndim != 2 or arr.shape[-1] != 4:
            raise ValueError(f"{where}.{name}: expected shape (K, 4), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}.{name}: non-finite coordinates")
    if ((arr[..., 2] < arr[..., 0]) | (arr[..., 3] < arr[..., 1])).any():
        raise ValueError(f"{where}.{name}: inverted box (x2 < x1 or y2 < y1)")
    return arr


def _as_names(value: Any, where: str, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{where}.{name}: expected a sequence of str, got {value!r}")
    return tuple(value)


@dataclass(kw_only=True, eq=False)
class GroundTruth:
    """Ground truth of one example: the one type of the data layer, the rewards and the evaluation.

    Every field is optional; each consumer checks what it needs. Construction validates and
    normalises (boxes to float64 arrays, names to tuples) and raises ``ValueError`` naming
    ``name`` and the field.
    """

    label: str | None = None
    """Classification: the class name (``accuracy``)."""
    synonyms: tuple[str, ...] = ()
    """Classification: other names accepted for ``label``."""
    boxes: np.ndarray | None = None
    """Detection: ``(K, 4)`` float64 ``x1, y1, x2, y2`` in ``coord_space``; ``K = 0`` means no object
    of the asked categories is present. Accepts lists, numpy arrays or tensors."""
    categories: tuple[str, ...] | None = None
    """Detection: the category name of each box, length ``K`` (``None``: not known)."""
    box: np.ndarray | None = None
    """Grounding: ``(4,)`` float64, the one referred box, in ``coord_space``."""
    crowd_boxes: np.ndarray | None = None
    """Detection, evaluation only: ``(C, 4)`` float64 crowd regions (COCO ``iscrowd=1``) in
    ``coord_space``, kept apart from ``boxes`` so the rewards never match against them; evaluation
    passes them to COCOeval as crowd annotations. ``None``: the source has no crowd information."""
    crowd_categories: tuple[str, ...] = ()
    """The category name of each crowd region, length ``C``."""
    coord_space: CoordSpace | None = None
    """Space of ``boxes``, ``box`` and ``crowd_boxes`` (see :mod:`megatron_vrft.rewards.coords`):
    what a reader stored (``"norm_1"`` included) or, after preprocessing, the model's box space.
    Required when any box is given."""
    image_size: tuple[float, float] | None = None
    """Original image ``(width, height)`` in pixels (to convert from/to ``pixels_original``)."""
    resized_size: tuple[float, float] | None = None
    """Image ``(width, height)`` the model saw (to convert from/to ``pixels_resized``)."""
    name: str = field(default="ground_truth", repr=False)
    """How error messages name this ground truth: the record's source id, or ``ground_truths[i]``."""

    def __post_init__(self) -> None:
        where = self.name
        if self.label is not None and not isinstance(self.label, str):
            raise ValueError(f"{where}.label: expected str, got {type(self.label).__name__}")
        self.synonyms = () if self.synonyms is None else _as_names(self.synonyms, where, "synonyms")
        self.boxes = _as_boxes(self.boxes, where, "boxes", single=False)
        self.box = _as_boxes(self.box, where, "box", single=True)
        self.crowd_boxes = _as_boxes(self.crowd_boxes, where, "crowd_boxes", single=False)
        if self.categories is not None:
            self.categories = _as_names(self.categories, where, "categories")
            if self.boxes is None or len(self.categories) != len(self.boxes):
                num = "no" if self.boxes is None else len(self.boxes)
                raise ValueError(
                    f"{where}.categories: need one category per row of boxes, got {num} boxes "
                    f"but {len(self.categories)} category names"
                )
        self.crowd_categories = _as_names(self.crowd_categories or (), where, "crowd_categories")
        num_crowd = 0 if self.crowd_boxes is None else len(self.crowd_boxes)
        if len(self.crowd_categories) != num_crowd:
            raise ValueError(
                f"{where}.crowd_categories: need one category per crowd box, got {num_crowd} crowd "
                f"boxes but {len(self.crowd_categories)} crowd category names"
            )
        has_boxes = self.boxes is not None or self.box is not None or self.crowd_boxes is not None
        if (has_boxes or self.coord_space is not None) and self.coord_space not in COORD_SPACES:
            raise ValueError(
                f"{where}.coord_space: expected one of {COORD_SPACES}"
                f"{' (required with boxes)' if has_boxes else ''}, got {self.coord_space!r}"
            )
        self.image_size = _as_size(self.image_size, where, "image_size")
        self.resized_size = _as_size(self.resized_size, where, "resized_size")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GroundTruth):
            return NotImplemented
        for f in _GT_FIELDS:
            a, b = getattr(self, f), getattr(other, f)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if a is None or b is None or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # mutable

    def where(self, index: int) -> str:
        """``ground_truths[index]`` plus the record's name, for a consumer's error message."""
        at = f"ground_truths[{index}]"
        return at if self.name in (at, "ground_truth") else f"{at} ({self.name})"

    def in_space(
        self,
        dst: CoordSpace,
        *,
        image_size: Sequence[float] | None = None,
        resized_size: Sequence[float] | None = None,
    ) -> GroundTruth:
        """This ground truth with every box converted into ``dst`` (float64, no rounding).

        ``image_size`` / ``resized_size`` default to this one's and are stored on the result;
        raises ``ValueError`` when a pixel space needs a size that is missing. Without boxes only
        the sizes change.
        """
        sizes = dict(
            image_size=self.image_size if image_size is None else image_size,
            resized_size=self.resized_size if resized_size is None else resized_size,
        )
        if self.coord_space is None or self.coord_space == dst:
            return dataclasses.replace(self, **sizes)
        convert = lambda b: None if b is None else convert_boxes(b, self.coord_space, dst, **sizes)  # noqa: E731
        return dataclasses.replace(
            self,
            coord_space=dst,
            boxes=convert(self.boxes),
            box=convert(self.box),
            crowd_boxes=convert(self.crowd_boxes),
            **sizes,
        )


_GT_FIELDS = tuple(f.name for f in fields(GroundTruth) if f.name != "name")


def check_model_space(gt: GroundTruth, index: int) -> None:
    """Raise ``ValueError`` unless ``gt``'s boxes are in a space a model answers in
    (``MODEL_COORD_SPACES``; not the annotation-only ``"norm_1"``): what box rewards compare in."""
    if gt.coord_space not in MODEL_COORD_SPACES:
        raise ValueError(
            f"{gt.where(index)}.coord_space: box rewards need one of {MODEL_COORD_SPACES}, "
            f"got {gt.coord_space!r} (map it with GroundTruth.in_space)"
        )


def as_ground_truth(obj: GroundTruth | Mapping[str, Any], index: int = -1) -> GroundTruth:
    """``obj`` itself, or a plain dict (keys: the ``GroundTruth`` fields) made into one; its error
    messages name it ``ground_truths[index]``."""
    if isinstance(obj, GroundTruth):
        return obj
    if not isinstance(obj, Mapping):
        raise ValueError(f"ground_truths[{index}]: expected GroundTruth or dict, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_GT_FIELDS))
    if unknown:
        raise ValueError(f"ground_truths[{index}]: unknown keys {unknown}; known: {list(_GT_FIELDS)}")
    return GroundTruth(**obj, name=f"ground_truths[{index}]")


def as_ground_truths(
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]], num_completions: int
) -> list[GroundTruth]:
    if len(ground_truths) != num_completions:
        raise ValueError(f"got {num_completions} completions but {len(ground_truths)} ground truths")
    return [as_ground_truth(g, i) for i, g in enumerate(ground_truths)]
