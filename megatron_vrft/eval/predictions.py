"""Predictions files and generating them: one answer per prompt, appended as it goes, resumable.

A predictions file is JSONL, one ``{"source_id": ..., "completion": ...}`` object per line (the
ids of the records the prompts came from). :func:`generate_predictions` asks a rollout engine for
the answers of this rank's share of the examples (example ``i`` goes to rank ``i % world``) in
batches and appends each batch to this rank's file, so a rerun skips the prompts already answered;
with several ranks, :func:`merge_prediction_parts` joins the per-rank files afterwards.

The engine is duck-typed (``generate(examples, sampling, seed=...)`` returning a batch with
``len``, ``prompt_of(i).source_id`` and ``texts``: the rollout engines' protocol), and so are the
examples (``source_id``) and the sampling settings (passed through), so this module stays below
the rollout layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_vrft.storage import atomic_write_bytes

PREDICTIONS_FILE = "predictions.jsonl"


def prediction_part_path(out_dir: str | Path, *, rank: int = 0, world: int = 1) -> Path:
    """The file rank ``rank`` of ``world`` appends to: ``predictions.jsonl`` for one rank, else
    ``predictions.rank{rank}.jsonl`` (merged by :func:`merge_prediction_parts`)."""
    return Path(out_dir) / (f"predictions.rank{rank}.jsonl" if world > 1 else PREDICTIONS_FILE)


def read_predictions(path: str | Path) -> dict[str, str]:
    """``{source_id: completion}`` of a predictions file, in file order. A completion that is not
    a string reads as ``""``. Raises ValueError naming the file and line of a malformed row or of a
    second prediction for the same id."""
    predictions: dict[str, str] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                source_id, completion = str(row["source_id"]), row["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f'{path}:{line_no}: expected {{"source_id", "completion"}}: {exc}') from exc
            if source_id in predictions:
                raise ValueError(f"{path}:{line_no}: duplicate prediction for {source_id!r}")
            predictions[source_id] = completion if isinstance(completion, str) else ""
    return predictions


def _rows(predictions: Iterable[tuple[str, str]]) -> str:
    return "".join(json.dumps({"source_id": k, "completion": v}) + "\n" for k, v in predictions)


def append_predictions(f, predictions: Iterable[tuple[str, str]]) -> None:
    """Append ``(source_id, completion)`` pairs to the open text file ``f`` and flush it (a crash
    loses at most the batch being written)."""
    f.write(_rows(predictions))
    f.flush()


def write_predictions(path: str | Path, predictions: Mapping[str, str]) -> Path:
    """Write ``{source_id: completion}`` as a predictions file (replacing it). Returns ``path``."""
    return atomic_write_bytes(path, _rows(predictions.items()).encode())


def merge_prediction_parts(out_dir: str | Path, world: int) -> Path:
    """Join the per-rank files of ``world`` ranks into ``out_dir/predictions.jsonl`` (rank order;
    an id in two parts keeps the later rank's answer). Call on one rank once every rank has
    finished. Returns the merged file."""
    out_dir = Path(out_dir)
    merged: dict[str, str] = {}
    for rank in range(world):
        merged.update(read_predictions(prediction_part_path(out_dir, rank=rank, world=world)))
    return write_predictions(out_dir / PREDICTIONS_FILE, merged)


def generate_predictions(
    engine: Any,
    examples: Sequence[Any],
    sampling: Any,
    out_dir: str | Path,
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Answers of ``engine`` under ``sampling`` for this rank's share of ``examples`` (those with
    ``index % world == rank``) not already in this rank's file, ``batch_size`` prompts per
    ``generate`` call (seeded ``seed + offset``), each batch appended as it comes. Returns this
    rank's file (:func:`prediction_part_path`); with ``world > 1`` merge the parts afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    part = prediction_part_path(out_dir, rank=rank, world=world)
    done = read_predictions(part) if part.exists() else {}
    todo = [e for i, e in enumerate(examples) if i % world == rank and e.source_id not in done]
    with open(part, "a") as f:
        for start in tqdm(range(0, len(todo), batch_size), desc=f"generate (rank {rank})", disable=not progress):
            batch = engine.generate(todo[start : start + batch_size], sampling, seed=seed + start)
            append_predictions(f, ((batch.prompt_of(i).source_id, batch.texts[i]) for i in range(len(batch))))
    return part
