"""Image-folder classification: ``root/<class>/<image>``, one folder per class, k-shot sampling.

The label of a folder is its name with ``_`` replaced by spaces (``label_map`` overrides per
folder). Files are taken in sorted order; k-shot picks ``k`` per class with the seeded sampler,
passing over unreadable images under ``on_error="skip"`` (so ``k`` per class where ``k`` readable
images exist).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import EMPTY_CATEGORIES, DataError, OnError, SkipCounts, check_on_error, raise_or_skip
from ..prompts import build_classification_prompt
from ..records import GroundTruth, RecordSet, VisualRecord
from ..sampling import sample_k_shot
from .common import ImageChecker, finish_read, record_or_skip

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)


def read_image_folder(
    root: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    k_shot: int | None = None,
    seed: int = 0,
    label_map: Mapping[str, str] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    object_type: str = "object",
    attribute: str = "category",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    verify_images: bool = True,
    on_error: OnError = "raise",
) -> RecordSet:
    """Classification records from an image folder.

    Args:
        root: directory with one sub-directory per class.
        classes: folder names to keep (None: all); unknown names raise.
        k_shot: images per class (None: all).
        seed: k-shot seed.
        label_map: folder name -> label text (default: folder name, ``_`` -> space).
        synonyms: label -> other accepted names.
        object_type, attribute: prompt wording ("This is an image containing a <object_type>.
            Please identify the <attribute> of the <object_type> ...").
        extensions: image file suffixes (case-insensitive).
        verify_images: fully decode each used image instead of reading the header.
        on_error: ``"raise"`` or ``"skip"`` (counted) for unreadable images.

    Raises:
        DataError: missing root, no class folders, unknown ``classes``, an unreadable image under
            ``"raise"``, or no records.
    """
    check_on_error(on_error)
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"image folder not found: {base}", "missing_file")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir())
    if classes is not None:
        unknown = [c for c in classes if c not in folders]
        if unknown:
            raise DataError(f"{base}: unknown class folders {unknown}", EMPTY_CATEGORIES)
        folders = [f for f in folders if f in set(classes)]
    if not folders:
        raise DataError(f"{base}: no class folders", EMPTY_CATEGORIES)
    exts = {e.lower() for e in extensions}
    skips = SkipCounts()
    checker = ImageChecker(decode=verify_images)

    def usable(path: Path) -> bool:
        try:
            checker.size(path, str(path))
            return True
        except DataError as exc:
            raise_or_skip(on_error, skips, exc, str(path))
            return False

    per_class: dict[str, list[Path]] = {}
    for folder in folders:
        files = sorted(p for p in (base / folder).iterdir() if p.is_file() and p.suffix.lower() in exts)
        if not files:
            skips.add("category_without_examples", str(base / folder), "no image files")
        per_class[folder] = files
    num_candidates = sum(len(v) for v in per_class.values())
    if k_shot is not None:
        picked = sample_k_shot(per_class, k_shot, seed=seed, accept=usable)
    else:
        picked = {c: [p for p in files if usable(p)] for c, files in per_class.items()}

    prompt = build_classification_prompt(object_type=object_type, attribute=attribute)
    records: list[VisualRecord] = []
    for folder in folders:
        label = (label_map or {}).get(folder, folder.replace("_", " "))
        for path in sorted(picked[folder]):

            def build(path=path, label=label, folder=folder) -> VisualRecord:
                return VisualRecord(
                    source_id=str(path),
                    task="classification",
                    images=[path],
                    problem=prompt,
                    ground_truth=GroundTruth(label=label, synonyms=tuple((synonyms or {}).get(label, ()))),
                    image_size=checker.size(path, str(path)),
                    metadata={"class_folder": folder},
                )

            rec = record_or_skip(build, on_error=on_error, skips=skips, name=str(path))
            if rec is not None:
                records.append(rec)
    return finish_read(records, skips, str(base), num_candidates)
