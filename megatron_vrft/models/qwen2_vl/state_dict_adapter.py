"""HF <-> Megatron state-dict adapter for the Qwen2-VL / Qwen2.5-VL family: the one name map.

Used by the model loader (HF weights -> this rank's shard), checkpoint conversion (both ways) and the
rollout weight export (shards -> HF names, streamed).

API: :func:`hf_to_megatron_shard` (HF -> one rank's shard), :func:`megatron_shards_to_hf` (all ranks'
shards -> HF, streamed), :func:`hf_tensor_from_megatron` (one HF tensor from unsharded Megatron
tensors), :func:`hf_param_names` / :func:`hf_param_shapes` / :func:`megatron_param_shapes` (no memory:
meta device), :func:`fuse_qkv` / :func:`split_qkv`, :func:`pipeline_layer_ranges`. ``arch`` is a
``Qwen2VLArch`` (``arch.build_qwen2_vl_arch``), a transformers config, or a ``config.json`` dict.

Names
-----
HF hub names (what safetensors files on disk hold; written on export)::

    model.embed_tokens.weight                         (V, H)
    model.layers.{L}.self_attn.{q,k,v}_proj.{weight,bias}
    model.layers.{L}.self_attn.o_proj.weight
    model.layers.{L}.mlp.{gate,up,down}_proj.weight
    model.layers.{L}.{input,post_attention}_layernorm.weight
    model.norm.weight
    lm_head.weight                                    (absent when tie_word_embeddings)
    visual.*                                          (the vision tower, merger included)

transformers >= 5 names the same tensors ``model.language_model.*`` and ``model.visual.*`` in memory
(``lm_head.weight`` unchanged); both namings are accepted on input.

Megatron names (the wrapper module: ``vision`` = HF vision tower, ``language_model`` = mcore
``GPTModel``; ``{i}`` is the layer index local to the pipeline stage)::

    vision.*                                                   pp stage 0 only, replicated over TP
    language_model.embedding.word_embeddings.weight            pp first, vocab-parallel (rows)
    language_model.decoder.layers.{i}.input_layernorm.weight          local spec
    language_model.decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight   TE spec
    language_model.decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}  column-parallel
    language_model.decoder.layers.{i}.self_attention.linear_proj.weight        row-parallel
    language_model.decoder.layers.{i}.pre_mlp_layernorm.weight        local spec
    language_model.decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight          TE spec
    language_model.decoder.layers.{i}.mlp.linear_fc1.weight                    column-parallel
    language_model.decoder.layers.{i}.mlp.linear_fc2.weight                    row-parallel
    language_model.decoder.final_layernorm.weight              pp last
    language_model.output_layer.weight                         pp last, vocab-parallel (rows)

The TE spec (``get_gpt_layer_with_transformer_engine_spec``) fuses the pre-attention / pre-MLP
RMSNorm into ``TELayerNormColumnParallelLinear``, whose norm parameter is ``layer_norm_weight``; the
local spec's ``sharded_state_dict_keys_map`` maps its norms to these same names in distributed
checkpoints. (The TE spec does not import without Transformer Engine; names taken from mcore 0.16.1
``extensions/transformer_engine.py`` and ``post_training/modelopt/gpt/state_dict_hooks.py``.)

Layouts (mcore 0.16.1, ``SelfAttention.get_query_key_value_tensors`` and ``MLP``)
-------------------------------------------------------------------------------
* ``linear_qkv`` (full, before TP) is grouped per KV head: for each of the ``ng`` query groups
  ``[q of its nh/ng heads ; k ; v]`` (each head ``hd`` rows), i.e. ``(ng * (nh/ng + 2) * hd, H)``.
  TP takes contiguous row blocks of that tensor: with ``ng >= tp`` each rank holds ``ng/tp`` whole
  groups; with ``ng < tp`` mcore all-gathers the fused output and each rank picks its group, so the
  contiguous split is still what the weight holds.
* ``linear_fc1`` on one TP rank is ``[gate rows of this rank ; up rows of this rank]``; its full
  (TP-independent) form is ``[gate ; up]``, which is also how mcore's swiglu sharded factory stores it.
* Column-parallel (split rows): ``linear_qkv`` (weight and bias), ``linear_fc1``, ``word_embeddings``,
  ``output_layer``. Row-parallel (split columns): ``linear_proj``, ``linear_fc2``. Norms, the vision
  tower: replicated.
* Vocabulary padding (optional; ``Qwen2VLPolicy`` itself uses none and needs ``vocab_size % tp == 0``):
  the embedding and output layer have ``vocab_padded_size`` rows (a multiple of ``tp_size``; see
  :func:`compute_vocab_padded_size` for Megatron-LM's rule); rows past ``vocab_size`` are zero on
  import and dropped on export.
* Pipeline: layers go to stages by mcore's rule (``get_num_layers_to_build``): evenly, or with
  ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` and the rest evenly;
  see :func:`pipeline_layer_ranges`. Virtual pipeline stages are not supported.
* Tied embeddings: with PP = 1 mcore has no ``output_layer.weight`` (the embedding is reused); with
  PP > 1 the last stage holds its own copy, initialised from the embedding, and this adapter fills it
  with the same tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch

from megatron_vrft.models.qwen2_vl.arch import SUPPORTED_FAMILIES, Qwen2VLArch, build_qwen2_vl_arch

LayerSpec = Literal["local", "te"]
HfGetter = Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor]
ShardsGetter = Callable[[int, int], Mapping[str, torch.Tensor]]

LM = "language_model."
VISION = "vision."


def _config_from_dict(d: dict) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    cls = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig}.get(d.get("model_type"))
    if cls is None:
        raise ValueError(f"unsupported model_type {d.get('model_type')!r}; expected one of {SUPPORTED_FAMILIES}")
    return cls(**{k: v for k, v in d.items() if k != "model_type"})


def as_arch(arch: Qwen2VLArch | Any) -> Qwen2VLArch:
    """Accept a :class:`Qwen2VLArch`, a transformers ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``, or a
    config dict (``config.json`` contents)."""
    if isinstance(arch, Qwen2VLArch):
        return arch
    if isinstance(arch, Mapping):
        arch = _config_from_dict(dict(arch))
    return build_qwen2_vl_arch(arch)


# ----------------------------------------------------------------------------------------------
# Layout rules


def pipeline_layer_ranges(
    num_layers: int,
    pp_size: int,
    *,
    num_layers_in_first_pipeline_stage: int | None = None,
    num_layers_in_last_pipeline_stage: int | None = None,
) -> list[range]:
    """Global layer indices held by each pipeline stage, by mcore's ``get_num_layers_to_build`` rule."""
    first, last = num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage
    if pp_size < 1:
        raise ValueError(f"pp_size must be >= 1, got {pp_size}")
    counts = [None] * pp_size
    if first is not None:
        counts[0] = first
    if last is not None:
        if pp_size == 1 and first is not None and first != last:
            raise ValueError("pp_size=1 cannot have different first and last stage layer counts")
        counts[-1] = last
    rest_stages = sum(c is None for c in counts)
    rest_layers = num_layers - sum(c for c in counts if c is not None)
    if rest_stages:
        if rest_layers < 0 or rest_layers % rest_stages:
            raise ValueError(
                f"{num_layers} layers cannot be split over {pp_size} pipeline stages "
                f"(first={first}, last={last}): {rest_layers} left for {rest_stages} stages"
            )
        counts = [rest_layers // rest_stages if c is None else c for c in counts]
    if sum(counts) != num_layers:
        raise ValueError(f"pipeline stage layer counts {counts} do not sum to {num_layers}")
    starts = [sum(counts[:p]) for p in range(pp_size)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def _check_parallel(arch: Qwen2VLArch, tp_size: int, vocab_padded_size: int) -> None:
    if arch.num_attention_heads % tp_size:
        raise ValueError(f"num_attention_heads={arch.num_attention_heads} not divisible by tp_size={tp_size}")
    groups_ok = (arch.num_key_value_heads % tp_size == 0) or (tp_size % arch.num_key_value_heads == 0)
    if not groups_ok or arch.num_attention_heads % arch.num_key_value_heads:
        raise ValueError(
            f"num_query_groups={arch.num_key_value_heads} incompatible with tp_size={tp_size} "
            f"and num_attention_heads={arch.num_attention_heads}"
        )
    if arch.intermediate_size % tp_size:
        raise ValueError(f"ffn_hidden_size={arch.intermediate_size} not divisible by tp_size={tp_size}")
    if vocab_padded_size < arch.vocab_size or vocab_padded_size % tp_size:
        raise ValueError(
            f"vocab_padded_size={vocab_padded_size} must be >= vocab_size={arch.vocab_size} "
            f"and divisible by tp_size={tp_size}"
        )


def compute_vocab_padded_size(vocab_size: int, *, make_vocab_size_divisible_by: int, tp_size: int) -> int:
    """Megatron-LM's rule: round up to a multiple of ``make_vocab_size_divisible_by * tp_size``."""
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_query_groups: int) -> torch.Tensor:
    """HF ``q (nh*hd, ...)``, ``k, v (ng*hd, ...)`` -> mcore full ``linear_qkv`` ``(ng*(nh/ng+2)*hd, ...)``."""
    ng = num_query_groups
    rest = q.shape[1:]
    qg = q.reshape(ng, -1, *rest)
    kg = k.reshape(ng, -1, *rest)
    vg = v.reshape(ng, -1, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, *, num_attention_heads: int, num_query_groups: int, kv_channels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv` on the full (TP-gathered) tensor."""
    ng, hd = num_query_groups, kv_channels
    q_per_group = num_attention_heads // ng * hd
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, q_per_group + 2 * hd, *rest)
    q, k, v = torch.split(g, [q_per_group, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _tp_chunk(t: torch.Tensor, tp_rank: int, tp_size: int, dim: int) -> torch.Tensor:
    if tp_size == 1:
        return t
    # clone: a shard must not keep the full tensor alive through a view.
    return torch.chunk(t, tp_size, dim=dim)[tp_rank].clone()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], dim=0)


# ----------------------------------------------------------------------------------------------
# Tensor-parallel split of each Megatron parameter (one table; the shard builders above and the
# merge below follow it).

# Megatron name suffix -> TP split axis; names matching no entry are replicated over TP.
TP_SPLIT_AXIS: dict[str, int] = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "mlp.linear_fc1.weight": 0,  # each rank holds [gate_r ; up_r]: see merge_tp_shards
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc2.weight": 1,
}


def tp_split_axis(megatron_name: str) -> int | None:
    """The axis along which ``megatron_name`` is split over TP ranks, or None when replicated."""
    for suffix, axis in TP_SPLIT_AXIS.items():
        if megatron_name.endswith(suffix):
            return axis
    return None


def merge_tp_shards(megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full (TP-independent) Megatron tensor from its per-rank shards, in TP rank order.

    Inverse of the split in :func:`hf_to_megatron_shard`: concatenation along the split axis, except
    ``linear_fc1`` whose full form is ``[gate ; up]`` while rank ``r`` holds ``[gate_r ; up_r]``.
    Replicated tensors return rank 0's.
    """
    axis = tp_split_axis(megatron_name)
    if axis is None or len(shards) == 1:
        return shards[0]
    if megatron_name.endswith("mlp.linear_fc1.weight"):
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)
    return torch.cat(shards, dim=axis)


# ----------------------------------------------------------------------------------------------
# Names


def _norm_names(layer_spec: LayerSpec) -> tuple[str, str]:
    if layer_spec == "local":
        return "input_layernorm.weight", "pre_mlp_layernorm.weight"
    if layer_spec == "te":
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    raise ValueError(f"layer_spec must be 'local' or 'te', got {layer_spec!r}")


def hf_in_memory_name(hub_name: str) -> str:
    """Hub name -> transformers >= 5 in-memory name (``model.language_model.*``, ``model.visual.*``)."""
    if hub_name.startswith("model."):
        return "model.language_model." + hub_name[len("model.") :]
    if hub_name.startswith("visual."):
        return "model." + hub_name
    return hub_name


def hf_hub_name(name: str) -> str:
    """Either naming -> the hub name (inverse of :func:`hf_in_memory_name`)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def hf_vision_param_shapes(arch: Qwen2VLArch | Any) -> dict[str, torch.Size]:
    """``visual.*`` hub names -> shapes, from the HF vision tower built on the meta device."""
    arch = as_arch(arch)
    if arch.family == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel as Tower,
        )
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Tower,
        )
    with torch.device("meta"):
        tower = Tower._from_config(arch.hf_config.vision_config)
    return {f"visual.{k}": v.shape for k, v in tower.state_dict().items()}


def hf_param_shapes(arch: Qwen2VLArch | Any) -> dict[str, torch.Size]:
    """Every HF hub parameter name -> full shape (vision from the HF tower on meta; text computed)."""
    a = as_arch(arch)
    h, hd, f = a.hidden_size, a.head_dim, a.intermediate_size
    q, kv = a.num_attention_heads * hd, a.num_key_value_heads * hd
    shapes: dict[str, torch.Size] = dict(hf_vision_param_shapes(a))
    shapes["model.embed_tokens.weight"] = torch.Size([a.vocab_size, h])
    for layer in range(a.num_layers):
        p = f"model.layers.{layer}."
        per = {
            "self_attn.q_proj.weight": [q, h], "self_attn.q_proj.bias": [q],
            "self_attn.k_proj.weight": [kv, h], "self_attn.k_proj.bias": [kv],
            "self_attn.v_proj.weight": [kv, h], "self_attn.v_proj.bias": [kv],
            "self_attn.o_proj.weight": [h, q],
            "mlp.gate_proj.weight": [f, h], "mlp.up_proj.weight": [f, h], "mlp.down_proj.weight": [h, f],
            "input_layernorm.weight": [h], "post_attention_layernorm.weight": [h],
        }  # fmt: skip
        shapes.update({p + k: torch.Size(v) for k, v in per.items()})
    shapes["model.norm.weight"] = torch.Size([h])
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = torch.Size([a.vocab_size, h])
    return shapes


def hf_param_names(arch: Qwen2VLArch | Any) -> list[str]:
    """Every HF hub parameter name of the model, in export order."""
    return list(hf_param_shapes(arch))


def megatron_param_shapes(
    arch: Qwen2VLArch | Any,
    *,
    tp_size: int,
    pp_size: int,
    pp_rank: int,
    layer_spec: LayerSpec = "local",
    vocab_padded_size: int | None = None,
    **pipeline_kwargs: int | None,
) -> dict[str, torch.Size]:
    """Megatron name -> shape of one rank's shard (same for every TP rank); no memory is allocated."""
    shapes = hf_param_shapes(arch)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    shard = hf_to_megatron_shard(
        meta, arch, tp_rank=0, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size,
        layer_spec=layer_spec, vocab_padded_size=vocab_padded_size, **pipeline_kwargs,
    )  # fmt: skip
    return {k: v.shape for k, v in shard.items()}


# ----------------------------------------------------------------------------------------------
# HF -> Megatron


def _make_getter(get_hf_tensor: HfGetter) -> Callable[[str], torch.Tensor]:
    """A getter by hub name that also finds the in-memory naming; raises KeyError naming the key."""
    if isinstance(get_hf_tensor, Mapping):
        mapping = get_hf_tensor

        def get(name: str) -> torch.Tensor:
            for candidate in (name, hf_in_memory_name(name)):
                if candidate in mapping:
                    return mapping[candidate]
            raise KeyError(f"HF tensor {name!r} missing (also tried {hf_in_memory_name(name)!r})")

        return get

    fn = get_hf_tensor

    def get_fn(name: str) -> torch.Tensor:
        try:
            return fn(name)
        except KeyError:
            alias = hf_in_memory_name(name)
            if alias == name:
                raise KeyError(f"HF tensor {name!r} missing") from None
            try:
                return fn(alias)
            except KeyError:
                raise KeyError(f"HF tensor {name!r} missing (also tried {alias!r})") from None

    return get_fn


def _check_shape(name: str, t: torch.Tensor, expected: torch.Size) -> torch.Tensor:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"HF tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(expected)}")
    return t


def hf_to_megatron_shard(
    get_hf_tensor: HfGetter,
    arch: Qwen2VLArch | Any,
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    layer_spec: LayerSpec = "local",
    vocab_padded_size: int | None = None,
    num_layers_in_first_pipeline_stage: int | None = None,
    num_layers_in_last_pipeline_stage: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build the ``(tp_rank, pp_rank)`` shard of the wrapper model from HF tensors.

    ``get_hf_tensor`` is a mapping or a function from HF names (hub or in-memory naming) to full
    tensors; it is called once per HF tensor this shard needs (a lazy safetensors reader keeps memory
    to one tensor plus the shard). Returns full module names (``vision.*`` on ``pp_rank == 0``,
    ``language_model.*``) -> tensors in the input dtype. Raises ``KeyError`` naming a missing HF
    tensor and ``ValueError`` naming a tensor whose shape does not match ``arch``.
    """
    a = as_arch(arch)
    vp = vocab_padded_size or a.vocab_size
    _check_parallel(a, tp_size, vp)
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) outside (tp_size={tp_size}, pp_size={pp_size})")
    get = _make_getter(get_hf_tensor)
    expected = hf_param_shapes(a)

    def hf(name: str) -> torch.Tensor:
        return _check_shape(name, get(name), expected[name])

    first, last = pp_rank == 0, pp_rank == pp_size - 1
    norm_attn, norm_mlp = _norm_names(layer_spec)
    out: dict[str, torch.Tensor] = {}

    if first:
        for name in (n for n in expected if n.startswith("visual.")):
            out[VISION + name[len("visual.") :]] = hf(name)
        emb = _pad_rows(hf("model.embed_tokens.weight"), vp)
        out[LM + "embedding.word_embeddings.weight"] = _tp_chunk(emb, tp_rank, tp_size, 0)
        del emb

    ranges = pipeline_layer_ranges(
        a.num_layers, pp_size,
        num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage,
    )  # fmt: skip
    for i, layer in enumerate(ranges[pp_rank]):
        p, m = f"model.layers.{layer}.", f"{LM}decoder.layers.{i}."
        for w in ("weight", "bias"):
            qkv = fuse_qkv(
                hf(f"{p}self_attn.q_proj.{w}"), hf(f"{p}self_attn.k_proj.{w}"),
                hf(f"{p}self_attn.v_proj.{w}"), num_query_groups=a.num_key_value_heads,
            )  # fmt: skip
            out[f"{m}self_attention.linear_qkv.{w}"] = _tp_chunk(qkv, tp_rank, tp_size, 0)
            del qkv
        out[f"{m}self_attention.linear_proj.weight"] = _tp_chunk(hf(f"{p}self_attn.o_proj.weight"), tp_rank, tp_size, 1)
        gate = _tp_chunk(hf(f"{p}mlp.gate_proj.weight"), tp_rank, tp_size, 0)
        up = _tp_chunk(hf(f"{p}mlp.up_proj.weight"), tp_rank, tp_size, 0)
        out[f"{m}mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        del gate, up
        out[f"{m}mlp.linear_fc2.weight"] = _tp_chunk(hf(f"{p}mlp.down_proj.weight"), tp_rank, tp_size, 1)
        out[m + norm_attn] = hf(f"{p}input_layernorm.weight")
        out[m + norm_mlp] = hf(f"{p}post_attention_layernorm.weight")

    if last:
        out[LM + "decoder.final_layernorm.weight"] = hf("model.norm.weight")
        if not a.tie_word_embeddings or pp_size > 1:
            head_name = "model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight"
            head = _pad_rows(hf(head_name), vp)
            out[LM + "output_layer.weight"] = _tp_chunk(head, tp_rank, tp_size, 0)
            del head
    return out


# ----------------------------------------------------------------------------------------------
# Megatron -> HF


def megatron_shards_to_hf(
    shards: ShardsGetter,
    arch: Qwen2VLArch | Any,
    *,
    tp_size: int,
    pp_size: int,
    layer_spec: LayerSpec = "local",
    num_layers_in_first_pipeline_stage: int | None = None,
    num_layers_in_last_pipeline_stage: int | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(hf_hub_name, full tensor)`` from per-rank shards, one layer at a time.

    ``shards(tp_rank, pp_rank)`` returns that rank's mapping of full module names (as produced by
    :func:`hf_to_megatron_shard`); only the keys needed for the current tensor are read from it,
    so a lazy mapping keeps memory to one layer. Order: ``visual.*``, embedding, layers in order,
    final norm, ``lm_head`` (omitted when tied). The vocabulary padding is dropped. Raises
    ``KeyError`` naming a missing Megatron key.
    """
    a = as_arch(arch)
    norm_attn, norm_mlp = _norm_names(layer_spec)

    def get(tp: int, pp: int, key: str) -> torch.Tensor:
        shard = shards(tp, pp)
        if key not in shard:
            raise KeyError(f"Megatron tensor {key!r} missing from shard (tp={tp}, pp={pp})")
        return shard[key]

    def gather(pp: int, key: str, dim: int) -> torch.Tensor:
        return torch.cat([get(tp, pp, key) for tp in range(tp_size)], dim=dim)

    for name in hf_vision_param_shapes(a):
        yield name, get(0, 0, VISION + name[len("visual.") :])
    yield "model.embed_tokens.weight", gather(0, LM + "embedding.word_embeddings.weight", 0)[: a.vocab_size]

    ranges = pipeline_layer_ranges(
        a.num_layers, pp_size,
        num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage,
    )  # fmt: skip
    for pp, layers in enumerate(ranges):
        for i, layer in enumerate(layers):
            p, m = f"model.layers.{layer}.", f"{LM}decoder.layers.{i}."
            for w in ("weight", "bias"):
                q, k, v = split_qkv(
                    gather(pp, f"{m}self_attention.linear_qkv.{w}", 0),
                    num_attention_heads=a.num_attention_heads,
                    num_query_groups=a.num_key_value_heads, kv_channels=a.head_dim,
                )  # fmt: skip
                yield f"{p}self_attn.q_proj.{w}", q
                yield f"{p}self_attn.k_proj.{w}", k
                yield f"{p}self_attn.v_proj.{w}", v
            yield f"{p}self_attn.o_proj.weight", gather(pp, f"{m}self_attention.linear_proj.weight", 1)
            halves = [torch.chunk(get(tp, pp, f"{m}mlp.linear_fc1.weight"), 2, dim=0) for tp in range(tp_size)]
            yield f"{p}mlp.gate_proj.weight", torch.cat([g for g, _ in halves], dim=0)
            yield f"{p}mlp.up_proj.weight", torch.cat([u for _, u in halves], dim=0)
            del halves
            yield f"{p}mlp.down_proj.weight", gather(pp, f"{m}mlp.linear_fc2.weight", 1)
            yield f"{p}input_layernorm.weight", get(0, pp, m + norm_attn)
            yield f"{p}post_attention_layernorm.weight", get(0, pp, m + norm_mlp)

    last = pp_size - 1
    yield "model.norm.weight", get(0, last, LM + "decoder.final_layernorm.weight")
    if not a.tie_word_embeddings:
        yield "lm_head.weight", gather(last, LM + "output_layer.weight", 0)[: a.vocab_size]


def hf_tensor_from_megatron(
    name: str,
    get_megatron: Callable[[str], torch.Tensor],
    arch: Qwen2VLArch | Any,
    *,
    layer_spec: LayerSpec = "local",
) -> torch.Tensor:
    """One HF tensor (hub name) from full, unsharded Megatron tensors.

    ``get_megatron`` takes TP-gathered Megatron names with GLOBAL layer indices (the single-stage,
    ``tp_size = pp_size = 1`` view: ``language_model.decoder.layers.{L}.…``) and returns the full
    tensor, e.g. a distributed-checkpoint reader. The inverse of :func:`hf_to_megatron_shard` at
    ``tp_size = pp_size = 1``; q/k/v read the fused tensor once each (cache in ``get_megatron``).
    """
    a = as_arch(arch)
    norm_attn, norm_mlp = _norm_names(layer_spec)
    if name.startswith("visual."):
        return get_megatron(VISION + name[len("visual.") :])
    if name == "model.embed_tokens.weight":
        return get_megatron(LM + "embedding.word_embeddings.weight")[: a.vocab_size]
    if name == "model.norm.weight":
        return get_megatron(LM + "decoder.final_layernorm.weight")
    if name == "lm_head.weight" and not a.tie_word_embeddings:
        return get_megatron(LM + "output_layer.weight")[: a.vocab_size]
    parts = name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) < a.num_layers:
        m = f"{LM}decoder.layers.{parts[2]}."
        suffix = ".".join(parts[3:])
        if suffix in {f"self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")}:
            q, k, v = split_qkv(
                get_megatron(f"{m}self_attention.linear_qkv.{parts[-1]}"),
                num_attention_heads=a.num_attention_heads, num_query_groups=a.num_key_value_heads,
                kv_channels=a.head_dim,
            )  # fmt: skip
            return {"q": q, "k": k, "v": v}[parts[4][0]].clone()
        if suffix in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            gate, up = torch.chunk(get_megatron(f"{m}mlp.linear_fc1.weight"), 2, dim=0)
            return (gate if parts[4] == "gate_proj" else up).clone()
        simple = {
            "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
            "mlp.down_proj.weight": "mlp.linear_fc2.weight",
            "input_layernorm.weight": norm_attn,
            "post_attention_layernorm.weight": norm_mlp,
        }
        if suffix in simple:
            return get_megatron(m + simple[suffix])
    raise KeyError(f"{name!r} is not a parameter of this {a.family} model")
