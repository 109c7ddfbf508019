"""Fault injection for the crash-and-resume tests.

``MEGATRON_VRFT_FAULT="<point>@<step>"`` makes rank 0 kill itself with SIGKILL (as ``kill -9``
would) when it reaches ``point`` at ``step``: ``step`` (mid-step, after the rollout) or
``checkpoint_write`` (every rank's file written, the checkpoint not yet published).
``"nan_loss@<step>"`` makes every rank's loss NaN at that step (the non-finite-gradient test).
Unset in normal runs; reading one environment variable is its only cost.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

FAULT_ENV = "MEGATRON_VRFT_FAULT"


def maybe_crash(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{point}@{step}" and (not dist.is_initialized() or dist.get_rank() == 0):
        os.kill(os.getpid(), signal.SIGKILL)


def fault_active(point: str, step: int) -> bool:
    """``MEGATRON_VRFT_FAULT`` names ``point`` at ``step`` (a fault every rank injects)."""
    return os.environ.get(FAULT_ENV) == f"{point}@{step}"


def poisoned(loss_fn):
    """``loss_fn`` with its loss multiplied by NaN (gradients become NaN; stats stay as they are)."""

    def nan_loss(*args, **kwargs):
        loss, stats = loss_fn(*args, **kwargs)
        return loss * float("nan"), stats

    return nan_loss
