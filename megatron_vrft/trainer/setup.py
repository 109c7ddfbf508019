"""Everything a run needs before its first step, checked before any work: :func:`preflight` (config
against the world), then :func:`build_run` (data, tokenizer, policy, optimizer, reference, engine)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vrft.config import ConfigError, VisualRFTConfig
from megatron_vrft.data import (
    PreprocessedExample,
    PromptBatcher,
    build_qwen2vl_processor,
    build_tiny_tokenizer,
    load_records,
    load_tokenizer,
    preprocess_records,
)
from megatron_vrft.distributed.parallel_state import ParallelGroups, ParallelLayout, initialize_model_parallel
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch
from megatron_vrft.models.qwen2_vl.build import DTYPES, build_policy, load_hf_source, preset_source
from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy
from megatron_vrft.models.qwen2_vl.spec import use_transformer_engine
from megatron_vrft.rewards import GroundTruth, available_rewards
from megatron_vrft.rollout.offload import Offloader, trainer_tensors
from megatron_vrft.rollout.engine import RolloutEngine, build_engine, resolve_engine_name, vision_token_ids
from megatron_vrft.rollout.types import SamplingParams
from megatron_vrft.trainer.actor import OptimizerSettings, PolicyActor
from megatron_vrft.trainer.scoring import reward_terms

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RunContext:
    cfg: VisualRFTConfig
    rank: int
    world_size: int
    groups: ParallelGroups
    layout_dict: dict[str, int]
    tokenizer: Any
    processor: Any
    arch: Qwen2VLArch
    examples: list[PreprocessedExample]
    class_names: list[str]
    eval_prompts: list[PreprocessedExample]
    actor: PolicyActor
    reference: list[Qwen2VLPolicy] | None
    engine: RolloutEngine
    batcher: PromptBatcher
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    pad_id: int
    reward_terms: list[tuple[str, float]]
    reward_options: dict[str, dict[str, Any]]
    on_gpu: bool
    reference_offloader: Offloader | None

    @property
    def reward_ground_truths(self) -> list[GroundTruth]:
        """``examples[i].ground_truth``: in the model's box space, what the rewards read."""
        return [e.ground_truth for e in self.examples]

    @property
    def eval_ground_truths(self) -> list[GroundTruth]:
        """``eval_prompts[i].ground_truth``."""
        return [e.ground_truth for e in self.eval_prompts]


def preflight(cfg: VisualRFTConfig, world_size: int) -> None:
    """Raise ``ConfigError`` naming the field for anything checkable before work starts."""
    p = cfg.parallel
    mp = p.tensor_parallel_size * p.pipeline_parallel_size
    if world_size % mp:
        raise ConfigError("parallel.tensor_parallel_size", p.tensor_parallel_size,
                          f"TP x PP ({mp}) dividing the world size {world_size} (world = TP x PP x DP)")
    dp = world_size // mp
    if cfg.data.prompts_per_step % dp:
        raise ConfigError("data.prompts_per_step", cfg.data.prompts_per_step,
                          f"a multiple of the data-parallel size {dp}")
    if world_size % cfg.rollout.tensor_parallel_size:
        raise ConfigError("rollout.tensor_parallel_size", cfg.rollout.tensor_parallel_size,
                          f"a divisor of the world size {world_size}")
    known = set(available_rewards())
    for i, term in enumerate(cfg.reward.terms):
        if term.name not in known:
            raise ConfigError(f"reward.terms[{i}].name", term.name, f"one of {sorted(known)}")
    try:
        resolve_engine_name(cfg.rollout.engine)
    except ValueError as exc:
        raise ConfigError("rollout.engine", cfg.rollout.engine, str(exc)) from None
    if cfg.model.hf_path is not None and not (Path(cfg.model.hf_path) / "config.json").exists():
        raise ConfigError("model.hf_path", cfg.model.hf_path, "an HF checkpoint directory with config.json")
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        raise ConfigError("data.path", cfg.data.path, "an existing file or directory")
    if cfg.logging.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb_project", cfg.logging.wandb_project,
                          "None here: the wandb package is not installed (pip install wandb)")
    if cfg.data.eval_path is not None and not Path(cfg.data.eval_path).exists():
        raise ConfigError("data.eval_path", cfg.data.eval_path, "an existing file or directory")
    if cfg.data.eval_path is not None and cfg.data.source == "synthetic":
        raise ConfigError("data.eval_path", cfg.data.eval_path, "None for synthetic data (held out by seed)")
    if cfg.data.image_root is not None and not Path(cfg.data.image_root).is_dir():
        raise ConfigError("data.image_root", cfg.data.image_root, "an existing directory")
    warmup_random = cfg.trainer.sft_warmup_steps and cfg.trainer.sft_warmup_answers == "random"
    if warmup_random and cfg.data.task != "classification":
        raise ConfigError("trainer.sft_warmup_answers", "random",
                          "'ground_truth' for detection and grounding (random answers need class names)")
    if cfg.algorithm.name == "grpo" and cfg.rollout.num_generations < 2:
        raise ConfigError("rollout.num_generations", cfg.rollout.num_generations, "an integer >= 2 for GRPO")
    if cfg.model.layer_spec == "transformer_engine" and not use_transformer_engine():
        raise ConfigError("model.layer_spec", "transformer_engine",
                          "'auto' or 'local' here: Transformer Engine needs a GPU and the transformer_engine package")
    if p.virtual_pipeline_parallel_size is not None:
        raise ConfigError("parallel.virtual_pipeline_parallel_size", p.virtual_pipeline_parallel_size,
                          "None in the trainer (interleaving needs fixed micro-batch shapes; not wired yet)")


