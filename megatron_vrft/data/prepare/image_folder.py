"""Few-shot image-folder builders for the fine-grained classification sets, from their released
layouts, into ``out/<class folder>/<image>`` (what ``read_image_folder`` reads).

Layouts read (paths relative to ``--root``):

- Flowers102: ``jpg/image_NNNNN.jpg``, ``imagelabels.mat`` (``labels``, 1..102 per image),
  ``setid.mat`` (``trnid`` / ``valid`` / ``tstid``: 1-based image numbers). Class names: the
  public 102-name list below, or a file with one name per line (line i = label i).
- Oxford-IIIT Pets: ``images/<Breed_Name>_<n>.jpg``, ``annotations/{trainval,test}.txt``
  (``<file stem> <class id> <species> <breed id>``; ``#`` lines are comments). The class is the
  file stem without its trailing ``_<n>``.
- FGVC-Aircraft: ``data/images/<id>.jpg``, ``data/images_variant_<split>.txt`` (``<id> <variant
  name>``; split ``train`` / ``val`` / ``trainval`` / ``test``).
- Stanford Cars (the devkit variant): ``devkit/cars_meta.mat`` (``class_names``), an annotation
  ``.mat`` with an ``annotations`` struct array (``fname``, ``class`` 1-based), default
  ``devkit/cars_train_annos.mat`` with images in ``cars_train/``; for the test split pass
  ``cars_test_annos_withlabels.mat`` and ``cars_test/``.

Each class gets ``min(k, available)`` images, picked with the seeded per-class sampler of
:mod:`megatron_vrft.data.sampling` over the class's files in sorted order; a listed file that does
not exist is passed over (counted) and the next one taken. Folder names are the class names with
spaces as ``_`` (the reader turns them back); ``class_names.json`` maps folder -> original name.
Images are copied (default) or symlinked (absolute targets).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DataError
from ..sampling import sample_k_shot
from .common import BuildSummary, atomic_dir, dump_json, require_dir, require_file, safe_folder_name

LinkMode = Literal["copy", "symlink"]

FLOWERS102_CLASSES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
)  # fmt: skip
"""Oxford Flowers102 class names, label 1..102 in order (the commonly used public list)."""

_FLOWERS_SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    require_file(path, "MATLAB file")
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as exc:  # scipy raises several types for a bad file
        raise DataError(f"cannot read MATLAB file {path}: {exc}") from exc


def _mat_key(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        raise DataError(f"{path}: no variable '{key}' (has {sorted(k for k in mat if not k.startswith('__'))})")
    return np.atleast_1d(mat[key])


def write_class_folders(
    per_class: Mapping[str, Sequence[Path]],
    out_dir: str | os.PathLike,
    *,
    builder: str,
    k: int,
    seed: int,
    link: LinkMode = "copy",
    overwrite: bool = False,
    summary: BuildSummary | None = None,
) -> BuildSummary:
    """Pick ``k`` files per class (seeded) from ``per_class`` (class name -> candidate files) and
    write them as class folders; the shared last step of every builder here."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if link not in ("copy", "symlink"):
        raise ValueError(f"link must be 'copy' or 'symlink', got {link!r}")
    summary = summary or BuildSummary(builder=builder, output=Path(out_dir))
    folders: dict[str, str] = {}
    for name in sorted(per_class):
        folder = safe_folder_name(name)
        if folder in folders:
            raise DataError(f"classes {folders[folder]!r} and {name!r} map to the same folder {folder!r}")
        folders[folder] = name

    def exists(path: Path) -> bool:
        if path.is_file():
            return True
        summary.skip("missing_image", str(path))
        return False

    groups = {name: sorted(set(files)) for name, files in per_class.items()}
    picked = sample_k_shot(groups, k, seed=seed, accept=exists)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for folder, name in folders.items():
            files = sorted(picked[name])
            if not files:  # no folder: the reader would count an empty one as a skip anyway
                summary.skip("class_without_images", name)
                continue
            if len(files) < k:
                summary.skip("class_below_k", f"{name} ({len(files)}/{k})")
            target = tmp / folder
            target.mkdir()
            for src in files:
                dst = target / src.name
                if dst.exists():
                    raise DataError(f"two images of class {name!r} share the file name {src.name!r}")
                if link == "symlink":
                    dst.symlink_to(src.resolve())
                else:
                    shutil.copyfile(src, dst)
            summary.written[name] = len(files)
        written = {f: n for f, n in folders.items() if summary.written.get(n)}
        (tmp / "class_names.json").write_text(dump_json(written), encoding="utf-8")
    summary.extra.update(k=k, seed=seed, link=link)
    return summary


