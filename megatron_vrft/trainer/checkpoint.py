"""Training checkpoints: every rank's state, written atomically, resumed exactly.

Layout of ``output_dir/checkpoints``::

    step_000040/            complete checkpoint (renamed into place only when every rank wrote)
        rank_00000.pt       model chunks, optimizer, LR schedule, reference model, loop state
        meta.json           step, world layout
    step_000050.incomplete/ a write in progress, or one a crash interrupted (ignored, removed)
    latest                  name of the newest complete checkpoint (replaced atomically)

A crash at any point leaves the previous complete checkpoint and ``latest`` intact. Resuming needs
the same world layout (TP, PP, DP); ``tools/convert_checkpoint.py`` converts the model between layouts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vrft.trainer.faults import maybe_crash

INCOMPLETE = ".incomplete"


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / "meta.json").exists():
            return path
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "meta.json").exists())
    return complete[-1] if complete else None


def save_checkpoint(output_dir: str | Path, step: int, state: dict[str, Any], *, layout: dict[str, int],
                    keep: int) -> Path:
    """Write this rank's ``state``; rank 0 publishes the checkpoint once all ranks wrote. Collective."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(output_dir)
    name = f"step_{step:06d}"
    tmp = root / (name + INCOMPLETE)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    buffer_path = tmp / f"rank_{rank:05d}.pt"
    torch.save(state, buffer_path)
    with open(buffer_path, "rb") as f:
        os.fsync(f.fileno())
    _barrier()
    maybe_crash("checkpoint_write", step)
    final = root / name
    if rank == 0:
        meta = {"step": step, "layout": layout, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        _fsync_write(tmp / "meta.json", json.dumps(meta, indent=2).encode())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_write(root / "latest", name.encode())
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(INCOMPLETE))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, *, layout: dict[str, int]) -> dict[str, Any]:
    """This rank's state from a complete checkpoint; raises ``ValueError`` on a layout change."""
    meta = json.loads((path / "meta.json").read_text())
    if meta["layout"] != layout:
        raise ValueError(
            f"checkpoint {path} was written with layout {meta['layout']}, this run has {layout}; "
            "resume with the same parallel layout (or convert the model with tools/convert_checkpoint.py)"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    return torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)


def remove_incomplete(output_dir: str | Path) -> None:
    """Delete checkpoints a crash left half-written (rank 0 only)."""
    for p in checkpoint_root(output_dir).glob("*" + INCOMPLETE):
        shutil.rmtree(p, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
