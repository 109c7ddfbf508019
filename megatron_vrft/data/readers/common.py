"""Shared reader steps: image checks under the error policy, and the end-of-read checks."""

from __future__ import annotations

from ..errors import BAD_ANNOTATION, DataError, OnError, SkipCounts, raise_or_skip
from ..records import ImageSource, RecordSet, VisualRecord, load_image, read_image_size


class ImageChecker:
    """Checks image sources once each (cached), returning ``(W, H)`` or raising ``DataError``.

    ``decode=True`` fully decodes (catches truncated files); ``False`` reads the header only.
    """

    def __init__(self, *, decode: bool):
        self.decode = decode
        self._cache: dict[str, tuple[int, int] | DataError] = {}

    def size(self, source: ImageSource, key: str) -> tuple[int, int]:
        hit = self._cache.get(key)
        if hit is None:
            try:
                hit = load_image(source).size if self.decode else read_image_size(source)
                hit = (int(hit[0]), int(hit[1]))
            except DataError as exc:
                hit = exc
            self._cache[key] = hit
        if isinstance(hit, DataError):
            raise hit
        return hit


def finish_read(records: list[VisualRecord], skips: SkipCounts, source: str, num_candidates: int) -> RecordSet:
    """Wrap up a read: raise on an empty result (naming the source and the skip summary)."""
    if not records:
        raise DataError(
            f"{source}: empty dataset: no records ({num_candidates} candidates; skipped: {skips.summary()})"
        )
    return RecordSet(records=records, skips=skips, source=source)


def record_or_skip(build, *, on_error: OnError, skips: SkipCounts, name: str) -> VisualRecord | None:
    """Call ``build()``; a ``DataError`` (or ``ValueError`` from record validation) raises under
    ``on_error="raise"`` and is counted by reason under ``"skip"``; either way the message starts
    with the record's ``name`` (file and row / id)."""
    try:
        return build()
    except DataError as exc:
        message = str(exc) if name in str(exc) else f"{name}: {exc}"
        raise_or_skip(on_error, skips, DataError(message, exc.reason), name)
    except ValueError as exc:
        error = DataError(f"{name}: {exc}", BAD_ANNOTATION)
        raise_or_skip(on_error, skips, error, name, skip_message=str(exc))
    return None
