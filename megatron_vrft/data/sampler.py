"""Seeded, data-parallel-sharded prompt order with resumable state.

Every rank builds the same permutation of the records for an epoch (seeded by ``(seed, epoch)``),
cuts it into global batches of ``global_batch_size`` prompts and takes its contiguous slice of
``global_batch_size / dp_size`` prompts from each. A short last batch is dropped so every rank
runs the same number of steps. ``state_dict`` / ``load_state_dict`` resume mid-epoch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def build_epoch_order(num_records: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """``(num_records,)`` int64 record indices for ``epoch``: a permutation seeded by
    ``(seed, epoch)`` or ``arange`` when not shuffling."""
    if num_records < 1:
        raise ValueError(f"num_records must be >= 1, got {num_records}")
    if not shuffle:
        return np.arange(num_records, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_records).astype(np.int64)


def dp_shard(num_items: int, *, dp_rank: int, dp_size: int) -> slice:
    """This data-parallel rank's contiguous share of ``num_items`` (a multiple of ``dp_size``):
    the one definition of DP sharding, for prompts and for the groups of a rollout."""
    if num_items % dp_size:
        raise ValueError(f"{num_items} items do not split evenly over {dp_size} data-parallel ranks")
    per_rank = num_items // dp_size
    return slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)


@dataclass(kw_only=True)
class PromptBatcher:
    """Yields this rank's record indices, one step (global batch) at a time."""

    num_records: int
    """Records in the dataset."""
    global_batch_size: int
    """Prompts per optimizer step over all data-parallel ranks; a multiple of ``dp_size``."""
    dp_rank: int
    """This rank's data-parallel index."""
    dp_size: int
    """Data-parallel world size."""
    seed: int
    """Shuffling seed (same on every rank)."""
    shuffle: bool = True
    """Shuffle each epoch; False keeps record order (evaluation)."""
    epoch: int = 0
    """Current epoch (state)."""
    step_in_epoch: int = 0
    """Global batches already taken in the current epoch (state)."""

    def __post_init__(self) -> None:
        if self.dp_size < 1 or not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"bad dp_rank {self.dp_rank} / dp_size {self.dp_size}")
        if self.global_batch_size < 1 or self.global_batch_size % self.dp_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be a positive multiple of dp_size {self.dp_size}"
            )
        if self.num_records < self.global_batch_size:
            raise ValueError(f"{self.num_records} records cannot fill one global batch of {self.global_batch_size}")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_records // self.global_batch_size

    def next_indices(self) -> np.ndarray:
        """``(global_batch_size / dp_size,)`` int64 record indices of this rank for the next step."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        order = build_epoch_order(self.num_records, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        start = self.step_in_epoch * self.global_batch_size
        self.step_in_epoch += 1
        batch = order[start : start + self.global_batch_size]
        return batch[dp_shard(self.global_batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"resuming with seed {self.seed}, checkpoint has {state['seed']}")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
