"""Megatron TP/PP shards -> HF-named full tensors, streamed in buckets to every rank.

One bucket at a time (whole layers, up to ``bucket_bytes`` of this rank's shard bytes), every rank
of a model-parallel group runs the same collectives:

1. the ranks of the pipeline stage owning the bucket pack their shards into one flat buffer and
   all-gather it over the TP group (TP-replicated tensors, e.g. the vision tower, travel once);
2. the owning stage broadcasts the gathered buffers over the PP group;
3. each rank merges the TP shards (``state_dict_adapter.merge_tp_shards``) and maps Megatron names
   to HF names with the adapter (``hf_tensor_from_megatron``: QKV and gate/up unfused).

Shapes come from the adapter (``megatron_param_shapes``), so ranks that do not own a bucket know
what to receive. Peak extra memory is one gathered bucket plus its HF tensors, not the model.
Consumers: every engine's ``update_weights`` and the HF checkpoint writer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_vrft.distributed.parallel_state import ParallelGroups
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch
from megatron_vrft.models.qwen2_vl.state_dict_adapter import (
    hf_param_names,
    hf_tensor_from_megatron,
    megatron_param_shapes,
    merge_tp_shards,
    pipeline_layer_ranges,
    tp_split_axis,
)

_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.*)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(kw_only=True)
class _Unit:
    """Tensors that export together: a layer, or the stage's head (vision + embedding) or tail."""

    stage: int
    """Virtual pipeline stage that owns it."""
    names: list[str]
    """Local Megatron names on the owning chunk."""
    shapes: list[torch.Size]
    """Their shard shapes."""
    global_names: list[str]
    """The same names with global layer indices (the TP = PP = 1 view)."""
    hf_names: list[str]
    """HF hub names computed from this unit."""

    def nbytes(self, element_size: int) -> int:
        return sum(s.numel() for s in self.shapes) * element_size


def _plan_units(arch: Qwen2VLArch, tp: int, num_stages: int, layer_spec: str) -> list[_Unit]:
    ranges = pipeline_layer_ranges(arch.num_layers, num_stages)
    hf_names = hf_param_names(arch)
    units: list[_Unit] = []
    for stage in range(num_stages):
        shapes = megatron_param_shapes(arch, tp_size=tp, pp_size=num_stages, pp_rank=stage, layer_spec=layer_spec)
        head, tail, layers = [], [], {}
        for name in shapes:
            m = _LAYER.match(name)
            if m:
                layers.setdefault(int(m.group(1)), []).append(name)
            elif "final_layernorm" in name or "output_layer" in name:
                tail.append(name)
            else:
                head.append(name)

        def unit(names: list[str], hf: list[str], layer_map: dict[int, int]) -> _Unit:
            glob = []
            for n in names:
                m = _LAYER.match(n)
                glob.append(n if not m else f"language_model.decoder.layers.{layer_map[int(m.group(1))]}.{m.group(2)}")
            return _Unit(stage=stage, names=names, shapes=[shapes[n] for n in names], global_names=glob, hf_names=hf)

        if head:
            hf = [n for n in hf_names if n.startswith("visual.") or n == "model.embed_tokens.weight"]
            units.append(unit(head, hf, {}))
        for local, global_layer in enumerate(ranges[stage]):
            hf = [n for n in hf_names if n.startswith(f"model.layers.{global_layer}.")]
            units.append(unit(layers[local], hf, {local: global_layer}))
        if tail:
            hf = [n for n in hf_names if n in ("model.norm.weight", "lm_head.weight")]
            units.append(unit(tail, hf, {}))
    covered = [n for u in units for n in u.hf_names]
    if sorted(covered) != sorted(hf_names):
        raise AssertionError("weight export plan does not cover every HF tensor exactly once")
    return units


