"""Seeded DP-sharded prompt batches: disjoint shards covering each global batch, resumable."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_vrft.data.sampler import PromptBatcher, build_epoch_order


def _ranks(dp, **kw):
    return [PromptBatcher(num_records=23, global_batch_size=6, dp_rank=r, dp_size=dp, seed=11, **kw) for r in range(dp)]


def test_shards_partition_each_global_batch_and_epochs_cover_records():
    ranks = _ranks(3)
    assert ranks[0].steps_per_epoch == 3
    seen_epoch0 = []
    for _ in range(3):
        parts = [b.next_indices() for b in ranks]
        assert all(len(p) == 2 for p in parts)
        flat = np.concatenate(parts)
        assert len(set(flat.tolist())) == 6  # disjoint across ranks
        seen_epoch0 += flat.tolist()
    order0 = build_epoch_order(23, seed=11, epoch=0)
    assert seen_epoch0 == order0[:18].tolist()  # the first 3 full global batches, in order
    nxt = np.concatenate([b.next_indices() for b in ranks])  # rolls into epoch 1
    assert ranks[0].epoch == 1
    assert nxt.tolist() == build_epoch_order(23, seed=11, epoch=1)[:6].tolist()
    assert build_epoch_order(23, seed=11, epoch=1).tolist() != order0.tolist()
    assert sorted(order0.tolist()) == list(range(23))


def test_single_rank_equals_union_of_ranks_and_resume_is_exact():
    single = PromptBatcher(num_records=23, global_batch_size=6, dp_rank=0, dp_size=1, seed=11)
    ranks = _ranks(2)
    for _ in range(5):
        assert single.next_indices().tolist() == np.concatenate([b.next_indices() for b in ranks]).tolist()
    state = ranks[1].state_dict()
    expected = [ranks[1].next_indices().tolist() for _ in range(4)]
    fresh = PromptBatcher(num_records=23, global_batch_size=6, dp_rank=1, dp_size=2, seed=11)
    fresh.load_state_dict(state)
    assert [fresh.next_indices().tolist() for _ in range(4)] == expected
    other = PromptBatcher(num_records=23, global_batch_size=6, dp_rank=1, dp_size=2, seed=12)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_validation_and_no_shuffle():
    with pytest.raises(ValueError, match="multiple of dp_size"):
        PromptBatcher(num_records=10, global_batch_size=5, dp_rank=0, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="cannot fill"):
        PromptBatcher(num_records=3, global_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    b = PromptBatcher(num_records=8, global_batch_size=4, dp_rank=1, dp_size=2, seed=0, shuffle=False)
    assert b.next_indices().tolist() == [2, 3] and b.next_indices().tolist() == [6, 7]
