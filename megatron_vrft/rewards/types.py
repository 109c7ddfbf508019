"""Typed inputs and outputs shared by every reward: ground truth, parse failures, reward output.

Rewards never raise on a bad *completion* (model output): it scores the reward's failure score and
one failure reason is counted. A bad *ground truth* is a data bug and raises ``ValueError`` naming
the record index and field.

Ground-truth fields a reward reads (a ``GroundTruth`` or a plain dict with these keys):

============  =====================================================  ==============================
field         meaning                                                read by
============  =====================================================  ==============================
label         class name, e.g. ``"black footed albatross"``          ``accuracy``
synonyms      other accepted names for ``label``                      ``accuracy``
boxes         ``(K, 4)`` boxes ``x1, y1, x2, y2`` in ``box_space``;   ``iou``, ``confidence``
              ``K = 0`` means "no object of the category"
categories    ``K`` category names, one per box (optional)            ``iou``/``confidence`` with
                                                                      ``match_categories=True``
box           one ``(4,)`` box in ``box_space``                       ``grounding_*``
box_space     coordinate space of ``boxes``/``box`` (see coords.py)   detection, grounding
image_size    original image ``(width, height)`` in pixels            coordinate conversion
resized_size  image ``(width, height)`` the model saw, in pixels      coordinate conversion
============  =====================================================  ==============================
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Literal, Mapping, Sequence

import torch

from megatron_vrft.rewards.coords import MODEL_COORD_SPACES, ModelCoordSpace


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


def _as_size(value: Any, index: int, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"ground_truths[{index}].{name}: expected (width, height), got {value!r}")
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"ground_truths[{index}].{name}: width/height must be > 0, got {value!r}")
    return (w, h)


def _as_boxes(value: Any, index: int, name: str, single: bool) -> torch.Tensor | None:
    if value is None:
        return None
    try:
        t = torch.as_tensor(value, dtype=torch.float64).cpu()  # rewards are computed on the CPU
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"ground_truths[{index}].{name}: not numeric: {value!r}")
    if single:
        if t.shape != (4,):
            raise ValueError(f"ground_truths[{index}].{name}: expected shape (4,), got {tuple(t.shape)}")
    else:
        if t.numel() == 0:
            t = t.reshape(0, 4)
        if t.dim() != 2 or t.shape[-1] != 4:
            raise ValueError(f"ground_truths[{index}].{name}: expected shape (K, 4), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"ground_truths[{index}].{name}: non-finite coordinates")
    if bool(((t[..., 2] < t[..., 0]) | (t[..., 3] < t[..., 1])).any()):
        raise ValueError(f"ground_truths[{index}].{name}: inverted box (x2 < x1 or y2 < y1)")
    return t


@dataclass(kw_only=True)
class GroundTruth:
    """Ground truth of one prompt; every field is optional, each reward checks what it needs."""

    label: str | None = None
    """Classification label (``accuracy``)."""
    synonyms: Sequence[str] = ()
    """Other names accepted for ``label`` (``accuracy``, default mode)."""
    boxes: Any = None
    """``(K, 4)`` detection boxes in ``box_space``; list, numpy or tensor; stored float64 tensor."""
    categories: Sequence[str] | None = None
    """``K`` category names, one per row of ``boxes`` (only used with ``match_categories``)."""
    box: Any = None
    """``(4,)`` grounding box in ``box_space``; stored float64 tensor."""
    box_space: ModelCoordSpace | None = None
    """Coordinate space of ``boxes`` and ``box``; required when either is given."""
    image_size: Any = None
    """Original image ``(width, height)`` in pixels (needed to convert from/to ``pixels_original``)."""
    resized_size: Any = None
    """Resized image ``(width, height)`` the model saw (needed for ``pixels_resized``)."""
    index: int = field(default=-1, repr=False)
    """Position in the batch, only used to name the record in error messages."""

    def __post_init__(self) -> None:
        i = self.index
        if self.label is not None and not isinstance(self.label, str):
            raise ValueError(f"ground_truths[{i}].label: expected str, got {type(self.label).__name__}")
        if self.synonyms is None:
            self.synonyms = ()
        if not isinstance(self.synonyms, (list, tuple)) or not all(isinstance(s, str) for s in self.synonyms):
            raise ValueError(f"ground_truths[{i}].synonyms: expected a sequence of str")
        self.synonyms = tuple(self.synonyms)
        self.boxes = _as_boxes(self.boxes, i, "boxes", single=False)
        self.box = _as_boxes(self.box, i, "box", single=True)
        if self.categories is not None:
            if not isinstance(self.categories, (list, tuple)) or not all(isinstance(c, str) for c in self.categories):
                raise ValueError(f"ground_truths[{i}].categories: expected a sequence of str")
            self.categories = tuple(self.categories)
            if self.boxes is None or len(self.categories) != self.boxes.shape[0]:
                raise ValueError(f"ground_truths[{i}].categories: need one category per row of boxes")
        if (self.boxes is not None or self.box is not None) and self.box_space not in MODEL_COORD_SPACES:
            raise ValueError(
                f"ground_truths[{i}].box_space: expected one of {MODEL_COORD_SPACES}, got {self.box_space!r}"
            )
        self.image_size = _as_size(self.image_size, i, "image_size")
        self.resized_size = _as_size(self.resized_size, i, "resized_size")


_GT_FIELDS = tuple(f.name for f in fields(GroundTruth) if f.name != "index")


def as_ground_truth(obj: GroundTruth | Mapping[str, Any], index: int = -1) -> GroundTruth:
    """Coerce a dict (keys: the ``GroundTruth`` fields) into a validated ``GroundTruth``."""
    if isinstance(obj, GroundTruth):
        return obj
    if not isinstance(obj, Mapping):
        raise ValueError(f"ground_truths[{index}]: expected GroundTruth or dict, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_GT_FIELDS))
    if unknown:
        raise ValueError(f"ground_truths[{index}]: unknown keys {unknown}; known: {list(_GT_FIELDS)}")
    return GroundTruth(**obj, index=index)


def as_ground_truths(
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]], num_completions: int
) -> list[GroundTruth]:
    if len(ground_truths) != num_completions:
        raise ValueError(
            f"got {num_completions} completions but {len(ground_truths)} ground truths"
        )
    return [as_ground_truth(g, i) for i, g in enumerate(ground_truths)]
