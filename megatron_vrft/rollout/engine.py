"""Rollout engines chosen by name (``rollout.engine``), and the protocol they share.

An engine turns prompts into a :class:`~megatron_vrft.rollout.types.RolloutBatch` with the current
policy weights: ``update_weights`` takes HF-named full tensors (streamed from the trainer's shards by
``weight_export``), ``sleep`` / ``wake_up`` free and restore accelerator memory between rollouts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from megatron_vrft.data.processing import PreprocessedExample
from megatron_vrft.rollout.types import RolloutBatch, SamplingParams

ENGINE_NAMES = ("hf", "vllm")


class RolloutEngine(Protocol):
    name: str
    num_replicas: int
    """Independent engine replicas over the world (world / the engine's tensor-parallel size);
    each generates its own share of the calls."""
    replica_index: int
    """This rank's replica."""
    reports_samples: bool
    """True on the one rank per replica that returns the replica's samples (its other ranks return
    the same samples)."""

    def generate(self, prompts: Sequence[PreprocessedExample], sampling: SamplingParams, *, seed: int) -> RolloutBatch:
        """``sampling.n`` responses per prompt; ``seed`` seeds the call (same seed on the ranks of one
        engine tensor-parallel group)."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None: ...

    def reset_caches(self) -> None: ...


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM engine cannot run here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "the vllm package is not installed (GPU hosts: bash tools/install.sh gpu; CPU: bash tools/install.sh vllm)"
        )
    return None


def resolve_engine_name(name: str) -> str:
    """``'auto'`` -> ``'vllm'`` with CUDA and vLLM importable, else ``'hf'``; checks availability.

    Raises ``ValueError`` with the reason when the named engine cannot run on this machine.
    """
    if name == "auto":
        return "vllm" if torch.cuda.is_available() and vllm_unavailable_reason() is None else "hf"
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown rollout engine {name!r}; expected one of {ENGINE_NAMES} or 'auto'")
    if name == "vllm":
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise ValueError(f"rollout.engine='vllm' cannot run here: {reason}")
    return name


def build_engine(
    name: str,
    arch: Any,
    *,
    tokenizer: Any,
    blocked_token_ids: Sequence[int],
    device: Any,
    dtype: torch.dtype,
    **vllm_options: Any,
) -> RolloutEngine:
    """The engine ``name`` (already resolved) for ``arch``; weights arrive by ``update_weights``."""
    if name == "hf":
        from megatron_vrft.rollout.hf_engine import HFEngine

        return HFEngine(arch, tokenizer=tokenizer, blocked_token_ids=blocked_token_ids, device=device, dtype=dtype)
    if name == "vllm":
        from megatron_vrft.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(
            arch, tokenizer=tokenizer, blocked_token_ids=blocked_token_ids, device=device, dtype=dtype, **vllm_options
        )
    raise ValueError(f"unknown rollout engine {name!r}")


def vision_token_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """Ids an engine must never sample: image/video/vision special tokens, and embedding rows past
    the tokenizer (vocabulary padding) — an emitted ``<|image_pad|>`` breaks the next training forward."""
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
    ids = [tokenizer.convert_tokens_to_ids(n) for n in names]
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = [i for i in ids if i is not None and i != unk]
    return sorted(set(ids) | set(range(len(tokenizer), vocab_size)))
