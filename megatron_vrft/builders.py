"""Config sections -> the objects they describe: the one place each component is built from config.

The trainer and every tool build their data, tokenizer, processor, rollout engine, sampling and
loss settings here, so a component is configured the same way wherever it runs. Only ``trainer/``
and ``tools/`` import this module (the layers below take explicit arguments, never config objects).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from megatron_vrft.config import ConfigError
from megatron_vrft.config.schema import (
    AlgorithmConfig,
    DataConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
)
from megatron_vrft.data import (
    PreprocessedExample,
    RecordSet,
    build_qwen2vl_processor,
    build_tiny_tokenizer,
    load_records,
    load_tokenizer,
    preprocess_records,
)
from megatron_vrft.data.tokenizer import stop_token_ids
from megatron_vrft.rollout.engine import RolloutEngine, resolve_engine_name, vision_token_ids
from megatron_vrft.rollout.engine import build_engine as build_engine_by_name
from megatron_vrft.rollout.types import SamplingParams

logger = logging.getLogger(__name__)

Split = Literal["train", "eval"]
EVAL_SEED_OFFSET = 10_007
"""A synthetic task's held-out split is the same generator under ``data.seed + EVAL_SEED_OFFSET``."""


# -- tokenizer, processor, data ----------------------------------------------------------------------


def build_tokenizer(model: ModelConfig):
    """The checkpoint's tokenizer (``model.hf_path``), or the built-in tiny one."""
    return build_tiny_tokenizer() if model.hf_path is None else load_tokenizer(model.hf_path)


def build_processor(tokenizer, data: DataConfig):
    """The Qwen2-VL image + text processor at the data section's pixel budget."""
    return build_qwen2vl_processor(tokenizer, min_pixels=data.min_pixels, max_pixels=data.max_pixels)


def has_eval_split(data: DataConfig) -> bool:
    """Whether the run has held-out prompts: ``data.eval_path``, or a fresh seed of a synthetic task."""
    return data.eval_path is not None or data.source == "synthetic"


def build_records(data: DataConfig, *, split: Split = "train") -> RecordSet:
    """The records of ``split``: ``train`` is ``data.path`` (k-shot, categories); ``eval`` is
    ``data.eval_path`` (every record) or, for a synthetic task, the generator under a fresh seed.
    Bad records raise or are skipped and counted, as ``data.on_error`` says."""
    path, k_shot, seed = data.path, data.k_shot, data.seed
    if split == "eval":
        if not has_eval_split(data):
            raise ConfigError("data.eval_path", None, "a held-out split (the run has no evaluation prompts)")
        if data.eval_path is not None:
            path, k_shot = data.eval_path, None
        else:
            seed = data.seed + EVAL_SEED_OFFSET
    return load_records(
        data.source, data.task, path=path, image_root=data.image_root, box_space=data.coord_space,
        annotation_coord_space=data.annotation_coord_space, k_shot=k_shot, categories=data.categories,
        num_synthetic=data.num_synthetic, synthetic_kind=data.synthetic_kind, seed=seed, on_error=data.on_error,
    )  # fmt: skip


def build_examples(
    data: DataConfig, processor, records: RecordSet, *, on_error: str | None = None, report: bool = True
) -> list[PreprocessedExample]:
    """``records`` preprocessed for the model (images, prompt tokens, ground truth in the model's
    box space). ``on_error`` overrides ``data.on_error`` (evaluation skips unreadable images and
    counts them as missing answers); skipped records are logged once when ``report``."""
    examples, skips = preprocess_records(
        records, processor, box_space=data.coord_space, on_error=on_error or data.on_error
    )
    skips.merge(records.skips)
    if skips.total and report:
        logger.warning("data: skipped %d bad records: %s", skips.total, skips.summary())
    return examples


# -- rollout -----------------------------------------------------------------------------------------


