"""Move trainer state out of accelerator memory while the colocated engine generates, and back.

What moves is chosen by kind: ``params`` (the model chunks' parameters), ``grads`` (megatron DDP's
contiguous gradient buffers) and ``optimizer`` (Adam moments and fp32 master weights). Offloading
copies each tensor into (pinned, with CUDA) CPU memory and releases its device storage in place
(``untyped_storage().resize_(0)``), so every reference to the tensor (DDP buckets, optimizer
param groups) stays valid; onloading re-allocates the storage and copies back: a bit-identical
round trip. On a machine without a GPU the same mechanism runs (CPU -> CPU), which is how it is
tested; the trainer uses it only when the policy lives on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

OFFLOAD_KINDS = ("params", "grads", "optimizer")


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if t.numel() and key not in seen:
            seen.add(key)
            out.append(t)
    return out


def trainer_tensors(chunks: Sequence[torch.nn.Module], optimizer=None) -> dict[str, list[torch.Tensor]]:
    """The tensors of each kind: parameters, DDP gradient buffers, optimizer state."""
    params = _unique(p.data for c in chunks for p in c.parameters())
    grads = []
    for c in chunks:
        for buffer in getattr(c, "buffers", []) or []:  # megatron DDP's _ParamAndGradBuffer list
            if getattr(buffer, "grad_data", None) is not None:
                grads.append(buffer.grad_data)
        grads.extend(p.main_grad for p in c.parameters() if getattr(p, "main_grad", None) is not None)
    states = []
    inner = getattr(optimizer, "chained_optimizers", None) or ([optimizer] if optimizer is not None else [])
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", opt)
        for state in torch_opt.state.values():
            states.extend(v for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        for group in getattr(opt, "fp32_from_float16_groups", []) or []:
            states.extend(p.data for p in group)
    return {"params": params, "grads": _unique(grads), "optimizer": _unique(states)}


@dataclass
class Offloader:
    """Offloads and restores tensors by kind; ``offload`` returns the bytes it released."""

    tensors: dict[str, list[torch.Tensor]]
    _saved: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def offload(self, kinds: Iterable[str]) -> int:
        released = 0
        pin = torch.cuda.is_available()
        for kind in kinds:
            if kind not in OFFLOAD_KINDS:
                raise ValueError(f"unknown offload kind {kind!r}; expected one of {OFFLOAD_KINDS}")
            if kind in self._saved:
                continue
            saved = []
            for t in self.tensors[kind]:
                storage = t.untyped_storage()
                host = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu", pin_memory=pin)
                host.copy_(torch.tensor([], dtype=torch.uint8, device=t.device).set_(storage), non_blocking=pin)
                saved.append(host)
            if pin:
                torch.cuda.synchronize()
            for t, host in zip(self.tensors[kind], saved):
                released += host.numel()
                t.untyped_storage().resize_(0)
            self._saved[kind] = saved
        return released

    def onload(self, kinds: Iterable[str] | None = None) -> None:
        for kind in list(self._saved) if kinds is None else kinds:
            saved = self._saved.pop(kind, None)
            if saved is None:
                continue
            for t, host in zip(self.tensors[kind], saved):
                storage = t.untyped_storage()
                storage.resize_(host.numel())
                torch.tensor([], dtype=torch.uint8, device=t.device).set_(storage).copy_(host)
