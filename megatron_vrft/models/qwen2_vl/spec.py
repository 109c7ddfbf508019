"""megatron-core config and layer spec for the Qwen2-VL language model: the one place choosing TE vs local.

Qwen2 decoder layer = pre-RMSNorm GQA attention with QKV bias and no output bias + pre-RMSNorm
SwiGLU MLP without biases; M-RoPE on q/k. In megatron-core terms: ``add_qkv_bias=True``,
``add_bias_linear=False``, ``gated_linear_unit=True`` with SiLU, ``normalization="RMSNorm"``,
``position_embedding_type="mrope"``.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vrft.distributed.parallel_state import ParallelLayout
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch

# The language model's TP / PP / virtual stages are the process layout's: one dataclass for both.
Qwen2VLParallelism = ParallelLayout


def use_transformer_engine() -> bool:
    """TE layers when a GPU and transformer_engine are both present; local layers otherwise."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def build_layer_spec(*, use_te: bool | None = None) -> ModuleSpec:
    """The decoder-layer ``ModuleSpec`` (TE fused norm+linear, or megatron-core local modules)."""
    if use_te is None:
        use_te = use_transformer_engine()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_transformer_config(
    arch: Qwen2VLArch,
    parallelism: ParallelLayout,
    *,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool | None = None,
    variable_seq_lengths: bool | None = None,
) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` equivalent to the HF text config.

    ``variable_seq_lengths`` (default: True without virtual stages, False with them): micro-batches
    of different ``(S, B)`` through the pipeline, shapes exchanged before every p2p transfer. With
    interleaved virtual stages megatron-core 0.16.1 crosses the exchanged shapes when the pipeline
    group has size 2 (prev and next are the same peer; Megatron-LM issue #5100 / PR #5271), so
    interleaving runs with fixed ``(seq_length, micro_batch_size)`` micro-batches and asking for
    both raises. The same same-peer pairing crosses the *activations and gradients* exchanged in
    one batched ``batch_isend_irecv`` during the interleaved steady state (measured here: wrong
    logits from the third micro-batch on at PP=2, VPP=2), so interleaving uses the unbatched p2p
    path, which orders sends/receives by rank parity and, for a 2-rank pipeline, separates the two
    directions onto different groups.
    """
    vpp = parallelism.virtual_pipeline_parallel_size
    if variable_seq_lengths is None:
        variable_seq_lengths = vpp is None
    if variable_seq_lengths and vpp is not None:
        raise ValueError(
            "variable_seq_lengths with interleaved virtual pipeline stages is broken in "
            "megatron-core 0.16.1 (shapes crossed at PP=2); pad micro-batches to one shape"
        )
    on_gpu = torch.cuda.is_available()
    if use_cpu_initialization is None:
        use_cpu_initialization = not on_gpu
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=list(arch.mrope_section),
        tensor_model_parallel_size=parallelism.tensor_parallel_size,
        pipeline_model_parallel_size=parallelism.pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        # Fused kernels need CUDA (and apex/TE); the unfused paths are exact.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        attention_softmax_in_fp32=True,
        # megatron-core's config validation only accepts variable_seq_lengths with the all-to-all
        # dispatcher (no MoE here).
        variable_seq_lengths=variable_seq_lengths,
        batch_p2p_comm=vpp is None,
        moe_token_dispatcher_type="alltoall",
    )
