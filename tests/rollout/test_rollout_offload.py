"""Trainer offload: parameters, DDP gradient buffers and optimizer state leave (storage released)
and come back bit-identical; training after a round trip equals training without one."""

from __future__ import annotations

import torch

from megatron_vrft.data import build_qwen2vl_processor, build_tiny_tokenizer, load_records, preprocess_records
from megatron_vrft.distributed.parallel_state import ParallelLayout, single_rank_world
from megatron_vrft.models.qwen2_vl.build import build_policy, preset_source
from megatron_vrft.rollout.offload import OFFLOAD_KINDS, Offloader, trainer_tensors
from megatron_vrft.trainer.actor import OptimizerSettings, PolicyActor
from megatron_vrft.trainer.batching import build_micro_batches


def _step(actor, mbs):
    def loss_fn(mb, lp, ent):
        return -(lp * mb.response_mask).sum() / mb.response_mask.sum(), {}

    return actor.train_step(mbs, loss_fn, temperature=1.0)


def test_offload_round_trip_is_bit_exact_and_training_continues_identically():
    tok = build_tiny_tokenizer()
    proc = build_qwen2vl_processor(tok, min_pixels=56 * 56, max_pixels=56 * 56)
    prompts, _ = preprocess_records(
        load_records("synthetic", "classification", num_synthetic=2, synthetic_kind="color"), proc
    )
    responses = [torch.tensor(tok.encode("<think>x</think> <answer>red</answer>")) for _ in prompts]
    source = preset_source("qwen2_vl", "tiny", tok, seed=0)
    settings = OptimizerSettings(
        lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99), grad_clip=1.0, warmup_steps=0, total_steps=10
    )
    with single_rank_world() as groups:
        mbs = build_micro_batches(source.arch, prompts, responses, micro_batch_tokens=4096, pad_token_id=0)
        moved = PolicyActor(build_policy(source, ParallelLayout(), groups), groups, settings)
        still = PolicyActor(build_policy(source, ParallelLayout(), groups), groups, settings)
        for actor in (moved, still):
            _step(actor, mbs)
        tensors = trainer_tensors(moved.chunks, moved.optimizer)
        assert all(tensors[k] for k in OFFLOAD_KINDS)  # each kind found something to move
        before = {k: [t.clone() for t in ts] for k, ts in tensors.items()}
        offloader = Offloader(tensors)
        released = offloader.offload(OFFLOAD_KINDS)
        expected = sum(t.untyped_storage().nbytes() for ts in before.values() for t in ts)
        assert released == expected > 0
        assert all(t.untyped_storage().nbytes() == 0 for ts in tensors.values() for t in ts)
        offloader.onload()
        for kind in OFFLOAD_KINDS:
            for a, b in zip(tensors[kind], before[kind]):
                assert torch.equal(a, b), kind
        for actor in (moved, still):
            _step(actor, mbs)
        for (name, a), (_, b) in zip(moved.chunks[0].named_parameters(), still.chunks[0].named_parameters()):
            assert torch.equal(a, b), name
