"""Bad-input policy for the data layer: raise with a clear message, or skip and count.

Every reader and the preprocessing take ``on_error: "raise" | "skip"``. With ``"raise"`` the first
bad record raises :class:`DataError` naming the file / record / field. With ``"skip"`` the record
is dropped, counted under a reason in a :class:`SkipCounts` owned by the caller's result, and
logged with its name; nothing is dropped silently. Box clipping is counted the same way even though
it keeps the record. :func:`raise_or_skip` is the one place that decision is made.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger("megatron_vrft.data")

OnError = Literal["raise", "skip"]
OutOfBounds = Literal["clip", "error"]

# Reasons used by the readers (free-form strings are allowed; these are the common ones).
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
BAD_ANNOTATION = "bad_annotation"
BOX_OUT_OF_BOUNDS = "box_out_of_bounds"
BOX_CLIPPED = "box_clipped"
DEGENERATE_BOX = "degenerate_box"
EMPTY_CATEGORIES = "empty_categories"
UNPARSEABLE_SOLUTION = "unparseable_solution"


class DataError(ValueError):
    """Bad input data; the message names the file, record and field concerned.

    ``reason`` is one of the reason strings above; skip mode counts under it.
    """

    def __init__(self, message: str, reason: str = BAD_ANNOTATION):
        super().__init__(message)
        self.reason = reason


@dataclass(kw_only=True)
class SkipCounts:
    """Counts of skipped records (and clipped boxes) by reason, with the first few names each.

    One instance per read / preprocessing pass; merge several with :meth:`merge`.
    """

    counts: Counter = field(default_factory=Counter)
    """reason -> number of events."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """reason -> up to ``max_examples`` record names, for the report."""
    max_examples: int = 5
    """How many names to keep per reason."""

    def add(self, reason: str, name: str, message: str) -> None:
        """Count one event and log it (warning level) with the record name and the message."""
        self.counts[reason] += 1
        names = self.examples.setdefault(reason, [])
        if len(names) < self.max_examples:
            names.append(name)
        logger.warning("data: %s [%s]: %s", reason, name, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipCounts) -> None:
        self.counts.update(other.counts)
        for reason, names in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(names[: max(0, self.max_examples - len(mine))])

    def summary(self) -> str:
        """One line: ``"3 events: corrupt_image=2 (a.jpg, b.jpg), box_clipped=1 (img 7)"``."""
        if not self.counts:
            return "0 events"
        parts = [
            f"{reason}={n} ({', '.join(self.examples.get(reason, []))})" for reason, n in sorted(self.counts.items())
        ]
        return f"{self.total} events: " + ", ".join(parts)


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def raise_or_skip(
    on_error: OnError,
    skips: SkipCounts,
    error: DataError,
    name: str,
    *,
    count: int = 1,
    skip_message: str | None = None,
) -> None:
    """The one spelling of the ``on_error`` decision for a bad record (or box): raise ``error``
    under ``"raise"``; under ``"skip"`` count ``count`` events of ``name`` under ``error.reason``
    (logged with ``skip_message``, default ``str(error)``) and return, the caller then dropping
    what was bad. Called while handling an exception, the raised error chains to it."""
    if on_error == "raise":
        raise error
    for _ in range(count):
        skips.add(error.reason, name, str(error) if skip_message is None else skip_message)
