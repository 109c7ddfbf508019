"""HF safetensors <-> Megatron distributed checkpoints for Qwen2-VL / Qwen2.5-VL, streamed.

Megatron format: megatron-core ``dist_checkpointing`` (``torch_dist`` backend), with the keys
megatron-core's own ``GPTModel.sharded_state_dict(prefix="language_model.")`` uses, plus the
replicated ``vision.*`` tensors:

* decoder layers are stacked along a leading layer axis: ``language_model.decoder.layers.<suffix>``
  of global shape ``(num_layers, ...)``, with the local spec's norms under their fused-TE names
  (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``), as mcore's
  ``sharded_state_dict_keys_map`` does;
* tensor-parallel tensors are stored as TP chunks of their global (unsharded) tensor; ``linear_fc1``
  as ``[gate ; up]`` (mcore's swiglu factory layout), ``linear_qkv`` in mcore's grouped layout;
* tied embeddings store only ``embedding.word_embeddings.weight`` (mcore maps the output layer to it).

Such a checkpoint has no fixed TP/PP: megatron-core loads it at any TP/PP (``tp_size`` here only
chooses how the tensors are chunked on disk), and :class:`MegatronCheckpointReader` reads any
region of it in one process. A JSON sidecar (``CHECKPOINT_META_FILE``) records the HF config and
the vocabulary padding so the checkpoint converts back without outside information.

Memory: HF tensors are read lazily (``safe_open``) one decoder layer at a time; each converted layer
is staged to disk and memory-mapped back, so the single ``dist_checkpointing.save`` call reads file
pages rather than holding the model in anonymous memory (each TP chunk is staged as its own
contiguous tensor: the ``torch_dist`` writer copies views and holds every copy until it writes).
Export reads one layer's regions at a time and writes safetensors tensor by tensor. Measured peaks
are in docs/benchmarks.md ("Checkpoint conversion"). Outputs are written to a temporary directory
and renamed into place, so an interrupted conversion leaves no half-written checkpoint.

Training checkpoints in the same format: ``dist_checkpointing.save(build_policy_sharded_state_dict(
policy, tp_rank=..., dp_rank=...), dir)`` on every rank, then :func:`write_checkpoint_meta` once.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_vrft.distributed.cpu_compat import apply_cpu_compat_patches
from megatron_vrft.distributed.parallel_state import init_distributed
from megatron_vrft.models.conversion_hf import (  # noqa: F401  (re-exported: the conversion API)
    HfCheckpointReader,
    check_hf_names,
    write_hf_checkpoint,
)
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch
from megatron_vrft.models.qwen2_vl.state_dict_adapter import (
    LM,
    VISION,
    ParamMapping,
    as_arch,
    find_megatron_mapping,
    hf_param_names,
    hf_tensor_from_megatron,
    hf_to_megatron_shard,
    iter_megatron_shard,
)
from megatron_vrft.storage import atomic_dir

CHECKPOINT_META_FILE = "megatron_vrft_checkpoint.json"
FORMAT_VERSION = 1
_LAYERS = LM + "decoder.layers."
# Linear layers whose (empty) ``_extra_state`` mcore's sharded_state_dict lists per decoder layer.
_EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


# ----------------------------------------------------------------------------------------------
# Megatron side: writing


def _mapping(name: str) -> tuple[ParamMapping, dict[str, str]]:
    found = find_megatron_mapping(name)
    if found is None:
        raise KeyError(f"{name!r} is not a Megatron parameter of the name table")
    return found


def megatron_checkpoint_key(name: str) -> tuple[str, int | None]:
    """Full module name (global layer index) -> (dist-checkpoint key, layer index or None)."""
    row, fields = _mapping(name)
    layer = fields.pop("layer", None)
    return row.checkpoint_key.format(**fields), None if layer is None else int(layer)


def _tp_chunks(
    name: str, tensor: torch.Tensor, *, tp_size: int
) -> list[tuple[torch.Tensor, tuple[int, int, int] | None]]:
    """``tensor`` (full, unsharded) cut into its stored TP chunks: ``(view, tp offset)``.

    The offset ``(axis without the layer axis, fragment index, fragments)`` is None for replicated
    tensors."""
    row, _ = _mapping(name)
    axis = row.tp_axis
    if axis is None or (tp_size == 1 and row.fusion != "gate_up"):
        return [(tensor, None)]
    if row.fusion == "gate_up":  # same layout as mcore's apply_swiglu_sharded_factory
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [
            *((c, (0, r, 2 * tp_size)) for r, c in enumerate(torch.chunk(gate, tp_size, dim=0))),
            *((c, (0, tp_size + r, 2 * tp_size)) for r, c in enumerate(torch.chunk(up, tp_size, dim=0))),
        ]
    return [(c, (axis, r, tp_size)) for r, c in enumerate(torch.chunk(tensor, tp_size, dim=axis))]


def _sharded_tensor(name: str, chunk: torch.Tensor, tp_offset: tuple[int, int, int] | None, *, num_layers: int) -> Any:
    from megatron.core.dist_checkpointing import ShardedTensor

    key, layer = megatron_checkpoint_key(name)
    prepend = ((0, layer, num_layers),) if layer is not None else ()
    n = len(prepend)
    offsets = (*prepend, (tp_offset[0] + n, tp_offset[1], tp_offset[2])) if tp_offset else prepend
    return ShardedTensor.from_rank_offsets(key, chunk, *offsets, replica_id=0, prepend_axis_num=n)


def _extra_state_objects(layer: int, num_layers: int) -> dict[str, Any]:
    from megatron.core.dist_checkpointing import ShardedObject

    return {
        f"{_LAYERS}{layer}.{m}._extra_state": ShardedObject(
            f"{_LAYERS}{m}._extra_state", None, (num_layers,), (layer,), replica_id=0
        )
        for m in _EXTRA_STATE_MODULES
    }


def save_megatron_checkpoint(
    get_hf_tensor: Callable[[str], torch.Tensor],
    arch: Qwen2VLArch | Any,
    out_dir: str | os.PathLike,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    vocab_padded_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a Megatron distributed checkpoint from HF tensors (``get_hf_tensor(hub_name)``).

    ``tp_size`` chooses the on-disk chunking; ``pp_size`` is only validated (a distributed checkpoint
    stores each layer separately, so every PP layout loads it). Needs ``torch.distributed``; a
    one-process gloo group is created (and destroyed) when none exists.
    """
    from megatron.core import dist_checkpointing

    from megatron_vrft.models.qwen2_vl.state_dict_adapter import _check_parallel, pipeline_layer_ranges

    a = as_arch(arch)
    vp = vocab_padded_size or a.vocab_size
    _check_parallel(a, tp_size, vp)
    pipeline_layer_ranges(a.num_layers, pp_size)
    num_layers = a.num_layers
    with (
        atomic_dir(out_dir, overwrite=overwrite) as tmp,
        tempfile.TemporaryDirectory(dir=Path(tmp).parent, prefix=".staging-") as staging,
    ):
        sharded: dict[str, Any] = {}
        for layer in tqdm(range(num_layers), desc="HF -> Megatron", unit="layer", disable=not progress):
            # The one-layer "pipeline stage" `layer` of a num_layers-stage split is exactly this
            # layer (plus vision/embedding on the first, final norm/output on the last), unsharded.
            # Global names; a tied output layer's copy of the embedding is not stored (no HF tensor).
            part = {
                b.global_megatron: t
                for b, t in iter_megatron_shard(
                    get_hf_tensor, a, tp_rank=0, tp_size=1, pp_rank=layer, pp_size=num_layers, vocab_padded_size=vp
                )
                if b.hf
            }
            # Each chunk becomes its own contiguous storage: the writer would otherwise copy views,
            # all at once. The original tensor is dropped as soon as it is cut.
            staged, offsets = {}, {}
            for name in list(part):
                for i, (chunk, tp_offset) in enumerate(_tp_chunks(name, part.pop(name), tp_size=tp_size)):
                    staged[f"{name}#{i}"] = chunk.clone(memory_format=torch.contiguous_format)
                    offsets[f"{name}#{i}"] = (name, tp_offset)
            path = Path(staging) / f"layer{layer:05d}.pt"
            torch.save(staged, path)
            del staged, part
            # Memory-mapped: the writer reads file pages, which the kernel can drop, not anonymous memory.
            for entry, tensor in torch.load(path, mmap=True, weights_only=True).items():
                name, tp_offset = offsets[entry]
                sharded[entry] = _sharded_tensor(name, tensor, tp_offset, num_layers=num_layers)
            sharded.update(_extra_state_objects(layer, num_layers))
        with _process_group():
            apply_cpu_compat_patches()
            dist_checkpointing.save(sharded, str(tmp))
        del sharded
        write_checkpoint_meta(tmp, a, vocab_padded_size=vp)
    return Path(out_dir)


