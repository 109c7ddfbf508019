"""Everything a run needs before its first step, checked before any work: :func:`preflight` (config
against the world), then :func:`build_run` (data, tokenizer, policy, optimizer, reference, engine)."""

from __future__ import annotations

import importlib.util
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_vrft import builders
from megatron_vrft.config import ConfigError, VisualRFTConfig
from megatron_vrft.data import PreprocessedExample, PromptBatcher
from megatron_vrft.distributed.parallel_state import ParallelGroups, ParallelLayout, initialize_model_parallel
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch
from megatron_vrft.models.qwen2_vl.build import DTYPES, build_policy, load_hf_source, preset_source
from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy
from megatron_vrft.models.qwen2_vl.spec import use_transformer_engine
from megatron_vrft.rewards import GroundTruth, available_rewards
from megatron_vrft.rollout.engine import RolloutEngine, vision_token_ids
from megatron_vrft.rollout.offload import Offloader, trainer_tensors
from megatron_vrft.rollout.types import SamplingParams
from megatron_vrft.trainer.actor import OptimizerSettings, PolicyActor

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RunContext:
    """What :func:`build_run` built for a run; the loop passes each stage the parts it uses."""

    cfg: VisualRFTConfig
    rank: int
    world_size: int
    groups: ParallelGroups
    tokenizer: Any
    processor: Any
    arch: Qwen2VLArch
    examples: list[PreprocessedExample]
    """Training prompts (ground truth in the model's box space)."""
    eval_prompts: list[PreprocessedExample]
    """Held-out prompts (empty when the run has none)."""
    actor: PolicyActor
    reference: list[Qwen2VLPolicy] | None
    reference_offloader: Offloader | None
    """Set on a GPU: the reference model waits in CPU memory between its forward passes."""
    engine: RolloutEngine
    batcher: PromptBatcher
    """The step's prompts (the whole global batch on every rank: rollout is split over all ranks)."""
    sampling: SamplingParams
    """Training rollouts."""
    eval_sampling: SamplingParams
    """Evaluation: one greedy answer per prompt."""
    reward_terms: list[tuple[str, float]]
    reward_options: dict[str, dict[str, Any]]
    on_gpu: bool

    @property
    def layout(self) -> dict[str, int]:
        """The parallel layout, as checkpoints record it."""
        return {"tp": self.groups.tp_size, "pp": self.groups.pp_size, "world": self.world_size}

    @property
    def reward_ground_truths(self) -> list[GroundTruth]:
        """``examples[i].ground_truth``: in the model's box space, what the rewards read."""
        return [e.ground_truth for e in self.examples]

    @property
    def eval_ground_truths(self) -> list[GroundTruth]:
        """``eval_prompts[i].ground_truth``."""
        return [e.ground_truth for e in self.eval_prompts]


def preflight(cfg: VisualRFTConfig, world_size: int) -> str:
    """Raise ``ConfigError`` naming the field for anything checkable before work starts; returns
    the rollout engine the run uses (``rollout.engine`` resolved, decided here once)."""
    p = cfg.parallel
    mp = p.tensor_parallel_size * p.pipeline_parallel_size
    if world_size % mp:
        raise ConfigError(
            "parallel.tensor_parallel_size",
            p.tensor_parallel_size,
            f"TP x PP ({mp}) dividing the world size {world_size} (world = TP x PP x DP)",
        )
    dp = world_size // mp
    if cfg.data.prompts_per_step % dp:
        raise ConfigError(
            "data.prompts_per_step", cfg.data.prompts_per_step, f"a multiple of the data-parallel size {dp}"
        )
    engine_name = builders.resolve_engine(cfg.rollout)
    if engine_name == "vllm" and world_size % cfg.rollout.vllm.tensor_parallel_size:
        raise ConfigError(
            "rollout.vllm.tensor_parallel_size",
            cfg.rollout.vllm.tensor_parallel_size,
            f"a divisor of the world size {world_size}",
        )
    known = set(available_rewards())
    for i, term in enumerate(cfg.reward.terms):
        if term.name not in known:
            raise ConfigError(f"reward.terms[{i}].name", term.name, f"one of {sorted(known)}")
    if cfg.model.hf_path is not None and not (Path(cfg.model.hf_path) / "config.json").exists():
        raise ConfigError("model.hf_path", cfg.model.hf_path, "an HF checkpoint directory with config.json")
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        raise ConfigError("data.path", cfg.data.path, "an existing file or directory")
    if cfg.logging.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.wandb_project",
            cfg.logging.wandb_project,
            "None here: the wandb package is not installed (pip install wandb)",
        )
    if cfg.data.eval_path is not None and not Path(cfg.data.eval_path).exists():
        raise ConfigError("data.eval_path", cfg.data.eval_path, "an existing file or directory")
    if cfg.data.eval_path is not None and cfg.data.source == "synthetic":
        raise ConfigError("data.eval_path", cfg.data.eval_path, "None for synthetic data (held out by seed)")
    if cfg.data.image_root is not None and not Path(cfg.data.image_root).is_dir():
        raise ConfigError("data.image_root", cfg.data.image_root, "an existing directory")
    warmup_random = cfg.trainer.sft_warmup_steps and cfg.trainer.sft_warmup_answers == "random"
    if warmup_random and cfg.data.task != "classification":
        raise ConfigError(
            "trainer.sft_warmup_answers",
            "random",
            "'ground_truth' for detection and grounding (random answers need class names)",
        )
    if cfg.algorithm.name == "grpo" and cfg.rollout.num_generations < 2:
        raise ConfigError("rollout.num_generations", cfg.rollout.num_generations, "an integer >= 2 for GRPO")
    if cfg.model.layer_spec == "transformer_engine" and not use_transformer_engine():
        raise ConfigError(
            "model.layer_spec",
            "transformer_engine",
            "'auto' or 'local' here: Transformer Engine needs a GPU and the transformer_engine package",
        )
    return engine_name


