"""Model checkpoints to generate with: which directory a path names, and what is in it.

A checkpoint is an HF directory (``config.json`` + safetensors, e.g. a run's ``hf_checkpoint/``)
or a Megatron distributed checkpoint (``CHECKPOINT_META_FILE``: a training ``checkpoints/step_N``
or ``tools/convert_checkpoint.py`` output, at any TP/PP); a run's ``checkpoints/`` folder names its
latest complete one through its ``latest`` file. :func:`open_checkpoint` gives the architecture, the
tokenizer *directory* when the checkpoint carries one (loading it is the data layer's job, above
this one), and the weights as a lazy stream of HF-named tensors (what ``engine.update_weights``
takes), one layer in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_vrft.models.conversion import CHECKPOINT_META_FILE

HF_CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True)
class OpenedCheckpoint:
    """What :func:`open_checkpoint` found."""

    path: Path
    """The checkpoint directory (resolved)."""
    kind: str
    """``"hf"`` or ``"megatron"``."""
    arch: Any
    """The architecture (``Qwen2VLArch``)."""
    tokenizer_dir: Path | None
    """The directory holding the checkpoint's tokenizer, or None (a Megatron checkpoint carries
    none: the caller picks one, e.g. the run config's)."""
    weights: Iterator[tuple[str, torch.Tensor]]
    """HF-named tensors, read lazily (one pass)."""


def is_hf_checkpoint(path: Path) -> bool:
    return (Path(path) / HF_CONFIG_FILE).is_file()


def is_megatron_checkpoint(path: Path) -> bool:
    return (Path(path) / CHECKPOINT_META_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself (HF or Megatron), or for a run's
    ``checkpoints/`` folder its latest complete checkpoint (``latest``, followed). Raises
    FileNotFoundError naming ``path`` and what was looked for."""
    path = Path(path)
    if is_hf_checkpoint(path) or is_megatron_checkpoint(path):
        return path
    if (path / LATEST_FILE).is_file():
        return resolve_checkpoint(path / (path / LATEST_FILE).read_text().strip())
    raise FileNotFoundError(
        f"{path}: neither an HF checkpoint ({HF_CONFIG_FILE}) nor a Megatron checkpoint "
        f"({CHECKPOINT_META_FILE}) nor a run's checkpoints/ folder ({LATEST_FILE})"
    )


def open_checkpoint(path: str | Path) -> OpenedCheckpoint:
    """Architecture, tokenizer directory and HF-named weight stream of the checkpoint ``path``
    names (:func:`resolve_checkpoint`). Megatron checkpoints are read at any TP/PP layout."""
    from megatron_vrft.models.conversion import MegatronCheckpointReader
    from megatron_vrft.models.conversion_hf import HfCheckpointReader
    from megatron_vrft.models.qwen2_vl.state_dict_adapter import as_arch

    path = resolve_checkpoint(path)
    if is_hf_checkpoint(path):
        reader = HfCheckpointReader(path)
        has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
        return OpenedCheckpoint(
            path=path,
            kind="hf",
            arch=as_arch(json.loads((path / HF_CONFIG_FILE).read_text())),
            tokenizer_dir=path if has_tokenizer else None,
            weights=((n, reader.get(n)) for n in reader.names()),
        )
    reader = MegatronCheckpointReader(path)  # any TP/PP layout; one layer in memory at a time
    return OpenedCheckpoint(path=path, kind="megatron", arch=reader.arch, tokenizer_dir=None, weights=reader.iter_hf())
