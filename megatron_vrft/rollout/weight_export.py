"""Megatron TP/PP shards -> HF-named full tensors, streamed in buckets to every rank.

One bucket at a time (whole layers, up to ``bucket_bytes`` of this rank's shard bytes), every rank
of a model-parallel group runs the same collectives:

1. the ranks of the pipeline stage owning the bucket pack their shards into one flat buffer and
   all-gather it over the TP group (TP-replicated tensors, e.g. the vision tower, travel once);
2. the owning stage broadcasts the gathered buffers over the PP group;
3. each rank merges the TP shards (``state_dict_adapter.merge_tp_shards``) and unfuses QKV and
   gate/up into HF tensors (``unfuse_megatron_tensor``).

Names, TP axes and fusions come from the adapter's name table (``expand_param_table``), shapes from
``megatron_param_shapes``, so ranks that do not own a bucket know what to receive. Peak extra memory
is one gathered bucket plus its HF tensors, not the model. Consumers: every engine's
``update_weights`` and the HF checkpoint writer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_vrft.distributed.parallel_state import ParallelGroups
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch
from megatron_vrft.models.qwen2_vl.state_dict_adapter import (
    BoundParam,
    expand_param_table,
    hf_export_order,
    hf_param_names,
    megatron_param_shapes,
    merge_tp_shards,
    unfuse_megatron_tensor,
)


@dataclass(kw_only=True)
class _Unit:
    """Tensors that export together: a layer, or the stage's head (vision + embedding) or tail."""

    stage: int
    """Virtual pipeline stage that owns it."""
    params: list[BoundParam]
    """Its parameters on the owning chunk (name-table rows)."""
    shapes: list[torch.Size]
    """Their shard shapes."""
    hf_names: list[str]
    """HF hub names computed from this unit, in export order."""

    def nbytes(self, element_size: int) -> int:
        return sum(s.numel() for s in self.shapes) * element_size


def _plan_units(arch: Qwen2VLArch, tp: int, num_stages: int, layer_spec: str) -> list[_Unit]:
    units: list[_Unit] = []
    for stage in range(num_stages):
        shapes = megatron_param_shapes(arch, tp_size=tp, pp_size=num_stages, pp_rank=stage, layer_spec=layer_spec)
        groups: dict[tuple[str, int | None], list[BoundParam]] = {}
        for b in expand_param_table(arch, layer_spec=layer_spec, pp_rank=stage, pp_size=num_stages):
            groups.setdefault((b.mapping.placement, b.layer), []).append(b)
        for params in groups.values():
            hf = hf_export_order([n for b in params for n in b.hf])
            units.append(_Unit(stage=stage, params=params, shapes=[shapes[b.megatron] for b in params], hf_names=hf))
    covered = [n for u in units for n in u.hf_names]
    if sorted(covered) != sorted(hf_param_names(arch)):
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
        yield _export_bucket(bucket, arch, groups, params, dtype=dtype, device=device, pp=pp)


def _export_bucket(bucket, arch, groups, params, *, dtype, device, pp) -> list[tuple[str, torch.Tensor]]:
    stage = bucket[0].stage
    owner_pp, chunk = stage % pp, stage // pp
    entries = [(b, s) for u in bucket for b, s in zip(u.params, u.shapes)]
    split = [e for e in entries if e[0].mapping.tp_axis is not None]
    repl = [e for e in entries if e[0].mapping.tp_axis is None]
    n_split, n_repl = sum(s.numel() for _, s in split), sum(s.numel() for _, s in repl)
    tp = groups.tp_size
    owns = groups.pp_rank == owner_pp
    with torch.no_grad():
        if owns:
            local = params[chunk]
            flat_split = torch.cat([local[b.megatron].detach().reshape(-1) for b, _ in split]) if split else None
            flat_repl = torch.cat([local[b.megatron].detach().reshape(-1) for b, _ in repl]) if repl else None
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
        hf: dict[str, torch.Tensor] = {}
        for group, flat, ranks in ((split, gathered, tp), (repl, flat_repl, 1)):
            per_rank = flat.view(ranks, -1) if group else None
            offset = 0
            for b, shape in group:
                n = shape.numel()
                full = merge_tp_shards(b.megatron, [per_rank[r, offset : offset + n].view(shape) for r in range(ranks)])
                offset += n
                # Unfused parts are copies (as hf_tensor_from_megatron returns them).
                parts = unfuse_megatron_tensor(b.mapping, full, arch)
                hf.update((name, t.clone() if b.mapping.fusion else t) for name, t in zip(b.hf, parts))
        out = [(name, hf[name]) for u in bucket for name in u.hf_names]
    return out
