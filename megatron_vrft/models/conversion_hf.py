"""HF safetensors checkpoints, streamed: a lazy reader (hub or in-memory names) and a tensor-by-tensor
writer (sharded safetensors + index + ``config.json``), both used by :mod:`megatron_vrft.models.conversion`.

Outputs are written into a temporary sibling directory and renamed into place on success, so an
interrupted conversion leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch
from megatron_vrft.models.qwen2_vl.state_dict_adapter import as_arch, hf_hub_name, hf_param_names
from megatron_vrft.storage import atomic_dir


class HfCheckpointReader:
    """Lazy reader of an HF safetensors checkpoint (one file or a sharded index), by hub name."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors or model.safetensors.index.json in {self.path}")
            weight_map = {}
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        if not weight_map:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._where: dict[str, tuple[str, str]] = {}
        for stored, f in weight_map.items():
            hub = hf_hub_name(stored)
            if hub in self._where:
                raise ValueError(f"HF checkpoint {self.path} holds {hub!r} twice (as {stored!r})")
            self._where[hub] = (f, stored)

    def names(self) -> list[str]:
        """Hub names of every tensor in the checkpoint."""
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor by hub (or in-memory) name; ``KeyError`` naming it when absent."""
        hub = hf_hub_name(name)
        if hub not in self._where:
            raise KeyError(f"HF tensor {hub!r} missing from {self.path}")
        f, stored = self._where[hub]
        return self._handles[f].get_tensor(stored)

    def config(self) -> dict:
        """``config.json`` as a dict."""
        return json.loads((self.path / "config.json").read_text())


def check_hf_names(names: Iterable[str], arch: Qwen2VLArch | Any) -> None:
    """Raise ``ValueError`` listing missing and unexpected HF tensor names (hub naming)."""
    a = as_arch(arch)
    have = {hf_hub_name(n) for n in names}
    expected = set(hf_param_names(a))
    missing = sorted(expected - have)
    # A tied checkpoint may carry a redundant lm_head copy; it is ignored.
    unexpected = sorted(have - expected - ({"lm_head.weight"} if a.tie_word_embeddings else set()))
    if missing or unexpected:
        raise ValueError(
            f"HF checkpoint does not match the {a.family} config: missing {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


class _SafetensorsShardWriter:
    """Writes one safetensors file tensor by tensor, holding none of them.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
    data_offsets; padded with spaces to 8 bytes) and the raw little-endian row-major data. The
    header needs every tensor's offsets, so data goes to a side file first and is copied behind the
    header on :meth:`close` (a disk copy, no memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data_path = path.with_suffix(".data")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, Any] = {}
        self.num_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors code")
        t = tensor.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._data.write(memoryview(raw))
        size = t.numel() * t.element_size()
        self._header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.num_bytes, self.num_bytes + size],
        }
        self.num_bytes += size

    def close(self) -> list[str]:
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        os.remove(self._data_path)
        return list(self._header)


def write_hf_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    config: dict,
    max_shard_bytes: int = 4 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write ``(hub name, tensor)`` pairs as safetensors shards + index + ``config.json``, atomically.

    Each tensor goes to disk as it arrives (memory holds only the tensor being written); a shard
    closes before the tensor that would take it past ``max_shard_bytes``.
    """
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        files: list[tuple[str, list[str]]] = []
        seen: set[str] = set()
        writer: _SafetensorsShardWriter | None = None
        total = 0
        for name, t in tensors:
            if name in seen:
                raise ValueError(f"tensor {name!r} written twice")
            seen.add(name)
            size = t.numel() * t.element_size()
            if writer is not None and writer.num_bytes and writer.num_bytes + size > max_shard_bytes:
                files.append((writer.path.name, writer.close()))
                writer = None
            if writer is None:
                writer = _SafetensorsShardWriter(tmp / f"part-{len(files) + 1:05d}.safetensors")
            writer.add(name, t)
            total += size
        if writer is not None:
            files.append((writer.path.name, writer.close()))
        weight_map = {}
        for i, (name, keys) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.rename(tmp / name, tmp / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)
