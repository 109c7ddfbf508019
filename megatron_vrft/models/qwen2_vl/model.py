"""Qwen2-VL / Qwen2.5-VL policy: HF vision tower + megatron-core ``GPTModel`` language model.

Parameter naming contract (shared with ``state_dict_adapter.py``)
------------------------------------------------------------------
``Qwen2VLPolicy(nn.Module)`` has exactly two child modules:

``vision``
    The transformers vision tower (``Qwen2VisionTransformerPretrainedModel`` /
    ``Qwen2_5_VisionTransformerPretrainedModel``), unmodified. Its parameter names are the HF hub
    names ``visual.*`` with the ``visual.`` prefix removed (e.g. ``blocks.0.attn.qkv.weight``,
    ``merger.mlp.0.weight``). Present only on pipeline stage 0 (``pp_rank == 0``); the attribute is
    ``None`` on other stages. Replicated (full, unsharded tensors) on every TP rank.

``language_model``
    A megatron-core ``GPTModel`` with the standard mcore parameter names, sharded over TP:
    ``embedding.word_embeddings.weight`` (stage 0 only; vocab-parallel, rows
    ``[tp_rank*V/tp, (tp_rank+1)*V/tp)`` of the padded vocabulary),
    ``decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}`` (column-parallel, mcore's
    grouped QKV layout: per query group ``[q heads of the group, k, v]``),
    ``decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight`` (TE spec) or
    ``decoder.layers.{i}.input_layernorm.weight`` (local spec),
    ``decoder.layers.{i}.self_attention.linear_proj.weight`` (row-parallel, no bias),
    ``decoder.layers.{i}.mlp.linear_fc1.weight`` (column-parallel, ``[gate_shard; up_shard]``),
    ``decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight`` (TE) or
    ``decoder.layers.{i}.pre_mlp_layernorm.weight`` (local),
    ``decoder.layers.{i}.mlp.linear_fc2.weight`` (row-parallel),
    ``decoder.final_layernorm.weight`` (last stage),
    ``output_layer.weight`` (last stage; vocab-parallel; absent when embeddings are tied and
    PP == 1, in which case the last stage reuses ``embedding.word_embeddings.weight``).
    Layer indices ``i`` are LOCAL to the stage: ``0 .. num_layers_on_stage - 1``; the global index
    is ``pp_rank * (num_layers // pp_size) + i`` (even split). With ``V`` interleaved virtual
    stages, model chunk ``v`` of pipeline rank ``p`` is virtual stage ``v * pp_size + p`` of
    ``pp_size * V`` equal stages (megatron-core's layer offset rule), i.e. the adapter's plain split
    over ``pp_size * V`` stages; only chunk 0 of rank 0 has ``vision`` and the embedding.

No vocabulary padding: ``vocab_size`` must be divisible by TP (a padded logit column would enter
every softmax).

Attention masks (``forward(attention_mask=...)``, boolean ``(B, 1, S, S)``, True = masked) are
honoured by megatron-core's local attention (the CPU path). Transformer Engine attention runs with
its own causal mask type: on a GPU, pack sequences with ``PackedSeqParams`` (``inputs.py``) rather
than padding inside a row.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch
from megatron_vrft.models.qwen2_vl.spec import build_layer_spec


def build_vision_tower(arch: Qwen2VLArch) -> nn.Module:
    """The transformers vision tower of ``arch.family`` (window attention etc. for Qwen2.5-VL)."""
    if arch.family == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel as Vision,
        )
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Vision,
        )
    return Vision._from_config(arch.hf_config.vision_config)


class Qwen2VLPolicy(nn.Module):
    """One pipeline stage (or the whole model) of Qwen2-VL: see the naming contract above.

    Args:
        arch: architecture read from the HF config.
        config: megatron-core config (``spec.build_transformer_config``).
        pre_process: first pipeline stage (embedding + vision tower).
        post_process: last pipeline stage (final norm + vocab-parallel output layer).
        layer_spec: decoder-layer spec; default ``spec.build_layer_spec()`` (TE on GPU, else local).
        vp_stage: virtual pipeline stage index when interleaving.
    """

    def __init__(
        self,
        arch: Qwen2VLArch,
        config: TransformerConfig,
        *,
        pre_process: bool,
        post_process: bool,
        layer_spec: ModuleSpec | None = None,
        vp_stage: int | None = None,
    ) -> None:
        super().__init__()
        tp = config.tensor_model_parallel_size
        if arch.vocab_size % tp != 0:
            # No vocabulary padding: padded logit columns would change every softmax.
            raise ValueError(f"vocab_size {arch.vocab_size} must be divisible by TP size {tp}")
        self.arch = arch
        self.config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        # megatron-core's schedules read ``model_type`` and ``config`` off the model they are given.
        self.model_type = ModelType.encoder_or_decoder
        # The vision tower sits with the embedding: on the first stage only (its first virtual
        # stage when interleaving, the only chunk built with pre_process=True).
        self.vision = build_vision_tower(arch) if pre_process else None
        rotary_base = int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec if layer_spec is not None else build_layer_spec(),
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=rotary_base,
            vp_stage=vp_stage,
        )
        if self.vision is not None:
            # transformers builds on the CPU; follow the language model (on the GPU unless
            # use_cpu_initialization). The dtype stays the vision config's: mixed-precision
            # wrappers (megatron's Float16Module) cast the whole policy.
            self.vision.to(device=next(self.language_model.parameters()).device)

    def load_shard(self, shard: Mapping[str, torch.Tensor]) -> None:
        """Copy a full shard (e.g. ``state_dict_adapter.hf_to_megatron_shard``) into the parameters.

        Names must match exactly in both directions; raises ``KeyError`` listing the differences,
        ``ValueError`` naming a shape mismatch.
        """
        params = dict(self.named_parameters())
        missing, unexpected = sorted(set(params) - set(shard)), sorted(set(shard) - set(params))
        if missing or unexpected:
            raise KeyError(f"shard does not match the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, param in params.items():
                value = shard[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{name}: shard shape {tuple(value.shape)} != parameter {tuple(param.shape)}")
                param.copy_(value)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations in here."""
        self.language_model.set_input_tensor(input_tensor)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features scattered into ``<|image_pad|>`` positions.

        ``input_ids`` ``(B, S)``; ``pixel_values`` ``(num_patches, C*T*P*P)``;
        ``image_grid_thw`` ``(num_images, 3)``. Returns ``(S, B, H)`` (megatron layout), full
        (not TP-sharded) on every TP rank.
        """
        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        if pixel_values is None:
            return embeds
        if self.vision is None:
            raise ValueError("pixel_values given to a pipeline stage without the vision tower")
        vision_dtype = next(self.vision.parameters()).dtype
        image_embeds = self.vision(pixel_values.to(vision_dtype), grid_thw=image_grid_thw).pooler_output
        image_mask = input_ids == self.arch.image_token_id
        num_slots = int(image_mask.sum())
        if num_slots != image_embeds.shape[0]:
            raise ValueError(
                f"{num_slots} <|image_pad|> tokens (id {self.arch.image_token_id}) in input_ids but "
                f"the vision tower produced {image_embeds.shape[0]} image features"
            )
        # Scatter in (B, S) row-major order, the order the vision tower emits images in.
        embeds_bsh = embeds.transpose(0, 1)
        embeds_bsh = embeds_bsh.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))
        return embeds_bsh.transpose(0, 1).contiguous()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Run this stage.

        ``input_ids`` ``(B, S)``; ``position_ids`` ``(3, B, S)`` (``inputs.compute_mrope_position_ids``);
        ``attention_mask`` ``(B, 1, S, S)`` bool True = masked, or None for plain causal.
        Returns the vocab-parallel logits ``(B, S, V / TP)`` on the last stage, the hidden states
        ``(S, B, H)`` for the next stage otherwise.
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
        )