def _buckets(units: list[_Unit], bucket_bytes: int, element_size: int) -> list[list[_Unit]]:
    """Consecutive units of one stage, up to ``bucket_bytes`` each (at least one unit)."""
    buckets: list[list[_Unit]] = []
    for u in units:
        last = buckets[-1] if buckets else None
        if (
            last is not None
            and last[0].stage == u.stage
            and sum(x.nbytes(element_size) for x in last) + u.nbytes(element_size) <= bucket_bytes
        ):
            last.append(u)
        else:
            buckets.append([u])
    return buckets


def export_hf_weights(
    chunks: Sequence[nn.Module],
    arch: Qwen2VLArch,
    groups: ParallelGroups,
    *,
    num_virtual_stages: int | None = None,
    bucket_bytes: int = 512 * 2**20,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of ``(hf_hub_name, full tensor)`` on every rank of the model-parallel group.

    ``chunks`` are this rank's model chunks (``build_policy``); every rank of the TP x PP group must
    iterate the generator to the end (it runs collectives). Tensors come in the HF export order of
    each stage; together they are exactly ``hf_param_names(arch)``.
    """
    vpp = num_virtual_stages or 1
    tp, pp = groups.tp_size, groups.pp_size
    params = [dict(c.named_parameters()) for c in chunks]
    dtypes = {p.dtype for chunk in params for p in chunk.values()}
    if len(dtypes) != 1:
        raise ValueError(f"weight export needs one parameter dtype, found {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    device = next(iter(params[0].values())).device
    element_size = torch.empty((), dtype=dtype).element_size()
    layer_spec = getattr(chunks[0], "adapter_layer_spec", "local")
    units = _plan_units(arch, tp, pp * vpp, layer_spec)
    for bucket in _buckets(units, bucket_bytes, element_size):
        yield _export_bucket(bucket, arch, groups, params, dtype=dtype, device=device, pp=pp, layer_spec=layer_spec)


def _export_bucket(bucket, arch, groups, params, *, dtype, device, pp, layer_spec) -> list[tuple[str, torch.Tensor]]:
    stage = bucket[0].stage
    owner_pp, chunk = stage % pp, stage // pp
    entries = [(n, g, s) for u in bucket for n, g, s in zip(u.names, u.global_names, u.shapes)]
    split = [e for e in entries if tp_split_axis(e[0]) is not None]
    repl = [e for e in entries if tp_split_axis(e[0]) is None]
    n_split, n_repl = sum(s.numel() for *_, s in split), sum(s.numel() for *_, s in repl)
    tp = groups.tp_size
    owns = groups.pp_rank == owner_pp
    with torch.no_grad():
        if owns:
            local = params[chunk]
            flat_split = torch.cat([local[n].detach().reshape(-1) for n, *_ in split]) if split else None
            flat_repl = torch.cat([local[n].detach().reshape(-1) for n, *_ in repl]) if repl else None
            if split and tp > 1:
                gathered = torch.empty(tp * n_split, dtype=dtype, device=device)
                dist.all_gather_into_tensor(gathered, flat_split, group=groups.tp_group)
            else:
                gathered = flat_split
        else:
            gathered = torch.empty(tp * n_split, dtype=dtype, device=device) if split else None
            flat_repl = torch.empty(n_repl, dtype=dtype, device=device) if repl else None
        if pp > 1:
            src = dist.get_global_rank(groups.pp_group, owner_pp)
            for buf in (gathered, flat_repl):
                if buf is not None:
                    dist.broadcast(buf, src=src, group=groups.pp_group)
        full: dict[str, torch.Tensor] = {}
        offset = 0
        per_rank = gathered.view(tp, n_split) if split else None
        for name, global_name, shape in split:
            n = shape.numel()
            full[global_name] = merge_tp_shards(name, [per_rank[r, offset : offset + n].view(shape) for r in range(tp)])
            offset += n
        offset = 0
        for _, global_name, shape in repl:
            n = shape.numel()
            full[global_name] = flat_repl[offset : offset + n].view(shape)
            offset += n
        out = []
        for u in bucket:
            for hf_name in u.hf_names:
                out.append((hf_name, hf_tensor_from_megatron(hf_name, full.__getitem__, arch, layer_spec=layer_spec)))
    return out