def build_run(cfg: VisualRFTConfig) -> RunContext:
    rank, world = dist.get_rank(), dist.get_world_size()
    engine_name = preflight(cfg, world)
    layout = ParallelLayout(
        tensor_parallel_size=cfg.parallel.tensor_parallel_size,
        pipeline_parallel_size=cfg.parallel.pipeline_parallel_size,
    )
    groups = initialize_model_parallel(layout, seed=cfg.trainer.seed)
    tokenizer = builders.build_tokenizer(cfg.model)
    processor = builders.build_processor(tokenizer, cfg.data)

    d = cfg.data
    examples = builders.build_examples(d, processor, builders.build_records(d), report=rank == 0)
    if len(examples) < d.prompts_per_step:
        raise ConfigError(
            "data.prompts_per_step", d.prompts_per_step, f"at most the number of usable records ({len(examples)})"
        )
    eval_prompts = []
    if builders.has_eval_split(d):
        eval_prompts = builders.build_examples(d, processor, builders.build_records(d, split="eval"), report=rank == 0)

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
    device = builders.default_device()
    arch = chunks[0].arch
    warmup_first = cfg.algorithm.name == "grpo" and cfg.trainer.sft_warmup_steps
    o = cfg.optimizer
    actor = PolicyActor(
        chunks,
        groups,
        OptimizerSettings(
            lr=o.lr,
            weight_decay=o.weight_decay,
            betas=tuple(o.betas),
            grad_clip=o.grad_clip,
            warmup_steps=o.warmup_steps,
            total_steps=cfg.trainer.sft_warmup_steps if warmup_first else cfg.trainer.num_steps,
        ),
        blocked_token_ids=vision_token_ids(tokenizer, arch.vocab_size),
    )
    engine = builders.build_engine(
        engine_name, cfg.rollout, d, arch, tokenizer, device=device, dtype=dtype, seed=cfg.trainer.seed
    )
    terms, options = builders.reward_terms(cfg.reward)
    batcher = PromptBatcher(
        num_records=len(examples), global_batch_size=d.prompts_per_step, dp_rank=0, dp_size=1, seed=d.seed
    )
    # torch was seeded with the groups; Python's and numpy's global generators are seeded last, so
    # the steps start from the same state whatever the set-up drew (their states are saved and
    # restored with each checkpoint)
    random.seed(cfg.trainer.seed)
    np.random.seed(cfg.trainer.seed % 2**32)
    return RunContext(
        cfg=cfg,
        rank=rank,
        world_size=world,
        groups=groups,
        tokenizer=tokenizer,
        processor=processor,
        arch=arch,
        examples=examples,
        eval_prompts=eval_prompts,
        actor=actor,
        reference=reference,
        reference_offloader=reference_offloader,
        engine=engine,
        batcher=batcher,
        sampling=builders.build_sampling(cfg.rollout, tokenizer),
        eval_sampling=builders.build_sampling(cfg.rollout, tokenizer, greedy=True),
        reward_terms=terms,
        reward_options=options,
        on_gpu=device.type == "cuda",
    )
