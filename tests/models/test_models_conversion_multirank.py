"""The checkpoint format under real model parallelism: one 4-rank launch (TP=2 x PP=2, gloo, CPU).

Each rank builds its ``Qwen2VLPolicy`` stage, loads the converted checkpoint with megatron-core's
``dist_checkpointing.load`` (written with TP=2 chunks by one process; mcore reshards), checks its
parameters against the adapter's shard, then all ranks save with ``dist_checkpointing.save``; one
process exports that TP=2/PP=2 checkpoint to HF, which must equal the original tensors bit for bit.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_models_conversion import read_all, save_tiny_hf  # noqa: E402

TP, PP = 2, 2


def _rank_main(rank: int, world: int, store: str, hf: str, mg: str, saved: str, errors) -> None:
    try:
        import torch.distributed as dist

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        from megatron.core import dist_checkpointing

        from megatron_vrft.distributed.parallel_state import ParallelLayout, initialize_model_parallel
        from megatron_vrft.models.conversion import (
            HfCheckpointReader,
            build_policy_sharded_state_dict,
            write_checkpoint_meta,
        )
        from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy
        from megatron_vrft.models.qwen2_vl.spec import Qwen2VLParallelism, build_layer_spec, build_transformer_config
        from megatron_vrft.models.qwen2_vl.state_dict_adapter import as_arch, hf_to_megatron_shard

        # applies the CPU patches, dist_checkpointing's included
        groups = initialize_model_parallel(ParallelLayout(tensor_parallel_size=TP, pipeline_parallel_size=PP))
        reader = HfCheckpointReader(hf)
        arch = as_arch(reader.config())
        config = build_transformer_config(arch, Qwen2VLParallelism(tensor_parallel_size=TP, pipeline_parallel_size=PP))
        policy = Qwen2VLPolicy(
            arch,
            config,
            pre_process=groups.is_first_stage,
            post_process=groups.is_last_stage,
            layer_spec=build_layer_spec(use_te=False),
        )
        with torch.no_grad():
            for p in policy.parameters():
                p.zero_()
        sharded = build_policy_sharded_state_dict(policy, tp_rank=groups.tp_rank, dp_rank=groups.dp_rank)
        state = dist_checkpointing.load(sharded, mg)
        missing, unexpected = policy.load_state_dict(state, strict=False)
        assert not unexpected and not [m for m in missing if not m.endswith("_extra_state")], (missing, unexpected)
        want = hf_to_megatron_shard(
            reader.get, arch, tp_rank=groups.tp_rank, tp_size=TP, pp_rank=groups.pp_rank, pp_size=PP
        )
        params = dict(policy.named_parameters())
        assert params.keys() == want.keys(), params.keys() ^ want.keys()
        for k, v in want.items():
            assert torch.equal(params[k].detach(), v), (rank, k)
        dist_checkpointing.save(
            build_policy_sharded_state_dict(policy, tp_rank=groups.tp_rank, dp_rank=groups.dp_rank), saved
        )
        if rank == 0:
            write_checkpoint_meta(saved, arch)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # report to the parent; a bare exit code says nothing
        import traceback

        errors.put(f"rank {rank}: {e!r}\n{traceback.format_exc()}")
        raise


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family,tie", [("qwen2_vl", True)])
def test_tp2_pp2_policy_loads_and_saves_the_format(family, tie):
    from megatron_vrft.models.conversion import convert_hf_to_megatron, convert_megatron_to_hf

    with tempfile.TemporaryDirectory() as d:
        hf = os.path.join(d, "hf")
        save_tiny_hf(hf, family, tie=tie, vocab=256)
        mg = os.path.join(d, "mg")
        convert_hf_to_megatron(hf, mg, tp_size=2, progress=False)
        saved = os.path.join(d, "saved")
        os.makedirs(saved)
        ctx = mp.get_context("spawn")
        errors = ctx.SimpleQueue()
        procs = [
            ctx.Process(target=_rank_main, args=(r, TP * PP, os.path.join(d, "store"), hf, mg, saved, errors))
            for r in range(TP * PP)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=400)
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        assert all(p.exitcode == 0 for p in procs) and not messages, "\n".join(messages)
        back = os.path.join(d, "back")
        convert_megatron_to_hf(saved, back, progress=False)
        src, out = read_all(hf), read_all(back)
        assert src.keys() == out.keys()
        assert all(torch.equal(out[k], src[k]) for k in src)
