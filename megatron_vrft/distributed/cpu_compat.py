"""Make megatron-core run on machines without CUDA (gloo, CPU tensors): the one place for patches.

megatron-core hard-codes CUDA in a few places that tiny CPU runs (tests, CI) go through. Instead of
monkey-patching ``torch`` itself (which would change every library in the process), each affected
megatron module gets its own view of ``torch``: a proxy that forwards everything to the real
``torch`` except

- ``torch.cuda.current_device()`` -> ``torch.device("cpu")`` (it is used as a *device* argument),
- ``torch.cuda.synchronize()`` -> no-op,
- ``torch.cuda.current_stream()`` -> a stream whose ``wait_event``/``wait_stream`` are no-ops,
- ``torch.cuda.get_rng_state / set_rng_state / manual_seed`` -> the CPU generator's,
- tensor factories (``zeros``, ``ones``, ``empty``, ``full``, ``arange``, ``tensor``) called with
  ``device="cuda"`` (or a CUDA ``torch.device``) -> created on the CPU.

Patched behaviours (megatron-core 0.16.1 and 0.19.2: the same hard-codes in both), each with a test in
``tests/distributed/test_distributed_cpu_compat.py``:

1. ``models/common/embeddings/rotary_pos_embedding.py``: ``RotaryEmbedding.get_emb`` moves
   ``inv_freq`` to ``torch.cuda.current_device()``; ``MultimodalRotaryEmbedding.__init__`` builds
   ``inv_freq`` there.
2. ``tensor_parallel/mappings.py``: the all-gather helpers allocate their output on
   ``torch.cuda.current_device()``.
3. ``tensor_parallel/random.py``: the model-parallel RNG tracker (``add``/``fork``) saves and
   restores CUDA generator states; here it forks the CPU generator instead (dropout on CPU tensors
   draws from the CPU generator, so this is the state that matters).
4. ``transformer/utils.py``: the default causal masks are built with ``device="cuda"``.
5. ``pipeline_parallel/schedules.py``: token counters ``torch.zeros(..., device="cuda")``.
6. ``pipeline_parallel/p2p_communication.py``: shape-exchange tensors on
   ``torch.cuda.current_device()`` and ``torch.cuda.synchronize()`` after batched send/recv.
7. ``utils.py``: ``GlobalMemoryBuffer.get_tensor`` (the local attention's matmul buffer) allocates
   on ``torch.cuda.current_device()``.
8. ``models/common/language_module/language_module.py``:
   ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied embedding to CUDA with
   ``weight.data.cuda()`` (tied embeddings with PP > 1) before all-reducing it over the embedding
   group. A tensor *method* cannot be redirected through a module's ``torch``, so this one method
   is wrapped: during the call ``Tensor.cuda`` returns the tensor unchanged.
9. ``dist_checkpointing/strategies/{filesystem_async,state_dict_saver,async_utils}.py``: the
   checkpoint writer calls ``torch.cuda.synchronize()`` in ``preload_tensors`` (every save) and
   builds small bookkeeping tensors on ``torch.cuda.current_device()``.

10. ``distributed/{param_and_grad_buffer,distributed_data_parallel}.py``: megatron's DDP allocates
    its contiguous parameter/gradient buffers on ``torch.cuda.current_device()``; from 0.17 on,
    ``start_grad_sync`` also waits on ``torch.cuda.current_stream()`` for CUDA-graph events.
11. ``optimizer/{optimizer,clip_grads}.py``: CUDA overflow/norm buffers, and
    ``clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``;
    during that one function a CPU float32 tensor reports the CUDA type name (a tensor method, so
    the function is wrapped, as in 8).

Known CUDA hard-codes NOT patched (not on any path the project runs): the distributed optimizer,
``models/common/embeddings/rope_utils.py`` (context-parallel index ``.cuda()``),
``transformer/attention.py`` / ``gpt_model.py`` (inference KV caches),
``transformer/transformer_layer.py`` (CUDA-graph paths), ``multi_token_prediction.py``.

Policy: patches apply only when ``torch.cuda.is_available()`` is False. They were verified on the
megatron-core versions in ``VERIFIED_MEGATRON_CORE_VERSIONS``; on another version they are still
applied with a ``RuntimeWarning``, and a
patch target that no longer exists raises ``RuntimeError`` naming it, so a changed megatron-core
fails loudly rather than silently running a half-patched model. Applying twice is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
import warnings
from typing import Any

import torch

# The versions the whole suite ran on: 0.16.1 (Python 3.11, the CPU target) and 0.19.2 (Python 3.12,
# the GPU-host target; its CI leg runs on the CPU). Both are pinned in constraints/*.txt.
VERIFIED_MEGATRON_CORE_VERSIONS = ("0.16.1", "0.19.2")

# Modules whose global name ``torch`` is replaced by a CPU-redirecting proxy.
PATCHED_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
)

_PATCH_MARK = "_megatron_vrft_cpu_compat"
_FACTORIES = ("zeros", "ones", "empty", "full", "arange", "tensor", "randn", "rand")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int)  # a bare CUDA ordinal


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    return factory


class _NullStream:
    """Stands in for a CUDA stream: CPU work is synchronous, so waiting is a no-op."""

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _CpuCuda(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` inside a patched module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside a patched module; everything else forwards to torch."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _patch_language_module() -> None:
    from megatron.core.models.common.language_module import language_module

    cls = language_module.LanguageModule
    method = getattr(cls, "setup_embeddings_and_output_layer", None)
    if method is None:
        raise RuntimeError("cpu_compat: LanguageModule.setup_embeddings_and_output_layer is gone")
    if getattr(method, _PATCH_MARK, False):
        return

    @functools.wraps(method)
    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return method(self, *args, **kwargs)

    setattr(setup_embeddings_and_output_layer, _PATCH_MARK, True)
    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


@contextlib.contextmanager
def _cpu_float_reports_cuda_type():
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        return "torch.cuda.FloatTensor" if not args and not kwargs and name == "torch.FloatTensor" else name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _patch_clip_grads() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    fn = getattr(clip_grads, "clip_grad_by_total_norm_fp32", None)
    if fn is None or getattr(optimizer, "clip_grad_by_total_norm_fp32", None) is None:
        raise RuntimeError("cpu_compat: clip_grad_by_total_norm_fp32 is gone; re-verify the patch")
    if getattr(fn, _PATCH_MARK, False):
        return

    @functools.wraps(fn)
    def clip_grad_by_total_norm_fp32(*args, **kwargs):
        with _cpu_float_reports_cuda_type():
            return fn(*args, **kwargs)

    setattr(clip_grad_by_total_norm_fp32, _PATCH_MARK, True)
    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def megatron_core_version() -> str:
    """megatron-core's public version: 0.19+ append ``+<git hash>`` to ``__version__`` when imported
    from inside any git work tree (a virtual environment in a clone, as in CI); that suffix is dropped."""
    from megatron.core import __version__ as version
    from packaging.version import Version

    return Version(version).public


def _check_version() -> str:
    version = megatron_core_version()
    if version not in VERIFIED_MEGATRON_CORE_VERSIONS:
        warnings.warn(
            f"megatron_vrft CPU patches were verified on megatron-core "
            f"{VERIFIED_MEGATRON_CORE_VERSIONS}, found {version}; applying them anyway",
            RuntimeWarning,
            stacklevel=3,
        )
    return version


def is_cpu_compat_applied() -> bool:
    """True when every module in ``PATCHED_MODULES`` carries the CPU proxy."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    return (
        all(getattr(importlib.import_module(name), _PATCH_MARK, False) for name in PATCHED_MODULES)
        and getattr(LanguageModule.setup_embeddings_and_output_layer, _PATCH_MARK, False)
        and getattr(
            importlib.import_module("megatron.core.optimizer.clip_grads").clip_grad_by_total_norm_fp32,
            _PATCH_MARK,
            False,
        )
    )


def apply_cpu_compat_patches(*, force: bool = False) -> bool:
    """Patch megatron-core for CPU tensors; returns True when patches are (now) in place.

    Does nothing (returns False) when CUDA is available, unless ``force`` (tests only). Idempotent.
    """
    if torch.cuda.is_available() and not force:
        return False
    _check_version()
    proxy = _CpuTorch()
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, _PATCH_MARK, False):
            continue
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"cpu_compat: {name} no longer imports torch as 'torch'")
        if name.endswith("tensor_parallel.random"):
            for attr in ("_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker"):
                if not hasattr(module, attr):
                    raise RuntimeError(f"cpu_compat: {name}.{attr} is gone; re-verify the patch")
            module._get_cuda_rng_state = _cpu_get_rng_state
            module._set_cuda_rng_state = _cpu_set_rng_state
        module.torch = proxy
        setattr(module, _PATCH_MARK, True)
    _patch_language_module()
    _patch_clip_grads()
    return True
