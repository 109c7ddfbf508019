"""Typed architecture description of a Qwen2-VL / Qwen2.5-VL checkpoint, built from its HF config.

transformers 5.x keeps the language-model fields in ``config.text_config`` (``Qwen2VLTextConfig``)
and the tie flag on the top-level config; older layouts kept them flat. ``build_qwen2_vl_arch``
reads either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

ModelFamily = Literal["qwen2_vl", "qwen2_5_vl"]
SUPPORTED_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class HFClasses:
    """The transformers classes of one model family."""

    config: type
    """``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``."""
    model: type
    """The backbone (``Qwen2VLModel`` / ``Qwen2_5_VLModel``: its ``get_rope_index`` gives M-RoPE positions)."""
    for_generation: type
    """``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``."""


def hf_classes(family: str) -> HFClasses:
    """The transformers classes of ``family`` ("qwen2_vl" or "qwen2_5_vl"); the one place that
    chooses between the two."""
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        return HFClasses(config=Qwen2VLConfig, model=Qwen2VLModel, for_generation=Qwen2VLForConditionalGeneration)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        return HFClasses(
            config=Qwen2_5_VLConfig, model=Qwen2_5_VLModel, for_generation=Qwen2_5_VLForConditionalGeneration
        )
    raise ValueError(f"unknown model family {family!r}; expected one of {SUPPORTED_FAMILIES}")


# HF's default when a config carries no mrope_section (Qwen2VLRotaryEmbedding does the same).
_DEFAULT_MROPE_SECTION = (16, 24, 24)


@dataclass(kw_only=True, frozen=True)
class Qwen2VLArch:
    family: ModelFamily
    """Model family name: "qwen2_vl" or "qwen2_5_vl"."""
    vocab_size: int
    """Vocabulary size of the embedding / output layer (unpadded)."""
    hidden_size: int
    """Language-model hidden size."""
    intermediate_size: int
    """SwiGLU inner size (per gate/up half)."""
    num_layers: int
    """Number of language-model decoder layers."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """Key/value heads (GQA query groups)."""
    head_dim: int
    """Per-head channel count (``hidden_size // num_attention_heads`` for Qwen2-VL)."""
    rms_norm_eps: float
    """RMSNorm epsilon of the language model."""
    rope_theta: float
    """RoPE base of the language model."""
    mrope_section: tuple[int, int, int]
    """Rotary half-dim channels given to the temporal, height and width positions (sum = head_dim/2)."""
    tie_word_embeddings: bool
    """Whether the output layer shares the input embedding matrix."""
    max_position_embeddings: int
    """Maximum sequence length the language model is configured for."""
    image_token_id: int
    """Id of the ``<|image_pad|>`` placeholder token."""
    video_token_id: int
    """Id of the ``<|video_pad|>`` placeholder token."""
    spatial_merge_size: int
    """Vision patch merge factor (2x2 patches -> one language token)."""
    hf_config: Any
    """The transformers config it came from (``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``); the vision
    tower and HF's ``get_rope_index`` are built from it."""


def _family_of(hf_config: Any) -> ModelFamily:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported families: {SUPPORTED_FAMILIES}")
    return model_type


def build_qwen2_vl_arch(hf_config: Any) -> Qwen2VLArch:
    """Read a transformers ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` into a ``Qwen2VLArch``."""
    family = _family_of(hf_config)
    text = getattr(hf_config, "text_config", None) or hf_config
    rope = dict(getattr(text, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"unsupported rope_type {rope_type!r} (only default M-RoPE scaling)")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    mrope_section = tuple(rope.get("mrope_section", _DEFAULT_MROPE_SECTION))
    if len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope_section} must have 3 entries summing to head_dim/2={head_dim // 2}")
    tie = getattr(hf_config, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(text, "tie_word_embeddings", False)
    return Qwen2VLArch(
        family=family,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=head_dim,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
        mrope_section=mrope_section,
        tie_word_embeddings=bool(tie),
        max_position_embeddings=text.max_position_embeddings,
        image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        spatial_merge_size=hf_config.vision_config.spatial_merge_size,
        hf_config=hf_config,
    )
