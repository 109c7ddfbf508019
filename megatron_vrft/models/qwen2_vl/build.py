"""Build this rank's sharded Qwen2-VL policy: the one recipe that tests, tools and the trainer call.

Sources of weights (:class:`PolicySource`): an HF checkpoint directory (read lazily, one tensor at
a time, through the state-dict adapter) or a built-in random preset (``presets.py``), materialised
from the same seed on every rank so that all ranks shard the same model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_vrft.distributed.parallel_state import ParallelGroups, ParallelLayout, pipeline_stage_flags
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch, build_qwen2_vl_arch
from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy
from megatron_vrft.models.qwen2_vl.spec import build_layer_spec, build_transformer_config, use_transformer_engine
from megatron_vrft.models.qwen2_vl.state_dict_adapter import HfGetter, hf_to_megatron_shard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class PolicySource:
    """Where a policy's architecture and initial weights come from."""

    arch: Qwen2VLArch
    """Architecture (the HF config inside)."""
    weights: HfGetter
    """HF tensors by hub or in-memory name (a mapping, or a lazy getter)."""
    description: str
    """For logs: the checkpoint path or the preset name."""


def load_hf_source(path: str | Path) -> PolicySource:
    """An HF checkpoint directory (``config.json`` + safetensors), read lazily.

    Raises ``FileNotFoundError`` naming the directory or the missing file.
    """
    from megatron_vrft.models.conversion_hf import HfCheckpointReader
    from megatron_vrft.models.qwen2_vl.state_dict_adapter import as_arch

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model.hf_path {str(path)!r} is not a directory")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"model.hf_path: {config_file} is missing")
    arch = as_arch(json.loads(config_file.read_text()))
    reader = HfCheckpointReader(path)
    return PolicySource(arch=arch, weights=reader.get, description=str(path))


def preset_source(family: str, preset: str, tokenizer: Any, *, seed: int) -> PolicySource:
    """A random preset model (float32), identical on every rank for the same ``seed``."""
    from megatron_vrft.models.qwen2_vl.presets import build_preset_hf_model

    model = build_preset_hf_model(family, preset, tokenizer, seed=seed)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return PolicySource(arch=build_qwen2_vl_arch(model.config), weights=state, description=f"preset {preset!r}")


def build_policy(
    source: PolicySource,
    layout: ParallelLayout,
    groups: ParallelGroups,
    *,
    params_dtype: torch.dtype = torch.float32,
    load_weights: bool = True,
    layer_spec: str = "auto",
) -> list[Qwen2VLPolicy]:
    """This rank's model chunks (one, or ``virtual_pipeline_parallel_size`` when interleaving).

    Chunk ``v`` of pipeline rank ``p`` is virtual stage ``v * pp + p`` of ``pp * vpp`` equal stages
    (megatron-core's layer offset rule), so the adapter's plain split over ``pp * vpp`` stages gives
    its weights. ``load_weights=False`` keeps megatron's own initialisation (shapes only).
    ``layer_spec``: ``"auto"`` (Transformer Engine on a GPU when importable), ``"local"`` or
    ``"transformer_engine"``; each chunk records the adapter naming it uses as ``adapter_layer_spec``.
    """
    arch = source.arch
    tp, pp, vpp = layout.tensor_parallel_size, layout.pipeline_parallel_size, layout.virtual_pipeline_parallel_size
    _check_divisible(arch, tp)
    tconfig = build_transformer_config(arch, layout, params_dtype=params_dtype)
    use_te = use_transformer_engine() if layer_spec == "auto" else layer_spec == "transformer_engine"
    adapter_spec = "te" if use_te else "local"
    chunks = []
    for v in range(vpp or 1):
        vp_stage = None if vpp is None else v
        pre, post = pipeline_stage_flags(vp_stage)
        policy = Qwen2VLPolicy(
            arch,
            tconfig,
            pre_process=pre,
            post_process=post,
            vp_stage=vp_stage,
            layer_spec=build_layer_spec(use_te=use_te),
        )
        policy.adapter_layer_spec = adapter_spec
        if load_weights:
            stage = groups.pp_rank if vpp is None else v * pp + groups.pp_rank
            shard = hf_to_megatron_shard(
                source.weights,
                arch,
                tp_rank=groups.tp_rank,
                tp_size=tp,
                pp_rank=stage,
                pp_size=pp * (vpp or 1),
                layer_spec=adapter_spec,
            )
            policy.load_shard({k: t.to(params_dtype) for k, t in shard.items()})
        chunks.append(policy.to(params_dtype))
    return chunks


def _check_divisible(arch: Qwen2VLArch, tp: int) -> None:
    """Name the field that stops ``arch`` from splitting over ``tp`` ranks."""
    checks = {
        "num_attention_heads": arch.num_attention_heads,
        "intermediate_size": arch.intermediate_size,
        "vocab_size": arch.vocab_size,
    }
    for name, value in checks.items():
        if value % tp:
            raise ValueError(f"model {name}={value} is not divisible by tensor_parallel_size={tp}")
    kv = arch.num_key_value_heads
    if kv % tp and tp % kv:
        raise ValueError(f"model num_key_value_heads={kv} and tensor_parallel_size={tp}: neither divides the other")
