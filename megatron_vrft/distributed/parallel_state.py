"""Set up and tear down megatron-core model-parallel groups; the only module that touches them.

Everything downstream receives a ``ParallelGroups`` value (groups and ranks) instead of reading
megatron's globals, so the model code can be handed other groups later.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from megatron_vrft.distributed.cpu_compat import apply_cpu_compat_patches


@dataclass(kw_only=True, frozen=True)
class ParallelLayout:
    tensor_parallel_size: int = 1
    """Tensor-parallel size (language model)."""
    pipeline_parallel_size: int = 1
    """Pipeline-parallel size (language model; the vision tower lives on stage 0)."""
    virtual_pipeline_parallel_size: int | None = None
    """Interleaved virtual stages per pipeline rank; None for plain 1F1B."""


@dataclass(kw_only=True, frozen=True)
class ParallelGroups:
    tp_group: dist.ProcessGroup
    """Tensor-parallel group of this rank."""
    pp_group: dist.ProcessGroup
    """Pipeline-parallel group of this rank."""
    dp_group: dist.ProcessGroup
    """Data-parallel group of this rank."""
    embedding_group: dist.ProcessGroup | None
    """This rank's first- and last-stage peers (tied-embedding gradients); None outside it."""
    tp_rank: int
    """Rank within ``tp_group``."""
    pp_rank: int
    """Rank within ``pp_group`` (the pipeline stage)."""
    dp_rank: int
    """Rank within ``dp_group``."""
    tp_size: int
    """Size of ``tp_group``."""
    pp_size: int
    """Size of ``pp_group``."""
    dp_size: int
    """Size of ``dp_group``."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def current_parallel_groups() -> ParallelGroups:
    """Snapshot of megatron-core's current groups for this rank."""
    return ParallelGroups(
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        embedding_group=mpu.get_embedding_group() if mpu.is_rank_in_embedding_group() else None,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        dp_size=mpu.get_data_parallel_world_size(),
    )


def pipeline_stage_flags(vp_stage: int | None = None) -> tuple[bool, bool]:
    """``(pre_process, post_process)`` of this rank's model chunk ``vp_stage``.

    Without interleaving (``vp_stage=None``): first / last pipeline stage. With interleaving, only
    virtual chunk 0 of stage 0 pre-processes and only the last chunk of the last stage post-processes.
    """
    return (
        mpu.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        mpu.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
    )


def initialize_model_parallel(layout: ParallelLayout, *, seed: int = 1234) -> ParallelGroups:
    """Create TP/PP/DP groups in the already-initialised ``torch.distributed`` world.

    Applies the CPU patches first when CUDA is absent, and seeds megatron's model-parallel RNG
    tracker (TP ranks get different dropout streams, as in megatron). Re-initialising with another
    layout requires ``destroy_model_parallel()`` first.
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize torch.distributed (e.g. via torchrun) before model parallel")
    apply_cpu_compat_patches()
    world = dist.get_world_size()
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by TP*PP = {tp}*{pp}")
    vpp = layout.virtual_pipeline_parallel_size
    if vpp is not None and pp < 2:
        raise ValueError("virtual pipeline stages need pipeline_parallel_size >= 2")
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    torch.manual_seed(seed)
    return current_parallel_groups()


def destroy_model_parallel() -> None:
    """Tear down megatron-core's groups (the torch.distributed world stays)."""
    mpu.destroy_model_parallel()


def init_distributed(backend: str = "auto", *, world_of_one: bool = False) -> None:
    """Start ``torch.distributed`` for this process: the torchrun world (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` in the environment), or a world of one on a free local port for a plain
    ``python`` run or with ``world_of_one``. ``backend`` 'auto' is nccl with CUDA, gloo without;
    with CUDA the rank's device is ``LOCAL_RANK``. The one process-group start-up of the trainer
    and the tools."""
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ and not world_of_one:
        dist.init_process_group(backend)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


@contextlib.contextmanager
def single_rank_world(layout: ParallelLayout | None = None, *, seed: int = 1234) -> Iterator[ParallelGroups]:
    """A 1-rank gloo world with megatron's groups, for one-process tools and tests.

    Creates the ``torch.distributed`` world unless one exists, replaces any model-parallel state
    left behind, and on exit destroys the groups (and the world, if it created it), so callers
    never see each other's state (pytest-xdist runs unrelated tests in one process).
    """
    created = not dist.is_initialized()
    if created:
        init_distributed("gloo", world_of_one=True)  # even under torchrun
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    try:
        yield initialize_model_parallel(layout or ParallelLayout(), seed=seed)
    finally:
        mpu.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
