"""Language-model inputs for Qwen2-VL: 3-D M-RoPE positions and attention masks (padded or packed).

Positions come from transformers' own ``get_rope_index`` (Qwen2VLModel / Qwen2_5_VLModel), called
on a stand-in ``self`` that carries only the config, so the index logic is never re-implemented.

Masks follow megatron-core's convention: boolean ``(B, 1, S, S)``, True = masked out.

Packed sequences: megatron-core's local (non-TE) attention rejects ``PackedSeqParams``, so on CPU a
packed row ``(1, T)`` is run as one sequence whose mask is causal *and* block-diagonal over the
packed segments (no token attends across a sequence boundary); positions restart per segment.
With Transformer Engine the same ``cu_seqlens`` go into ``PackedSeqParams`` (``qkv_format="thd"``).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch, hf_classes
from megatron_vrft.models.qwen2_vl.spec import use_transformer_engine

IMAGE_TOKEN_TYPE = 1
"""``mm_token_type_ids`` value of image placeholder tokens (0 text, 1 image, 2 video)."""


def compute_mm_token_type_ids(arch: Qwen2VLArch, input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` int: 1 at image placeholders, 2 at video placeholders, 0 elsewhere."""
    types_ = torch.zeros_like(input_ids, dtype=torch.int32)
    types_[input_ids == arch.image_token_id] = IMAGE_TOKEN_TYPE
    types_[input_ids == arch.video_token_id] = 2
    return types_


def compute_mrope_position_ids(
    arch: Qwen2VLArch,
    input_ids: torch.Tensor,
    *,
    image_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """3-D M-RoPE positions ``(3, B, S)`` via transformers' ``get_rope_index``.

    ``input_ids`` ``(B, S)``; ``image_grid_thw`` ``(num_images, 3)`` in batch order;
    ``attention_mask`` ``(B, S)`` 1 = real token (padding gets position 0, as in HF).
    Text-only rows get ``arange`` positions over their real tokens on all three axes.
    """
    if bool((input_ids == arch.video_token_id).any()):
        raise ValueError(f"input_ids contain video placeholders (id {arch.video_token_id}); video is not supported")
    if mm_token_type_ids is None:
        mm_token_type_ids = compute_mm_token_type_ids(arch, input_ids)
    cls = hf_classes(arch.family).model
    shim = types.SimpleNamespace(config=arch.hf_config)
    shim.get_vision_position_ids = partial(cls.get_vision_position_ids, shim)
    position_ids, _ = cls.get_rope_index(
        shim,
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )
    return position_ids


def build_padded_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` 1 = token, 0 = padding -> ``(B, 1, S, S)`` bool, True = masked (causal + pads)."""
    seq_len = attention_mask.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).triu(1)
    pad_keys = ~attention_mask.bool()[:, None, None, :]
    return causal[None, None] | pad_keys


def build_packed_attention_mask(cu_seqlens: torch.Tensor, total_len: int | None = None) -> torch.Tensor:
    """``cu_seqlens`` ``(N + 1,)`` -> ``(1, 1, T, T)`` bool: causal within each segment only.

    Positions past ``cu_seqlens[-1]`` (padding up to ``total_len``) form their own segment.
    """
    cu = cu_seqlens.to(torch.long)
    total = int(cu[-1]) if total_len is None else total_len
    idx = torch.arange(total, device=cu.device)
    segment = torch.bucketize(idx, cu[1:], right=True)
    same = segment[:, None] == segment[None, :]
    causal = idx[None, :] <= idx[:, None]
    return ~(same & causal)[None, None]


def build_packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """megatron-core ``PackedSeqParams`` (THD) for Transformer Engine attention."""
    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def pack_sequences(
    arch: Qwen2VLArch,
    sequences: list[torch.Tensor],
    image_grid_thw: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack 1-D token sequences into one row.

    ``sequences[i]`` ``(S_i,)``; ``image_grid_thw[i]`` ``(n_i, 3)`` or None for sequence i's images.
    Returns ``input_ids (1, T)``, ``position_ids (3, 1, T)`` (M-RoPE restarting per sequence) and
    ``cu_seqlens (N + 1,)`` int32. Pixel values of all images are simply concatenated in order.
    """
    if len(sequences) != len(image_grid_thw):
        raise ValueError("one image_grid_thw entry (or None) per packed sequence")
    positions = [
        compute_mrope_position_ids(arch, seq[None], image_grid_thw=grid)[:, 0]
        for seq, grid in zip(sequences, image_grid_thw)
    ]
    lengths = torch.tensor([0] + [len(s) for s in sequences])
    cu_seqlens = lengths.cumsum(0).to(torch.int32)
    return torch.cat(sequences)[None], torch.cat(positions, dim=1)[:, None], cu_seqlens


@dataclass(kw_only=True)
class PolicyInputs:
    """Everything ``Qwen2VLPolicy.forward`` needs for one micro-batch."""

    input_ids: torch.Tensor
    """Token ids ``(B, S)`` (``B = 1`` when packed)."""
    position_ids: torch.Tensor
    """M-RoPE positions ``(3, B, S)``."""
    attention_mask: torch.Tensor | None
    """``(B, 1, S, S)`` bool, True = masked; None with ``packed_seq_params`` (THD) or plain causal."""
    packed_seq_params: PackedSeqParams | None = None
    """THD packing for Transformer Engine attention; None otherwise."""
    pixel_values: torch.Tensor | None = None
    """Flattened patches ``(num_patches, C*T*P*P)`` of all images, in order."""
    image_grid_thw: torch.Tensor | None = None
    """``(num_images, 3)`` patch grids, in order."""

    def forward_kwargs(self) -> dict:
        return dict(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            attention_mask=self.attention_mask,
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
            packed_seq_params=self.packed_seq_params,
        )


def build_padded_inputs(
    arch: Qwen2VLArch,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    *,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> PolicyInputs:
    """Padded batch ``(B, S)`` (``pad_mask`` 1 = token, left or right padding)."""
    return PolicyInputs(
        input_ids=input_ids,
        position_ids=compute_mrope_position_ids(
            arch, input_ids, image_grid_thw=image_grid_thw, attention_mask=pad_mask
        ),
        attention_mask=build_padded_attention_mask(pad_mask),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
    )


def build_packed_inputs(
    arch: Qwen2VLArch,
    sequences: list[torch.Tensor],
    image_grid_thw: list[torch.Tensor | None],
    *,
    pixel_values: torch.Tensor | None = None,
    use_thd: bool | None = None,
) -> tuple[PolicyInputs, torch.Tensor]:
    """Pack sequences into one row; returns the inputs and ``cu_seqlens`` ``(N + 1,)``.

    ``use_thd`` (default: when Transformer Engine layers are in use) selects ``PackedSeqParams``;
    otherwise the block-diagonal causal mask (megatron-core's local attention has no THD path).
    """
    if use_thd is None:
        use_thd = use_transformer_engine()
    input_ids, position_ids, cu_seqlens = pack_sequences(arch, sequences, image_grid_thw)
    grids = [g for g in image_grid_thw if g is not None]
    return (
        PolicyInputs(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=None if use_thd else build_packed_attention_mask(cu_seqlens),
            packed_seq_params=build_packed_seq_params(cu_seqlens) if use_thd else None,
            pixel_values=pixel_values,
            image_grid_thw=torch.cat(grids) if grids else None,
        ),
        cu_seqlens,
    )
