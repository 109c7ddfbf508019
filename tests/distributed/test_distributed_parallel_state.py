"""megatron_vrft.distributed.parallel_state on a 1-rank gloo world (multi-rank: integration tests)."""

import socket

import pytest
import torch.distributed as dist

from megatron_vrft.distributed import parallel_state as ps
from megatron_vrft.distributed.parallel_state import (
    ParallelLayout,
    destroy_model_parallel,
    initialize_model_parallel,
    pipeline_stage_flags,
)


def test_requires_torch_distributed(monkeypatch):
    monkeypatch.setattr(ps.dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        initialize_model_parallel(ParallelLayout())


@pytest.fixture
def world():
    """A bare 1-rank world (no model-parallel groups) unless one exists; torn down afterwards."""
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def test_single_rank_layout(world):
    groups = initialize_model_parallel(ParallelLayout())
    try:
        assert (groups.tp_size, groups.pp_size, groups.dp_size) == (1, 1, 1)
        assert (groups.tp_rank, groups.pp_rank, groups.dp_rank) == (0, 0, 0)
        assert groups.is_first_stage and groups.is_last_stage
        assert groups.embedding_group is not None
        assert pipeline_stage_flags() == (True, True)
    finally:
        destroy_model_parallel()
    # Re-initialisation after destroy works (the integration worker relies on it).
    initialize_model_parallel(ParallelLayout())
    destroy_model_parallel()


def test_single_rank_world_cleans_up():
    from megatron.core import parallel_state as mpu

    from megatron_vrft.distributed.parallel_state import single_rank_world

    was_initialized = dist.is_initialized()
    with single_rank_world(ParallelLayout()) as groups:
        assert mpu.model_parallel_is_initialized() and groups.tp_size == 1
    assert not mpu.model_parallel_is_initialized()
    assert dist.is_initialized() == was_initialized
    # Torn down even when the body raises.
    with pytest.raises(KeyError):
        with single_rank_world():
            raise KeyError("body fails")
    assert not mpu.model_parallel_is_initialized()


def test_rejects_impossible_layouts(world):
    with pytest.raises(ValueError, match="not divisible"):
        initialize_model_parallel(ParallelLayout(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="virtual pipeline"):
        initialize_model_parallel(ParallelLayout(virtual_pipeline_parallel_size=2))