def build_run(cfg: VisualRFTConfig) -> RunContext:
    rank, world = dist.get_rank(), dist.get_world_size()
    preflight(cfg, world)
    layout = ParallelLayout(tensor_parallel_size=cfg.parallel.tensor_parallel_size,
                            pipeline_parallel_size=cfg.parallel.pipeline_parallel_size)
    groups = initialize_model_parallel(layout, seed=cfg.trainer.seed)
    if cfg.model.hf_path is None:
        tokenizer = build_tiny_tokenizer()
    else:
        tokenizer = load_tokenizer(cfg.model.hf_path)
    processor = build_qwen2vl_processor(tokenizer, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)

    d = cfg.data
    def load(seed: int, count: int, *, path: str | None = d.path, k_shot: int | None = d.k_shot):
        records = load_records(
            d.source, d.task, path=path, image_root=d.image_root, box_space=d.coord_space,
            annotation_coord_space=d.annotation_coord_space, k_shot=k_shot, categories=d.categories,
            num_synthetic=count, synthetic_kind=d.synthetic_kind, seed=seed, on_error=d.on_error,
        )  # fmt: skip
        examples, skips = preprocess_records(records, processor, box_space=d.coord_space, on_error=d.on_error)
        skips.merge(records.skips)
        if skips.total and rank == 0:
            logger.warning("data: skipped %d bad records: %s", skips.total, skips.summary())
        return examples

    examples = load(d.seed, d.num_synthetic)
    if len(examples) < d.prompts_per_step:
        raise ConfigError("data.prompts_per_step", d.prompts_per_step,
                          f"at most the number of usable records ({len(examples)})")
    # Held-out prompts for evaluation: data.eval_path, else a fresh seed of a synthetic task.
    if d.eval_path is not None:
        eval_prompts = load(d.seed, d.num_synthetic, path=d.eval_path, k_shot=None)
    elif d.source == "synthetic":
        eval_prompts = load(d.seed + 10_007, d.num_synthetic)
    else:
        eval_prompts = []

    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.hf_path is None:
        source = preset_source(cfg.model.family, cfg.model.tiny_preset, tokenizer, seed=cfg.trainer.seed)
    else:
        source = load_hf_source(cfg.model.hf_path)
    chunks = build_policy(source, layout, groups, params_dtype=dtype, layer_spec=cfg.model.layer_spec)
    if cfg.model.freeze_vision:
        for c in chunks:
            if c.vision is not None:
                c.vision.requires_grad_(False)
    reference = None
    if cfg.algorithm.name == "grpo" and cfg.algorithm.kl_coef > 0:
        reference = build_policy(source, layout, groups, params_dtype=dtype, layer_spec=cfg.model.layer_spec)
        for m in reference:
            m.requires_grad_(False).eval()
    del source

    # On a GPU the reference model waits in CPU memory between its forward passes.
    reference_offloader = None
    if reference is not None and torch.cuda.is_available() and cfg.trainer.offload_during_rollout:
        reference_offloader = Offloader({"params": trainer_tensors(reference)["params"]})
        reference_offloader.offload(["params"])
    engine_name = resolve_engine_name(cfg.rollout.engine)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    blocked = vision_token_ids(tokenizer, chunks[0].arch.vocab_size)
    o = cfg.optimizer
    actor = PolicyActor(chunks, groups, OptimizerSettings(
        lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), grad_clip=o.grad_clip,
        warmup_steps=o.warmup_steps,
        total_steps=cfg.trainer.sft_warmup_steps if cfg.algorithm.name == "grpo" and cfg.trainer.sft_warmup_steps
        else cfg.trainer.num_steps,
    ), blocked_token_ids=blocked)  # fmt: skip
    engine = build_engine(
        engine_name, chunks[0].arch, tokenizer=tokenizer, blocked_token_ids=blocked, device=device, dtype=dtype,
        **({} if engine_name == "hf" else dict(
            tensor_parallel_size=cfg.rollout.tensor_parallel_size, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            enable_sleep=torch.cuda.is_available(), seed=cfg.trainer.seed, min_pixels=cfg.data.min_pixels,
            max_pixels=cfg.data.max_pixels)),
    )  # fmt: skip
    stop_ids = tuple(i for i in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) if i is not None)
    r = cfg.rollout
    sampling = SamplingParams(n=r.num_generations, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, stop_token_ids=stop_ids)
    terms, options = reward_terms(cfg)
    batcher = PromptBatcher(num_records=len(examples), global_batch_size=d.prompts_per_step, dp_rank=0, dp_size=1,
                            seed=d.seed)
    return RunContext(
        cfg=cfg, rank=rank, world_size=world, groups=groups,
        layout_dict={"tp": layout.tensor_parallel_size, "pp": layout.pipeline_parallel_size, "world": world},
        tokenizer=tokenizer, processor=processor, arch=chunks[0].arch, examples=examples,
        class_names=sorted({e.ground_truth.label for e in examples if e.ground_truth.label}),
        eval_prompts=eval_prompts,
        actor=actor, reference=reference, engine=engine, batcher=batcher, sampling=sampling, stop_ids=stop_ids,
        pad_id=tokenizer.pad_token_id, reward_terms=terms, reward_options=options, on_gpu=device.type == "cuda",
        reference_offloader=reference_offloader,
    )  # fmt: skip
