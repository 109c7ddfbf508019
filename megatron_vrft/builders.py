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
        data.source,
        data.task,
        path=path,
        image_root=data.image_root,
        box_space=data.coord_space,
        annotation_coord_space=data.annotation_coord_space,
        k_shot=k_shot,
        categories=data.categories,
        num_synthetic=data.num_synthetic,
        synthetic_kind=data.synthetic_kind,
        seed=seed,
        on_error=data.on_error,
    )


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
            tensor_parallel_size=v.tensor_parallel_size,
            gpu_memory_utilization=v.gpu_memory_utilization,
            enable_sleep=device.type == "cuda",
            seed=seed,
            min_pixels=data.min_pixels,
            max_pixels=data.max_pixels,
        )
    return build_engine_by_name(
        engine_name,
        arch,
        tokenizer=tokenizer,
        blocked_token_ids=vision_token_ids(tokenizer, arch.vocab_size),
        device=device,
        dtype=dtype,
        **options,
    )


def build_sampling(rollout: RolloutConfig, tokenizer, *, greedy: bool = False) -> SamplingParams:
    """Sampling of training rollouts (``rollout.*``), or with ``greedy`` one greedy answer per
    prompt (evaluation) with the same response budget and stop tokens."""
    stops = stop_token_ids(tokenizer)
    if greedy:
        return SamplingParams(n=1, greedy=True, max_new_tokens=rollout.max_new_tokens, stop_token_ids=stops)
    return SamplingParams(
        n=rollout.num_generations,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
        max_new_tokens=rollout.max_new_tokens,
        stop_token_ids=stops,
    )


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
        policy_loss=a.policy_loss,
        loss_agg_mode=a.loss_agg_mode,
        clip_eps_low=a.clip_eps_low,
        clip_eps_high=a.clip_eps_high,
        clip_ratio_c=a.clip_ratio_c,
        kl_estimator=a.kl_estimator,
        kl_coef=a.kl_coef,
        kl_clamp=a.kl_clamp,
        kl_importance_weighted=a.kl_importance_weighted,
    )


def rollout_correction_options(algorithm: AlgorithmConfig) -> dict[str, Any] | None:
    """``rl.compute_rollout_correction`` keyword arguments, or None when it is off."""
    a = algorithm
    if a.rollout_correction == "none":
        return None
    return dict(level=a.rollout_correction, mode=a.rollout_correction_mode, threshold=a.rollout_correction_threshold)


# -- evaluation of a checkpoint (tools/evaluate.py) --------------------------------------------------
# Appended for "evaluation as a library": the config -> object steps of tools/evaluate.py; the
# generation and scoring themselves are megatron_vrft.eval (predictions.py, evaluate.py).


def build_checkpoint_tokenizer(model: ModelConfig, tokenizer_dir=None):
    """The tokenizer a checkpoint carries (``tokenizer_dir``, e.g. ``open_checkpoint(...).tokenizer_dir``
    of an HF checkpoint), else the run's (:func:`build_tokenizer`: ``model.hf_path`` or the tiny one)."""
    return load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else build_tokenizer(model)


def build_eval_sampling(rollout: RolloutConfig, tokenizer, *, temperature: float = 0.0) -> SamplingParams:
    """One answer per prompt with the run's response budget and stop tokens: greedy at
    ``temperature == 0``, else sampled at ``temperature`` (no top-p / top-k)."""
    greedy = build_sampling(rollout, tokenizer, greedy=True)
    if temperature == 0:
        return greedy
    return SamplingParams(
        n=1, temperature=temperature, max_new_tokens=greedy.max_new_tokens, stop_token_ids=greedy.stop_token_ids
    )


def build_eval_ground_truths(data: DataConfig, records: RecordSet) -> list:
    """Every record's ground truth in the model's box space (``data.coord_space``), in record
    order, without decoding the images: the size comes from the record (or the image header) and
    the resize from the Qwen2-VL image processor at ``data.min_pixels`` / ``data.max_pixels``,
    exactly as preprocessing maps it. So records whose images fail to decode later still have a
    ground truth (and count as missing answers). A record without a size whose header is
    unreadable keeps its ground truth as is when it has no boxes (classification), else raises
    ``DataError`` naming it; one whose size the image processor rejects (preprocessing skips it
    too) keeps its boxes in the annotation's space when ``data.coord_space`` needs the resize
    (detection is scored in original pixels either way)."""
    import dataclasses

    from megatron_vrft.data import (
        DataError,
        build_image_processor,
        compute_resized_size,
        ground_truth_in_model_space,
        read_image_size,
    )

    image_processor = build_image_processor(min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    out = []
    for record in records:
        size = record.image_size
        if size is None:  # a header read, no full decode
            try:
                size = read_image_size(record.images[0])
            except DataError as exc:
                gt = record.ground_truth
                if gt.boxes is None and gt.box is None:
                    out.append(gt)
                    continue
                raise DataError(
                    f"record {record.source_id}: its boxes cannot be mapped into {data.coord_space}: {exc}", exc.reason
                ) from exc
            record = dataclasses.replace(record, image_size=size)
        try:
            resized = compute_resized_size(*size, image_processor)
        except ValueError:  # the processor rejects the image (aspect ratio): never answered, so
            resized = None  # it only counts as missing; its boxes stay where they can be mapped
        try:
            # COCO crowd regions travel with it: ignored by COCOeval, never false positives
            out.append(ground_truth_in_model_space(record, data.coord_space, resized_size=resized))
        except ValueError:
            if resized is not None:
                raise
            out.append(record.ground_truth)
    return out


def eval_score_options(
    data: DataConfig, reward: RewardConfig, records: RecordSet, *, protocol: str = "coco"
) -> dict[str, Any]:
    """``eval.score_predictions`` options for ``records``: the classification matching rule, or
    the detection protocol; with ``protocol == "lvis"`` or an LVIS source, the LVIS labels
    (frequencies, negative / not-exhaustive categories per image) of the records' annotation file,
    for AP/APr/APc/APf by the LVIS API."""
    if data.task != "detection":
        return eval_options(data, reward)
    options: dict[str, Any] = {"protocol": protocol}
    if protocol == "lvis" or data.source == "lvis":
        from megatron_vrft.eval.lvis_map import lvis_labels_from_file

        if data.source not in ("coco", "lvis"):
            raise ConfigError("data.source", data.source, "'lvis' or 'coco' (an annotation file) for LVIS evaluation")
        options["lvis"] = lvis_labels_from_file(records.source, [int(r.metadata["image_id"]) for r in records])
    return options