def write_checkpoint_meta(
    ckpt_dir: str | os.PathLike, arch: Qwen2VLArch | Any, *, vocab_padded_size: int | None = None
) -> None:
    """Write the JSON sidecar (HF config, vocabulary padding) into a distributed checkpoint directory.

    The converter writes it itself; a trainer saving with :func:`build_policy_sharded_state_dict`
    calls this once (rank 0) so the checkpoint converts back to HF without outside information.
    """
    a = as_arch(arch)
    meta = {
        "format_version": FORMAT_VERSION,
        "hf_config": a.hf_config.to_dict(),
        "vocab_padded_size": vocab_padded_size or a.vocab_size,
    }
    (Path(ckpt_dir) / CHECKPOINT_META_FILE).write_text(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------------------------
# Megatron side: reading any region in one process


class MegatronCheckpointReader:
    """Reads full tensors (or single layers of stacked ones) from a distributed checkpoint.

    Uses torch.distributed.checkpoint's reader with a planner that fetches only the requested
    region, so one process can read a checkpoint written by any number of ranks at any TP/PP.
    """

    def __init__(self, ckpt_dir: str | os.PathLike) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(ckpt_dir)
        meta_path = self.path / CHECKPOINT_META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} missing: not a checkpoint written by megatron_vrft")
        self.meta = json.loads(meta_path.read_text())
        self.arch = as_arch(self.meta["hf_config"])
        self.vocab_padded_size: int = self.meta["vocab_padded_size"]
        self._reader = FileSystemReader(str(self.path))
        self._md = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self._md, True)
        self._layer_cache: tuple[int | None, dict[str, torch.Tensor]] = (None, {})

    def keys(self) -> list[str]:
        """Checkpoint keys of the stored tensors."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return [k for k, v in self._md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]

    def read(
        self, key: str, offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Region ``[offsets, offsets + sizes)`` of checkpoint tensor ``key`` (whole tensor by default)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self._md.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"Megatron checkpoint key {key!r} missing from {self.path}")
        offsets = tuple(offsets or (0,) * len(md.size))
        sizes = tuple(sizes or md.size)
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [chunk])
        self._reader.read_data(_RegionLoadPlan(items), _RegionPlanner(dest)).wait()
        return dest

    def get_megatron(self, name: str) -> torch.Tensor:
        """Full tensor of a module name with a GLOBAL layer index (``language_model.decoder.layers.{L}.…``).

        Tensors of the current layer are cached (q, k and v share one fused read)."""
        key, layer = megatron_checkpoint_key(name)
        if layer is None:
            return self.read(key)
        cached_layer, cache = self._layer_cache
        if cached_layer != layer:
            cache = {}
            self._layer_cache = (layer, cache)
        if name not in cache:
            md = self._md.state_dict_metadata.get(key)
            if md is None:
                raise KeyError(f"Megatron checkpoint key {key!r} missing from {self.path}")
            cache[name] = self.read(key, (layer,) + (0,) * (len(md.size) - 1), (1, *md.size[1:]))[0]
        return cache[name]

    def hf_tensor(self, name: str) -> torch.Tensor:
        """One HF tensor by hub name (vocabulary padding dropped)."""
        return hf_tensor_from_megatron(name, self.get_megatron, self.arch)

    def iter_hf(self, *, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Every HF tensor, in order, one layer in memory at a time."""
        for name in tqdm(hf_param_names(self.arch), desc="Megatron -> HF", unit="tensor", disable=not progress):
            yield name, self.hf_tensor(name)

    def load_shard(
        self,
        *,
        tp_rank: int,
        tp_size: int,
        pp_rank: int,
        pp_size: int,
        layer_spec: str = "local",
        vocab_padded_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The ``(tp_rank, pp_rank)`` shard at any TP/PP (resharding), as ``hf_to_megatron_shard`` names it."""
        return hf_to_megatron_shard(
            self.hf_tensor,
            self.arch,
            tp_rank=tp_rank,
            tp_size=tp_size,
            pp_rank=pp_rank,
            pp_size=pp_size,
            layer_spec=layer_spec,
            vocab_padded_size=vocab_padded_size or self.vocab_padded_size,
        )


class _RegionLoadPlan:
    """A minimal LoadPlan (only ``items`` is read by FileSystemReader.read_data)."""

    def __init__(self, items: list) -> None:
        self.items = items
        self.storage_data = None
        self.planner_data = None


class _RegionPlanner:
    """Writes every read item into ``dest`` (the requested region) at its destination offsets."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest

    def resolve_tensor(self, read_item: Any) -> torch.Tensor:
        region = self.dest
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            region = region.narrow(dim, start, length)
        return region

    def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise RuntimeError("unexpected non-tensor item in a region read")


# ----------------------------------------------------------------------------------------------
# End-to-end conversions


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    vocab_padded_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """HF safetensors directory -> Megatron distributed checkpoint (see module docstring)."""
    reader = HfCheckpointReader(hf_dir)
    arch = as_arch(reader.config())
    check_hf_names(reader.names(), arch)
    return save_megatron_checkpoint(
        reader.get,
        arch,
        out_dir,
        tp_size=tp_size,
        pp_size=pp_size,
        vocab_padded_size=vocab_padded_size,
        overwrite=overwrite,
        progress=progress,
    )


def convert_megatron_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 4 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Megatron distributed checkpoint (any TP/PP) -> HF safetensors directory with hub names."""
    reader = MegatronCheckpointReader(ckpt_dir)
    return write_hf_checkpoint(
        reader.iter_hf(progress=progress),
        out_dir,
        config=reader.meta["hf_config"],
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )


def reshard_megatron_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tp_size: int,
    pp_size: int = 1,
    vocab_padded_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Rewrite a checkpoint with another on-disk TP chunking and/or vocabulary padding."""
    reader = MegatronCheckpointReader(src_dir)
    return save_megatron_checkpoint(
        reader.hf_tensor,
        reader.arch,
        out_dir,
        tp_size=tp_size,
        pp_size=pp_size,
        vocab_padded_size=vocab_padded_size or reader.vocab_padded_size,
        overwrite=overwrite,
        progress=progress,
    )


# ----------------------------------------------------------------------------------------------
# Plumbing


@contextmanager
def _process_group() -> Iterator[None]:
    """dist_checkpointing.save needs torch.distributed: a one-process gloo group when none exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    init_distributed("gloo", world_of_one=True)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_policy_sharded_state_dict(policy: Any, *, tp_rank: int, dp_rank: int, prefix: str = "") -> dict[str, Any]:
    """The sharded state dict of a ``Qwen2VLPolicy`` stage in this checkpoint format.

    ``language_model`` uses megatron-core's own ``sharded_state_dict``; the vision tower (stage 0
    only, replicated over TP and DP) is stored once, by the ``tp_rank == dp_rank == 0`` replica.
    Parameters are kept as they are (not detached) so a megatron-core optimizer's
    ``sharded_state_dict`` finds them. ``prefix`` goes into the checkpoint keys only (a second model
    in the same checkpoint, e.g. the trainer's reference); the dict keys stay the policy's own
    ``state_dict`` names, so ``policy.load_state_dict`` takes what ``dist_checkpointing.load``
    returns. Use with ``megatron.core.dist_checkpointing.save`` / ``load`` to save or resume
    training in the format the converter reads and writes.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    lm = policy.language_model.sharded_state_dict(prefix=prefix + LM)
    sharded = {k[len(prefix) :]: v for k, v in lm.items()}
    if getattr(policy, "vision", None) is not None:
        for name, tensor in policy.vision.state_dict(keep_vars=True).items():
            sharded[VISION + name] = ShardedTensor.from_rank_offsets(
                prefix + VISION + name, tensor, replica_id=(0, tp_rank, dp_rank)
            )
    return sharded
