"""Training checkpoints: megatron-core distributed checkpoints, written atomically, resumed exactly,
loadable at another parallel layout.

Layout of ``output_dir/checkpoints``::

    step_000040/                   complete checkpoint (renamed into place once every rank wrote)
        *.distcp, metadata.json,   megatron-core ``dist_checkpointing`` (torch_dist): model, optimizer
        common.pt                  and reference model sharded by tensor; LR schedule, prompt iterator,
                                   step (common); RNG states (one object per rank)
        megatron_vrft_checkpoint.json   HF config + vocabulary padding: the directory is also a model
                                   checkpoint (tools/convert_checkpoint.py, tools/evaluate.py read it)
        train_state.json           step and the parallel layout that wrote it
    step_000050.incomplete/        a write in progress, or one a crash interrupted (ignored, removed)
    latest                         name of the newest complete checkpoint (replaced atomically)

A crash at any point leaves the previous complete checkpoint and ``latest`` intact. Tensors are
stored by their global (layout-independent) keys, so a run resumes at any TP/PP/DP: model and
optimizer state are resharded by megatron-core; only the per-rank RNG states need the same layout
(at another layout they are re-seeded, logged). The trainer states to save and load come from
:mod:`megatron_vrft.trainer.loop`; this module knows files and atomicity only.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_vrft.storage import atomic_write_bytes
from megatron_vrft.trainer.faults import maybe_crash

logger = logging.getLogger(__name__)

INCOMPLETE = ".incomplete"
TRAIN_STATE_FILE = "train_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / TRAIN_STATE_FILE).exists():
            return path
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / TRAIN_STATE_FILE).exists())
    if not complete and any(p.is_dir() and not p.name.endswith(INCOMPLETE) for p in root.glob("step_*")):
        logger.warning(
            "%s holds checkpoints without %s (an older format): not resumable, starting afresh", root, TRAIN_STATE_FILE
        )
    return complete[-1] if complete else None


def read_train_state(path: Path) -> dict[str, Any]:
    """``{"step", "layout"}`` of a complete checkpoint."""
    return json.loads((path / TRAIN_STATE_FILE).read_text())


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    sharded_state: dict[str, Any],
    *,
    layout: dict[str, int],
    keep: int,
    describe: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``sharded_state`` (a megatron-core sharded state dict) as checkpoint ``step``. Collective.

    Every rank writes its shards into ``step_N.incomplete``; rank 0 then adds the sidecars
    (``describe(dir)``, the train state) and publishes by renaming, then moves ``latest`` and
    removes all but the newest ``keep`` checkpoints.
    """
    from megatron.core import dist_checkpointing

    _use_in_process_results_queue()
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(output_dir)
    name = f"step_{step:06d}"
    tmp = root / (name + INCOMPLETE)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded_state, str(tmp))  # fsyncs its files; returns when all ranks wrote
    _barrier()
    maybe_crash("checkpoint_write", step)
    final = root / name
    if rank == 0:
        if describe is not None:
            describe(tmp)
        atomic_write_bytes(tmp / TRAIN_STATE_FILE, json.dumps({"step": step, "layout": layout}, indent=2).encode())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_bytes(root / "latest", name.encode())
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(INCOMPLETE))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, sharded_state: dict[str, Any]) -> dict[str, Any]:
    """Fill ``sharded_state`` (built for loading, at this run's layout) from checkpoint ``path``;
    returns the state dict with tensors and objects in place of their sharded descriptions."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state, str(path))


def remove_incomplete(output_dir: str | Path) -> None:
    """Delete checkpoints a crash left half-written (rank 0 only)."""
    for p in checkpoint_root(output_dir).glob("*" + INCOMPLETE):
        shutil.rmtree(p, ignore_errors=True)


def _use_in_process_results_queue() -> None:
    """megatron-core's torch_dist writer reports through a queue served by a *spawned*
    multiprocessing Manager process, created on the first save. That process outlives a trainer
    killed with SIGKILL (a node failure, an OOM kill) and keeps the job's stdout open, so the
    launcher never sees the job end. A synchronous save produces and consumes the results in this
    process: a plain queue serves, and nothing outlives the trainer."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
