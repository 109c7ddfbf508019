"""Seeded k-shot sampling per class / category.

Each class draws from its own generator seeded by ``(seed, class key)``, so a class's pick does not
change when other classes are added or removed, and the same seed always gives the same pick
(Python's ``random.Random`` seeded with a string is stable across processes and versions).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def seeded_permutation(items: Sequence[T], *, seed: int, key: Hashable) -> list[T]:
    """``items`` in a random order determined by ``(seed, key)`` only."""
    rng = random.Random(f"{int(seed)}/{key}")
    out = list(items)
    rng.shuffle(out)
    return out


def sample_k_shot(
    groups: Mapping[Hashable, Sequence[T]],
    k: int,
    *,
    seed: int,
    accept: Callable[[T], bool] | None = None,
) -> dict[Hashable, list[T]]:
    """Pick ``k`` items per group (all when a group has fewer acceptable items).

    Args:
        groups: class key -> candidate items in a deterministic order (e.g. sorted ids).
        k: items per group, ``>= 1``.
        seed: the sampling seed.
        accept: optional check; rejected candidates (e.g. an unreadable image under a skip policy)
            are passed over and the next candidate of the seeded order is taken instead, so a
            group still gets ``k`` when ``k`` acceptable items exist.

    Returns:
        class key -> picked items, in the seeded order.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    picked: dict[Hashable, list[T]] = {}
    for key, items in groups.items():
        chosen: list[T] = []
        for item in seeded_permutation(items, seed=seed, key=key):
            if len(chosen) == k:
                break
            if accept is None or accept(item):
                chosen.append(item)
        picked[key] = chosen
    return picked