def resolve_engine(rollout: RolloutConfig, *, name: str | None = None) -> str:
    """The engine this run uses (``rollout.engine``, or ``name`` when a tool overrides it): 'auto'
    resolved and availability checked, once. Raises ConfigError naming the field."""
    requested = name or rollout.engine
    try:
        return resolve_engine_name(requested)
    except ValueError as exc:
        raise ConfigError("rollout.engine", requested, str(exc)) from None


def build_engine(
    engine_name: str,
    rollout: RolloutConfig,
    data: DataConfig,
    arch: Any,
    tokenizer: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> RolloutEngine:
    """The rollout engine ``engine_name`` (from :func:`resolve_engine`) for ``arch``; weights arrive
    by ``update_weights``. vLLM takes its options from ``rollout.vllm``."""
    options: dict[str, Any] = {}
    if engine_name == "vllm":
        v = rollout.vllm
        options = dict(
            tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
            enable_sleep=device.type == "cuda", seed=seed, min_pixels=data.min_pixels, max_pixels=data.max_pixels,
        )  # fmt: skip
    return build_engine_by_name(
        engine_name, arch, tokenizer=tokenizer, blocked_token_ids=vision_token_ids(tokenizer, arch.vocab_size),
        device=device, dtype=dtype, **options,
    )  # fmt: skip


def build_sampling(rollout: RolloutConfig, tokenizer, *, greedy: bool = False) -> SamplingParams:
    """Sampling of training rollouts (``rollout.*``), or with ``greedy`` one greedy answer per
    prompt (evaluation) with the same response budget and stop tokens."""
    stops = stop_token_ids(tokenizer)
    if greedy:
        return SamplingParams(n=1, greedy=True, max_new_tokens=rollout.max_new_tokens, stop_token_ids=stops)
    return SamplingParams(
        n=rollout.num_generations, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
        max_new_tokens=rollout.max_new_tokens, stop_token_ids=stops,
    )  # fmt: skip


def default_device() -> torch.device:
    """This rank's accelerator, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# -- rewards, evaluation, loss ---------------------------------------------------------------------


def reward_terms(reward: RewardConfig) -> tuple[list[tuple[str, float]], dict[str, dict[str, Any]]]:
    """``compute_rewards`` arguments: (names, weights) and per-reward options."""
    terms = [(t.name, t.weight) for t in reward.terms]
    names = {n for n, _ in terms}
    options: dict[str, dict[str, Any]] = {}
    if "accuracy" in names:
        options["accuracy"] = {"mode": reward.classification_mode}
    for name in ("iou", "confidence"):
        if name in names:
            options[name] = {"matching": reward.matching, "iou_threshold": reward.iou_threshold}
    return terms, options


def eval_options(data: DataConfig, reward: RewardConfig) -> dict[str, Any]:
    """``evaluate_completions`` options of the task (the classification matching rule)."""
    return {"mode": reward.classification_mode} if data.task == "classification" else {}


def grpo_loss_options(algorithm: AlgorithmConfig) -> dict[str, Any]:
    """``rl.compute_grpo_loss`` keyword arguments: the config fields carry the rl/ names."""
    a = algorithm
    return dict(
        policy_loss=a.policy_loss, loss_agg_mode=a.loss_agg_mode, clip_eps_low=a.clip_eps_low,
        clip_eps_high=a.clip_eps_high, clip_ratio_c=a.clip_ratio_c, kl_estimator=a.kl_estimator,
        kl_coef=a.kl_coef, kl_clamp=a.kl_clamp, kl_importance_weighted=a.kl_importance_weighted,
    )  # fmt: skip


def rollout_correction_options(algorithm: AlgorithmConfig) -> dict[str, Any] | None:
    """``rl.compute_rollout_correction`` keyword arguments, or None when it is off."""
    a = algorithm
    if a.rollout_correction == "none":
        return None
    return dict(level=a.rollout_correction, mode=a.rollout_correction_mode, threshold=a.rollout_correction_threshold)
