"""HF <-> Megatron state-dict adapter for the Qwen2-VL / Qwen2.5-VL family: the one name map.

Every name, TP split axis and fusion lives in one declarative table, :data:`PARAM_TABLE` (rows of
:class:`ParamMapping`: Megatron name, HF names, TP axis, fusion, TE-spec / checkpoint name, vocabulary
padding, tied embeddings), bound to one pipeline stage's parameters by :func:`expand_param_table`.
Everything else is derived from it: the model loader (HF weights -> this rank's shard), checkpoint
conversion (both ways, :mod:`megatron_vrft.models.conversion`) and the rollout weight export (shards
-> HF names, streamed, :mod:`megatron_vrft.rollout.weight_export`).

API: :func:`hf_to_megatron_shard` / :func:`iter_megatron_shard` (HF -> one rank's shard),
:func:`megatron_shards_to_hf` (all ranks' shards -> HF, streamed), :func:`hf_tensor_from_megatron`
(one HF tensor from unsharded Megatron tensors), :func:`hf_param_names` / :func:`hf_param_shapes` /
:func:`megatron_param_shapes` (no memory: meta device), :func:`tp_split_axis` /
:func:`merge_tp_shards`, :func:`find_megatron_mapping` / :func:`find_hf_mapping` (a name's row),
:func:`fuse_qkv` / :func:`split_qkv`, :func:`pipeline_layer_ranges`. ``arch`` is a ``Qwen2VLArch``
(``arch.build_qwen2_vl_arch``), a transformers config, or a ``config.json`` dict.

Names
-----
HF hub names are what safetensors files on disk hold (``model.layers.{L}.…``, ``model.embed_tokens``,
``model.norm``, ``lm_head`` (absent when tied), ``visual.*``); transformers >= 5 names the same
tensors ``model.language_model.*`` and ``model.visual.*`` in memory (``lm_head.weight`` unchanged);
both namings are accepted on input. Megatron names are those of the wrapper module (``vision`` = HF
vision tower, pp stage 0 only, replicated over TP; ``language_model`` = mcore ``GPTModel``), with
decoder layer indices local to the pipeline stage.

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
* TP split axes (column-parallel: rows, row-parallel: columns, norms and the vision tower replicated)
  are the table's ``tp_axis``.
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

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron_vrft.models.qwen2_vl.arch import SUPPORTED_FAMILIES, Qwen2VLArch, build_qwen2_vl_arch, hf_classes

LayerSpec = Literal["local", "te"]
HfGetter = Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor]
ShardsGetter = Callable[[int, int], Mapping[str, torch.Tensor]]

LM = "language_model."
VISION = "vision."


def _config_from_dict(d: dict) -> Any:
    if d.get("model_type") not in SUPPORTED_FAMILIES:
        raise ValueError(f"unsupported model_type {d.get('model_type')!r}; expected one of {SUPPORTED_FAMILIES}")
    return hf_classes(d["model_type"]).config(**{k: v for k, v in d.items() if k != "model_type"})


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
# The name table: every conversion below is derived from it.

Fusion = Literal["qkv", "gate_up"]
Placement = Literal["first", "layer", "last"]
_L = LM + "decoder.layers.{layer}."
_H = "model.layers.{layer}."


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamMapping:
    """One row of :data:`PARAM_TABLE`: a Megatron parameter and the HF tensors it holds.

    Names are templates: ``{layer}`` is the decoder layer index (stage-local in Megatron names,
    global in HF names), ``{name}`` a parameter name of the HF vision tower."""

    megatron: str
    """Megatron module name under the local layer spec."""
    hf: tuple[str, ...]
    """HF hub names, in fusion order."""
    hf_shapes: tuple[tuple[str, ...], ...]
    """Shape of each HF tensor in named dimensions (see :func:`_dims`); empty: read from the HF
    vision tower."""
    tp_axis: int | None = None
    """Axis split over TP ranks in contiguous blocks (rank order); None: replicated over TP."""
    fusion: Fusion | None = None
    """How the HF tensors fuse: ``"qkv"``: mcore's grouped layout (:func:`fuse_qkv`); ``"gate_up"``:
    ``[gate ; up]`` in full, ``[gate_r ; up_r]`` on TP rank ``r``."""
    te_megatron: str | None = None
    """The name under the TE layer spec, where it differs. Distributed checkpoints use it for either
    spec (mcore's ``sharded_state_dict_keys_map``)."""
    placement: Placement = "layer"
    """``"first"``: pipeline stage 0; ``"layer"``: the stage holding the layer; ``"last"``: last stage."""
    vocab: bool = False
    """Rows are the vocabulary: zero rows pad it to ``vocab_padded_size`` on import, cut on export."""
    tied_hf: str | None = None
    """With tied word embeddings: the HF tensor read instead of ``hf``. The row then exports nothing
    and exists only with PP > 1 (the last stage's copy of the embedding)."""

    def megatron_for(self, layer_spec: LayerSpec) -> str:
        """The Megatron name template under ``layer_spec``."""
        return self.te_megatron if layer_spec == "te" and self.te_megatron else self.megatron

    @property
    def checkpoint_key(self) -> str:
        """Distributed-checkpoint key template: decoder layers stacked (no ``{layer}``), TE names."""
        return (self.te_megatron or self.megatron).replace("{layer}.", "")


PARAM_TABLE: tuple[ParamMapping, ...] = (
    ParamMapping(megatron=VISION + "{name}", hf=("visual.{name}",), hf_shapes=(), placement="first"),
    ParamMapping(
        megatron=LM + "embedding.word_embeddings.weight", hf=("model.embed_tokens.weight",),
        hf_shapes=(("vocab", "hidden"),), tp_axis=0, vocab=True, placement="first",
    ),
    ParamMapping(
        megatron=_L + "self_attention.linear_qkv.weight", hf=tuple(f"{_H}self_attn.{x}_proj.weight" for x in "qkv"),
        hf_shapes=(("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")), tp_axis=0, fusion="qkv",
    ),
    ParamMapping(
        megatron=_L + "self_attention.linear_qkv.bias", hf=tuple(f"{_H}self_attn.{x}_proj.bias" for x in "qkv"),
        hf_shapes=(("q",), ("kv",), ("kv",)), tp_axis=0, fusion="qkv",
    ),
    ParamMapping(
        megatron=_L + "self_attention.linear_proj.weight", hf=(_H + "self_attn.o_proj.weight",),
        hf_shapes=(("hidden", "q"),), tp_axis=1,
    ),
    ParamMapping(
        megatron=_L + "mlp.linear_fc1.weight", hf=(_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        hf_shapes=(("ffn", "hidden"), ("ffn", "hidden")), tp_axis=0, fusion="gate_up",
    ),
    ParamMapping(
        megatron=_L + "mlp.linear_fc2.weight", hf=(_H + "mlp.down_proj.weight",), hf_shapes=(("hidden", "ffn"),),
        tp_axis=1,
    ),
    ParamMapping(
        megatron=_L + "input_layernorm.weight", te_megatron=_L + "self_attention.linear_qkv.layer_norm_weight",
        hf=(_H + "input_layernorm.weight",), hf_shapes=(("hidden",),),
    ),
    ParamMapping(
        megatron=_L + "pre_mlp_layernorm.weight", te_megatron=_L + "mlp.linear_fc1.layer_norm_weight",
        hf=(_H + "post_attention_layernorm.weight",), hf_shapes=(("hidden",),),
    ),
    ParamMapping(
        megatron=LM + "decoder.final_layernorm.weight", hf=("model.norm.weight",), hf_shapes=(("hidden",),),
        placement="last",
    ),
    ParamMapping(
        megatron=LM + "output_layer.weight", hf=("lm_head.weight",), hf_shapes=(("vocab", "hidden"),), tp_axis=0,
        vocab=True, placement="last", tied_hf="model.embed_tokens.weight",
    ),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class BoundParam:
    """A :data:`PARAM_TABLE` row bound to one parameter of one pipeline stage."""

    mapping: ParamMapping
    megatron: str
    """Its name on the stage (stage-local layer index, the chosen layer spec)."""
    global_megatron: str
    """Its name in the single-stage view (global layer index)."""
    hf: tuple[str, ...]
    """HF hub names it exports to (none for the tied output-layer copy)."""
    source: tuple[str, ...]
    """HF hub names it is built from."""
    layer: int | None
    """Global decoder layer index; None outside the decoder layers."""


def _check_layer_spec(layer_spec: str) -> None:
    if layer_spec not in ("local", "te"):
        raise ValueError(f"layer_spec must be 'local' or 'te', got {layer_spec!r}")


def _expand(
    a: Qwen2VLArch,
    layer_spec: LayerSpec,
    vision_names: list[str],
    *,
    pp_rank: int,
    pp_size: int,
    **pipeline_kwargs: int | None,
) -> list[BoundParam]:
    _check_layer_spec(layer_spec)
    ranges = pipeline_layer_ranges(a.num_layers, pp_size, **pipeline_kwargs)
    tied = a.tie_word_embeddings

    def bind(row: ParamMapping, layer: int | None = None, local: int | None = None, name: str | None = None):
        spec_name = row.megatron_for(layer_spec)
        hf = tuple(h.format(layer=layer, name=name) for h in row.hf)
        source = hf
        if tied and row.tied_hf:
            hf, source = (), (row.tied_hf,)
        return BoundParam(
            row, spec_name.format(layer=local, name=name), spec_name.format(layer=layer, name=name), hf, source, layer
        )

    rows = {p: [r for r in PARAM_TABLE if r.placement == p] for p in ("first", "layer", "last")}
    out: list[BoundParam] = []
    if pp_rank == 0:
        for row in rows["first"]:
            out += [bind(row, name=n) for n in vision_names] if "{name}" in row.megatron else [bind(row)]
    for local, layer in enumerate(ranges[pp_rank]):
        out += [bind(row, layer, local) for row in rows["layer"]]
    if pp_rank == pp_size - 1:
        out += [bind(row) for row in rows["last"] if not (tied and row.tied_hf and pp_size == 1)]
    return out


def expand_param_table(
    arch: Qwen2VLArch | Any,
    *,
    layer_spec: LayerSpec = "local",
    pp_rank: int = 0,
    pp_size: int = 1,
    **pipeline_kwargs: int | None,
) -> list[BoundParam]:
    """:data:`PARAM_TABLE` bound to the parameters of pipeline stage ``pp_rank`` (default: the whole
    model as one stage), in shard order: vision tower and embedding, layers, final norm and output."""
    a = as_arch(arch)
    vision = [n[len("visual.") :] for n in hf_vision_param_shapes(a)] if pp_rank == 0 else []
    return _expand(a, layer_spec, vision, pp_rank=pp_rank, pp_size=pp_size, **pipeline_kwargs)


def _pattern(template: str) -> re.Pattern:
    fields = {"{layer}": "(?P<layer>[0-9]+)", "{name}": "(?P<name>.+)"}
    return re.compile("".join(fields.get(p) or re.escape(p) for p in re.split(r"(\{layer\}|\{name\})", template)))


_MEGATRON_PATTERNS = tuple(
    (row, _pattern(name)) for row in PARAM_TABLE for name in (row.megatron, row.te_megatron) if name
)
_HF_PATTERNS = tuple((row, i, _pattern(name)) for row in PARAM_TABLE for i, name in enumerate(row.hf))


def find_megatron_mapping(name: str) -> tuple[ParamMapping, dict[str, str]] | None:
    """The row of a Megatron name (either layer spec, any layer index) and its template fields."""
    for row, pattern in _MEGATRON_PATTERNS:
        if m := pattern.fullmatch(name):
            return row, m.groupdict()
    return None


def find_hf_mapping(name: str) -> tuple[ParamMapping, int, dict[str, str]] | None:
    """The row of an HF hub name, its position in ``row.hf`` and its template fields."""
    for row, i, pattern in _HF_PATTERNS:
        if m := pattern.fullmatch(name):
            return row, i, m.groupdict()
    return None


def hf_export_order(names: list[str]) -> list[str]:
    """``names`` in HF state-dict order: a module's parameters together, modules in order of first appearance."""
    modules: dict[str, list[str]] = {}
    for n in names:
        modules.setdefault(n.rsplit(".", 1)[0], []).append(n)
    return [n for group in modules.values() for n in group]


def _dims(a: Qwen2VLArch) -> dict[str, int]:
    return {
        "vocab": a.vocab_size,
        "hidden": a.hidden_size,
        "ffn": a.intermediate_size,
        "q": a.num_attention_heads * a.head_dim,
        "kv": a.num_key_value_heads * a.head_dim,
    }


def tp_split_axis(megatron_name: str) -> int | None:
    """The axis along which ``megatron_name`` is split over TP ranks, or None when replicated."""
    found = find_megatron_mapping(megatron_name)
    return found[0].tp_axis if found else None


def _merge(row: ParamMapping | None, shards: list[torch.Tensor]) -> torch.Tensor:
    if row is None or row.tp_axis is None or len(shards) == 1:
        return shards[0]
    if row.fusion == "gate_up":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)
    return torch.cat(shards, dim=row.tp_axis)


def merge_tp_shards(megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full (TP-independent) Megatron tensor from its per-rank shards, in TP rank order.

    Inverse of the split in :func:`hf_to_megatron_shard`: concatenation along the split axis, except
    ``linear_fc1`` whose full form is ``[gate ; up]`` while rank ``r`` holds ``[gate_r ; up_r]``.
    Replicated tensors return rank 0's.
    """
    found = find_megatron_mapping(megatron_name)
    return _merge(found[0] if found else None, shards)


def unfuse_megatron_tensor(row: ParamMapping, full: torch.Tensor, arch: Qwen2VLArch | Any) -> tuple[torch.Tensor, ...]:
    """The HF tensors (in ``row.hf`` order) held by one full (TP-merged) Megatron tensor: QKV split,
    ``[gate ; up]`` halved, vocabulary padding dropped. Views of ``full`` where possible."""
    a = as_arch(arch)
    if row.fusion == "qkv":
        return split_qkv(
            full,
            num_attention_heads=a.num_attention_heads,
            num_query_groups=a.num_key_value_heads,
            kv_channels=a.head_dim,
        )
    if row.fusion == "gate_up":
        return tuple(torch.chunk(full, 2, dim=0))
    return (full[: a.vocab_size] if row.vocab else full,)


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
    """Every HF hub parameter name -> full shape, in HF order (vision from the HF tower on meta)."""
    a = as_arch(arch)
    vision = hf_vision_param_shapes(a)
    dims = _dims(a)
    shapes: dict[str, torch.Size] = {}
    for b in _expand(a, "local", [n[len("visual.") :] for n in vision], pp_rank=0, pp_size=1):
        for i, name in enumerate(b.hf):
            dim_names = b.mapping.hf_shapes
            shapes[name] = torch.Size([dims[d] for d in dim_names[i]]) if dim_names else vision[name]
    return {n: shapes[n] for n in hf_export_order(list(shapes))}


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
        meta,
        arch,
        tp_rank=0,
        tp_size=tp_size,
        pp_rank=pp_rank,
        pp_size=pp_size,
        layer_spec=layer_spec,
        vocab_padded_size=vocab_padded_size,
        **pipeline_kwargs,
    )
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


def _megatron_tensor(
    b: BoundParam, hf: Callable[[str], torch.Tensor], a: Qwen2VLArch, *, tp_rank: int, tp_size: int, vocab_padded: int
) -> torch.Tensor:
    """One rank's shard of ``b`` from its HF tensors (``hf(name)``, called once per tensor)."""
    row = b.mapping
    if row.fusion == "gate_up":  # rank r holds [gate_r ; up_r]
        return torch.cat([_tp_chunk(hf(n), tp_rank, tp_size, row.tp_axis) for n in b.source], dim=0)
    if row.fusion == "qkv":
        full = fuse_qkv(*(hf(n) for n in b.source), num_query_groups=a.num_key_value_heads)
    else:
        (full,) = (hf(n) for n in b.source)
    if row.vocab:
        full = _pad_rows(full, vocab_padded)
    return full if row.tp_axis is None else _tp_chunk(full, tp_rank, tp_size, row.tp_axis)


def iter_megatron_shard(
    get_hf_tensor: HfGetter,
    arch: Qwen2VLArch | Any,
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    layer_spec: LayerSpec = "local",
    vocab_padded_size: int | None = None,
    **pipeline_kwargs: int | None,
) -> Iterator[tuple[BoundParam, torch.Tensor]]:
    """:func:`hf_to_megatron_shard`, one ``(row, shard tensor)`` at a time."""
    a = as_arch(arch)
    vp = vocab_padded_size or a.vocab_size
    _check_parallel(a, tp_size, vp)
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) outside (tp_size={tp_size}, pp_size={pp_size})")
    get = _make_getter(get_hf_tensor)
    expected = hf_param_shapes(a)

    def hf(name: str) -> torch.Tensor:
        return _check_shape(name, get(name), expected[name])

    vision = [n[len("visual.") :] for n in expected if n.startswith("visual.")]
    for b in _expand(a, layer_spec, vision, pp_rank=pp_rank, pp_size=pp_size, **pipeline_kwargs):
        yield b, _megatron_tensor(b, hf, a, tp_rank=tp_rank, tp_size=tp_size, vocab_padded=vp)


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
    return {
        b.megatron: t
        for b, t in iter_megatron_shard(
            get_hf_tensor,
            arch,
            tp_rank=tp_rank,
            tp_size=tp_size,
            pp_rank=pp_rank,
            pp_size=pp_size,
            layer_spec=layer_spec,
            vocab_padded_size=vocab_padded_size,
            num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage,
        )
    }


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
    _check_layer_spec(layer_spec)
    vision = [n[len("visual.") :] for n in hf_vision_param_shapes(a)]

    def get(tp: int, pp: int, key: str) -> torch.Tensor:
        shard = shards(tp, pp)
        if key not in shard:
            raise KeyError(f"Megatron tensor {key!r} missing from shard (tp={tp}, pp={pp})")
        return shard[key]

    for pp in range(pp_size):
        pipeline = dict(
            num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage,
        )
        for b in _expand(a, layer_spec, vision, pp_rank=pp, pp_size=pp_size, **pipeline):
            if not b.hf:
                continue
            ranks = range(tp_size) if b.mapping.tp_axis is not None else range(1)
            full = _merge(b.mapping, [get(tp, pp, b.megatron) for tp in ranks])
            yield from zip(b.hf, unfuse_megatron_tensor(b.mapping, full, a))


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
    _check_layer_spec(layer_spec)
    found = find_hf_mapping(name)
    if found is not None:
        row, index, fields = found
        in_model = "layer" not in fields or int(fields["layer"]) < a.num_layers
        if in_model and not (a.tie_word_embeddings and row.tied_hf):
            full = get_megatron(row.megatron_for(layer_spec).format(**fields))
            tensor = unfuse_megatron_tensor(row, full, a)[index]
            return tensor.clone() if row.fusion else tensor
    raise KeyError(f"{name!r} is not a parameter of this {a.family} model")