def build_flowers102(
    root,
    out_dir,
    *,
    k: int,
    seed: int = 0,
    split: str = "train",
    class_names_file=None,
    link: LinkMode = "copy",
    overwrite: bool = False,
) -> BuildSummary:
    """Flowers102 few-shot folders (``split``: train / val / test / all)."""
    root = require_dir(root, "Flowers102 root")
    labels_path, setid_path = root / "imagelabels.mat", root / "setid.mat"
    labels = _mat_key(_loadmat(labels_path), "labels", labels_path).astype(int)
    names = _class_names(class_names_file) if class_names_file is not None else list(FLOWERS102_CLASSES)
    if labels.min() < 1 or labels.max() > len(names):
        raise DataError(
            f"{labels_path}: labels span {labels.min()}..{labels.max()}, but there are {len(names)} class names"
        )
    if split == "all":
        numbers = np.arange(1, len(labels) + 1)
    elif split in _FLOWERS_SPLITS:
        numbers = _mat_key(_loadmat(setid_path), _FLOWERS_SPLITS[split], setid_path).astype(int)
    else:
        raise ValueError(f"split must be one of {[*_FLOWERS_SPLITS, 'all']}, got {split!r}")
    per_class: dict[str, list[Path]] = {n: [] for n in names}
    summary = BuildSummary(builder="flowers102", output=Path(out_dir))
    for num in numbers:
        if not 1 <= num <= len(labels):
            summary.skip("image_number_out_of_range", str(num))
            continue
        per_class[names[labels[num - 1] - 1]].append(root / "jpg" / f"image_{num:05d}.jpg")
    return write_class_folders(
        per_class, out_dir, builder="flowers102", k=k, seed=seed, link=link, overwrite=overwrite, summary=summary
    )


def _class_names(path) -> list[str]:
    path = require_file(path, "class-name file")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names")
    return names


def _list_lines(path: Path) -> list[str]:
    require_file(path, "list file")
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


def build_pets(
    root, out_dir, *, k: int, seed: int = 0, split: str = "trainval", link: LinkMode = "copy", overwrite: bool = False
) -> BuildSummary:
    """Oxford-IIIT Pets few-shot folders (``split``: trainval / test)."""
    root = require_dir(root, "Oxford-IIIT Pets root")
    if split not in ("trainval", "test"):
        raise ValueError(f"split must be 'trainval' or 'test', got {split!r}")
    summary = BuildSummary(builder="pets", output=Path(out_dir))
    per_class: dict[str, list[Path]] = {}
    for line in _list_lines(root / "annotations" / f"{split}.txt"):
        stem = line.split()[0]
        breed, _, number = stem.rpartition("_")
        if not breed or not number.isdigit():
            summary.skip("bad_list_line", line)
            continue
        per_class.setdefault(breed, []).append(root / "images" / f"{stem}.jpg")
    return write_class_folders(
        per_class, out_dir, builder="pets", k=k, seed=seed, link=link, overwrite=overwrite, summary=summary
    )


def build_aircraft(
    root, out_dir, *, k: int, seed: int = 0, split: str = "train", link: LinkMode = "copy", overwrite: bool = False
) -> BuildSummary:
    """FGVC-Aircraft few-shot folders, one class per variant (``split``: train / val / trainval /
    test)."""
    root = require_dir(root, "FGVC-Aircraft root")
    if split not in ("train", "val", "trainval", "test"):
        raise ValueError(f"split must be train, val, trainval or test, got {split!r}")
    summary = BuildSummary(builder="aircraft", output=Path(out_dir))
    per_class: dict[str, list[Path]] = {}
    for line in _list_lines(root / "data" / f"images_variant_{split}.txt"):
        image_id, _, variant = line.partition(" ")
        if not variant.strip():
            summary.skip("bad_list_line", line)
            continue
        per_class.setdefault(variant.strip(), []).append(root / "data" / "images" / f"{image_id}.jpg")
    return write_class_folders(
        per_class, out_dir, builder="aircraft", k=k, seed=seed, link=link, overwrite=overwrite, summary=summary
    )


def build_cars(
    root,
    out_dir,
    *,
    k: int,
    seed: int = 0,
    annos: str = "devkit/cars_train_annos.mat",
    images: str = "cars_train",
    link: LinkMode = "copy",
    overwrite: bool = False,
) -> BuildSummary:
    """Stanford Cars few-shot folders from the devkit ``.mat`` files (module docstring)."""
    root = require_dir(root, "Stanford Cars root")
    meta_path, annos_path = root / "devkit" / "cars_meta.mat", root / annos
    names = [str(n).strip() for n in _mat_key(_loadmat(meta_path), "class_names", meta_path)]
    anns = _mat_key(_loadmat(annos_path), "annotations", annos_path)
    fields = anns.dtype.names or ()
    if "fname" not in fields or "class" not in fields:
        raise DataError(
            f"{annos_path}: 'annotations' has fields {list(fields)}; needs 'fname' and 'class' "
            "(the test split without labels cannot be used)"
        )
    summary = BuildSummary(builder="cars", output=Path(out_dir))
    per_class: dict[str, list[Path]] = {}
    for ann in anns:
        label = int(ann["class"])
        if not 1 <= label <= len(names):
            summary.skip("label_out_of_range", str(ann["fname"]))
            continue
        per_class.setdefault(names[label - 1], []).append(root / images / str(ann["fname"]))
    return write_class_folders(
        per_class, out_dir, builder="cars", k=k, seed=seed, link=link, overwrite=overwrite, summary=summary
    )
