"""Shared steps of the dataset builders: the summary they return, atomic output, input checks.

Every builder writes into a temporary sibling of its output and renames it into place at the end,
so an interrupted or failed build never leaves a half-written dataset where a reader would find it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vrft.storage import atomic_dir as storage_atomic_dir
from megatron_vrft.storage import atomic_write_bytes

from ..errors import DataError


@dataclass(kw_only=True)
class BuildSummary:
    """What a builder wrote and what it passed over; printed by ``tools/prepare_data.py``."""

    builder: str
    """Builder name, e.g. ``"coco-fewshot"``."""
    output: Path
    """The file or directory written."""
    written: dict[str, int] = field(default_factory=dict)
    """Category / class -> number of records (images, entries or rows) written for it."""
    skipped: Counter = field(default_factory=Counter)
    """Reason -> number of inputs passed over."""
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> the first few names of the inputs passed over."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Builder-specific totals (e.g. ``num_images``, ``num_annotations``)."""

    def skip(self, reason: str, name: str, max_examples: int = 5) -> None:
        """Count one input passed over for ``reason``."""
        self.skipped[reason] += 1
        names = self.skip_examples.setdefault(reason, [])
        if len(names) < max_examples:
            names.append(name)

    @property
    def total(self) -> int:
        return sum(self.written.values())

    def format(self) -> str:
        """Human-readable, one line per category, then the skips."""
        lines = [f"{self.builder}: wrote {self.output}"]
        lines += [f"  {k}: {v}" for k, v in self.extra.items()]
        lines.append(f"  records per category ({len(self.written)} categories, {self.total} in all):")
        lines += [f"    {name}: {n}" for name, n in sorted(self.written.items())]
        if self.skipped:
            lines.append(f"  skipped ({sum(self.skipped.values())}):")
            for reason, n in sorted(self.skipped.items()):
                lines.append(f"    {reason}: {n} (e.g. {', '.join(self.skip_examples.get(reason, []))})")
        else:
            lines.append("  skipped: none")
        return "\n".join(lines)


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; ``DataError`` naming it (and ``what`` it is) when it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} not found: {p}", "missing_file")
    return p


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; ``DataError`` naming it when it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{what} not found: {p}", "missing_file")
    return p


def read_json(path: Path, what: str) -> Any:
    """Parsed JSON of ``path``; a ``DataError`` naming the file when it cannot be read."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from exc


def dump_json(value: Any) -> str:
    """Deterministic JSON text (same value, same bytes)."""
    return json.dumps(value, indent=1, ensure_ascii=False) + "\n"


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise DataError(f"output exists: {out} (pass overwrite=True / --overwrite to replace it)", "output_exists")
    out.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """:func:`megatron_vrft.storage.atomic_dir` with the data layer's error for an existing output."""
    _check_target(Path(out), overwrite)
    with storage_atomic_dir(out, overwrite=True) as tmp:
        yield tmp


def atomic_write_text(out: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` to ``out`` atomically (:func:`megatron_vrft.storage.atomic_write_bytes`)."""
    out = Path(out)
    _check_target(out, overwrite)
    return atomic_write_bytes(out, text.encode("utf-8"))


def safe_folder_name(label: str) -> str:
    """A class folder name that ``read_image_folder`` maps back to ``label``: spaces become ``_``
    (the reader turns ``_`` back into spaces); a path separator becomes ``-``, the only change the
    label cannot survive (builders record the original in ``class_names.json``)."""
    name = label.strip().replace(" ", "_").replace("/", "-").replace(os.sep, "-")
    if name in ("", ".", ".."):
        raise DataError(f"class name {label!r} cannot be a folder name")
    return name
