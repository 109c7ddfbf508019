"""Typed configuration for a Visual-RFT run: one dataclass per component.

Every field carries its documentation in ``metadata["help"]`` (shown by ``--help`` of the entry
points and in validation errors). Fields typed with ``Literal[...]`` are checked against their
allowed values when a config is loaded; cross-field rules live in each class's ``validate``.
Names that select algorithm pieces (advantage estimator, policy loss, KL estimator, aggregation,
reward functions) are the registry names of ``megatron_vrft.rl`` / ``megatron_vrft.rewards``; a test
keeps the ``Literal`` choices here and the registries in step, so config never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_vrft.config.errors import ConfigError


def doc(help_text: str, **kwargs):
    """A dataclass field with its documentation attached."""
    return field(metadata={"help": help_text}, **kwargs)


@dataclass(kw_only=True)
class ModelConfig:
    family: Literal["qwen2_vl", "qwen2_5_vl"] = doc("Model family; selects the name map and vision tower.")
    hf_path: str | None = doc(
        "Directory of a Hugging Face checkpoint (config.json + safetensors). None builds the "
        "built-in tiny random model (`tiny_preset`), which needs no download.",
        default=None,
    )
    tiny_preset: Literal["tiny", "small"] = doc(
        "Size of the built-in random model used when hf_path is None.", default="tiny"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = doc(
        "Parameter and activation dtype of the policy.", default="bfloat16"
    )
    layer_spec: Literal["auto", "local", "transformer_engine"] = doc(
        "megatron-core layer spec: 'auto' picks Transformer-Engine on a GPU when importable.",
        default="auto",
    )
    freeze_vision: bool = doc("Keep the vision tower frozen during training.", default=False)

    def validate(self, prefix: str) -> None:
        pass


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel_size: int = doc("Trainer tensor-parallel size (language model).", default=1)
    pipeline_parallel_size: int = doc("Trainer pipeline-parallel size.", default=1)
    backend: Literal["auto", "nccl", "gloo"] = doc(
        "torch.distributed backend; 'auto' is nccl with CUDA, gloo without.", default="auto"
    )

    def validate(self, prefix: str) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "an integer >= 1")


@dataclass(kw_only=True)
class VLLMConfig:
    """Options of the colocated vLLM engine only (``rollout.engine`` = vllm, or auto on a GPU)."""

    tensor_parallel_size: int = doc(
        "vLLM tensor-parallel size R, independent of the trainer's TP/PP: ranks [k*R, (k+1)*R) form "
        "engine replica k (world = R x replicas).",
        default=1,
    )
    gpu_memory_utilization: float = doc(
        "Fraction of GPU memory the colocated vLLM engine may take while awake.", default=0.5
    )
    sleep_level: Literal[1, 2] = doc(
        "vLLM sleep level between rollouts: 1 offloads weights to CPU, 2 discards them.", default=1
    )

    def validate(self, prefix: str) -> None:
        if not 0 < self.gpu_memory_utilization < 1:
            raise ConfigError(f"{prefix}.gpu_memory_utilization", self.gpu_memory_utilization, "a float in (0, 1)")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"{prefix}.tensor_parallel_size", self.tensor_parallel_size, "an integer >= 1")


@dataclass(kw_only=True)
class RolloutConfig:
    engine: Literal["auto", "vllm", "hf"] = doc(
        "Generation engine: vLLM colocated on the GPUs, or transformers' generate (any device) "
        "with the same interface; 'auto' picks vLLM when importable with CUDA, else 'hf'.",
        default="auto",
    )
    vllm: VLLMConfig = doc("Options of the vLLM engine.", default_factory=VLLMConfig)
    num_generations: int = doc("Group size G: responses sampled per prompt.", default=8)
    max_new_tokens: int = doc("Maximum tokens generated per response.", default=512)
    temperature: float = doc("Sampling temperature (also used for training log-probs).", default=1.0)
    top_p: float = doc("Nucleus sampling threshold in (0, 1].", default=1.0)
    top_k: int = doc("Top-k sampling; -1 disables.", default=-1)
    prompts_per_call: int = doc(
        "Prompts per engine generate call. The step's prompts are cut into calls of this many, "
        "each seeded by (seed, step, call index) and dealt to the ranks round-robin, so the "
        "samples do not depend on the world size or the TP/PP layout.",
        default=8,
    )
    weight_sync_bucket_mb: int = doc(
        "Weight export to the engine streams buckets of at most this many MiB of this rank's "
        "shards (whole layers); peak extra memory is one gathered bucket.",
        default=512,
    )

    def validate(self, prefix: str) -> None:
        if self.num_generations < 1:
            raise ConfigError(f"{prefix}.num_generations", self.num_generations, "an integer >= 1")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{prefix}.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"{prefix}.temperature", self.temperature, "a float > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}.top_p", self.top_p, "a float in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"{prefix}.top_k", self.top_k, "-1 or an integer >= 1")
        if self.prompts_per_call < 1:
            raise ConfigError(f"{prefix}.prompts_per_call", self.prompts_per_call, "an integer >= 1")
        if self.weight_sync_bucket_mb < 1:
            raise ConfigError(f"{prefix}.weight_sync_bucket_mb", self.weight_sync_bucket_mb, "an integer >= 1")


@dataclass(kw_only=True)
class AlgorithmConfig:
    name: Literal["grpo", "sft"] = doc(
        "Training algorithm: GRPO (Visual-RFT) or the supervised fine-tuning baseline.", default="grpo"
    )
    advantage_estimator: Literal["grpo", "drgrpo", "grpo_batch_std"] = doc(
        "Group advantage: 'grpo' = (r - group mean) / (group std + eps); 'drgrpo' = r - group "
        "mean; 'grpo_batch_std' = (r - group mean) / (batch std + eps).",
        default="grpo",
    )
    policy_loss: Literal["ppo_clip", "dual_clip", "visual_rft_unclipped", "gspo", "cispo"] = doc(
        "Policy loss: PPO clipped ratio, dual-clip PPO, Visual-RFT's unclipped ratio (old "
        "log-probs = detached current), GSPO (sequence-level ratio) or CISPO (clipped, detached "
        "importance weight times the log-prob).",
        default="ppo_clip",
    )
    clip_eps_low: float = doc("Lower clip epsilon: ratio >= 1 - clip_eps_low.", default=0.2)
    clip_eps_high: float = doc(
        "Upper clip epsilon: ratio <= 1 + clip_eps_high (DAPO clip-higher uses 0.28).", default=0.2
    )
    clip_ratio_c: float = doc("Dual-clip constant c > 1 (used by policy_loss='dual_clip').", default=3.0)
    kl_estimator: Literal["k1", "k2", "k3"] = doc(
        "KL(pi || pi_ref) estimator; k3 is the low-variance one GRPO uses.", default="k3"
    )
    kl_coef: float = doc("Weight beta of the KL penalty; 0 disables the reference model.", default=0.04)
    kl_clamp: float = doc("Clamp of the per-token log-ratio in the KL estimate.", default=10.0)
    kl_importance_weighted: bool = doc(
        "Weight the per-token KL term by the (detached) importance ratio pi/pi_old: the KL bias "
        "correction TRL applies by default since 1.x.",
        default=False,
    )
    rollout_correction: Literal["none", "token", "sequence"] = doc(
        "Correct for the rollout engine / trainer log-prob mismatch with importance weights "
        "exp(old_logp - rollout_logp), per token or per sequence; 'none' disables.",
        default="none",
    )
    rollout_correction_mode: Literal["truncate", "mask"] = doc(
        "Weights above the threshold are capped at it (truncate) or zeroed (mask).", default="truncate"
    )
    rollout_correction_threshold: float = doc("Threshold of the rollout correction weights.", default=2.0)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = doc(
        "How per-token losses are reduced to a scalar.", default="token-mean"
    )
    entropy_coef: float = doc("Weight of the entropy bonus (0 disables).", default=0.0)
    ppo_epochs: int = doc("Optimisation passes over each rollout batch.", default=1)

    def validate(self, prefix: str) -> None:
        for name in ("clip_eps_low", "clip_eps_high", "kl_coef", "kl_clamp", "entropy_coef"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"{prefix}.{name}", value, "a float >= 0")
        if not self.rollout_correction_threshold > 0:
            raise ConfigError(
                f"{prefix}.rollout_correction_threshold", self.rollout_correction_threshold, "a float > 0"
            )
        if not self.clip_ratio_c > 1:
            raise ConfigError(f"{prefix}.clip_ratio_c", self.clip_ratio_c, "a float > 1")
        if self.ppo_epochs < 1:
            raise ConfigError(f"{prefix}.ppo_epochs", self.ppo_epochs, "an integer >= 1")


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = doc("Peak learning rate.", default=1e-6)
    weight_decay: float = doc("Decoupled weight decay (AdamW).", default=0.0)
    betas: tuple[float, float] = doc("Adam betas.", default=(0.9, 0.999))
    grad_clip: float = doc("Global gradient-norm clip; 0 disables.", default=1.0)
    warmup_steps: int = doc(
        "Linear LR warm-up steps, of the SFT warm-up and again of GRPO (which starts with a fresh optimizer after it).",
        default=0,
    )

    def validate(self, prefix: str) -> None:
        if not self.lr > 0:
            raise ConfigError(f"{prefix}.lr", self.lr, "a float > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{prefix}.betas", self.betas, "two floats in [0, 1)")


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["synthetic", "visual_rft", "coco", "lvis", "image_folder", "lisa"] = doc(
        "Dataset reader: built-in synthetic tasks, the Visual-RFT released table, COCO/LVIS JSON, "
        "an image folder per class, or LISA-style grounding JSON."
    )
    task: Literal["classification", "detection", "grounding"] = doc("Perception task of the run.")
    path: str | None = doc(
        "Dataset location (table dir/parquet, annotation JSON, or image root). Unused for synthetic.",
        default=None,
    )
    image_root: str | None = doc("Directory that image paths in the annotations are relative to.", default=None)
    eval_path: str | None = doc(
        "Held-out split the trainer evaluates at trainer.eval_interval and at the end (same source "
        "format and image_root as path; all its records, no k_shot). None: synthetic tasks use a "
        "fresh seed, datasets are evaluated with tools/evaluate.py only.",
        default=None,
    )
    k_shot: int | None = doc("Examples per category for few-shot sampling; None takes all.", default=None)
    categories: list[str] | None = doc(
        "Restrict to these category names (e.g. a base or novel split); None keeps all.", default=None
    )
    num_synthetic: int = doc("Number of synthetic examples (source='synthetic').", default=64)
    synthetic_kind: Literal["photo", "shape", "color"] = doc(
        "Synthetic classification images: crops of real photographs, shapes to name, or the colour "
        "of one shape on a 56 x 56 image (the CPU demo's task).",
        default="photo",
    )
    seed: int = doc("Seed of sampling and shuffling.", default=0)
    min_pixels: int = doc("Qwen2-VL image processor: minimum pixels after resize.", default=56 * 56)
    max_pixels: int = doc("Qwen2-VL image processor: maximum pixels after resize.", default=448 * 448)
    coord_space: Literal["pixels_resized", "norm_1000", "pixels_original"] = doc(
        "Coordinate space the model answers boxes in: pixels of the resized image it sees "
        "(Qwen2.5-VL's native convention), 0-1000 normalised (Qwen2-VL's native convention and "
        "the released Visual-RFT prompts), or original image pixels. Ground truth is mapped into "
        "it during preprocessing.",
        default="pixels_resized",
    )
    annotation_coord_space: Literal["pixels_original", "pixels_resized", "norm_1000", "norm_1"] = doc(
        "Space the dataset's boxes are stored in, for sources that do not record it (the Visual-RFT table).",
        default="pixels_original",
    )
    on_error: Literal["raise", "skip"] = doc(
        "Bad records (missing/corrupt image, invalid boxes): raise naming the record, or skip and "
        "count by reason (reported at the end; never silent).",
        default="raise",
    )
    prompts_per_step: int = doc("Prompts per optimisation step (before x num_generations).", default=8)

    def validate(self, prefix: str) -> None:
        if self.source != "synthetic" and not self.path:
            raise ConfigError(f"{prefix}.path", self.path, f"a path (required when source={self.source!r})")
        if self.k_shot is not None and self.k_shot < 1:
            raise ConfigError(f"{prefix}.k_shot", self.k_shot, "None or an integer >= 1")
        if self.min_pixels < 1 or self.max_pixels < self.min_pixels:
            raise ConfigError(f"{prefix}.max_pixels", self.max_pixels, f"an integer >= min_pixels ({self.min_pixels})")
        if self.num_synthetic < 1:
            raise ConfigError(f"{prefix}.num_synthetic", self.num_synthetic, "an integer >= 1")
        if self.prompts_per_step < 1:
            raise ConfigError(f"{prefix}.prompts_per_step", self.prompts_per_step, "an integer >= 1")


@dataclass(kw_only=True)
class RewardTerm:
    name: str = doc("Registered reward function name (see megatron_vrft.rewards).")
    weight: float = doc("Weight of this reward in the sum.", default=1.0)

    def validate(self, prefix: str) -> None:
        pass


@dataclass(kw_only=True)
class RewardConfig:
    terms: list[RewardTerm] = doc(
        "Rewards and weights; the total reward is their weighted sum.",
        default_factory=lambda: [RewardTerm(name="format"), RewardTerm(name="accuracy")],
    )
    classification_mode: Literal["default", "visual_rft_compat"] = doc(
        "Classification matching: 'default' (exact or whole-phrase match, synonyms; empty answers "
        "never score) or the published substring rule, kept to reproduce the paper.",
        default="default",
    )
    matching: Literal["greedy", "hungarian"] = doc(
        "Detection prediction-to-ground-truth matching: confidence-ordered greedy (published) or optimal (Hungarian).",
        default="greedy",
    )
    iou_threshold: float = doc("IoU above which a predicted box matches a ground-truth box.", default=0.5)

    def validate(self, prefix: str) -> None:
        if not self.terms:
            raise ConfigError(f"{prefix}.terms", self.terms, "a non-empty list of {name, weight}")
        seen: set[str] = set()
        for i, term in enumerate(self.terms):
            if term.name in seen:
                raise ConfigError(f"{prefix}.terms[{i}].name", term.name, "a name not listed twice")
            seen.add(term.name)
        if not 0 < self.iou_threshold < 1:
            raise ConfigError(f"{prefix}.iou_threshold", self.iou_threshold, "a float in (0, 1)")


@dataclass(kw_only=True)
class TrainerConfig:
    num_steps: int = doc(
        "Steps of the algorithm (GRPO: one rollout batch each; or the SFT baseline). They follow the "
        "sft_warmup_steps SFT steps: a run takes sft_warmup_steps + num_steps steps in all (the "
        "progress bar names the phase).",
        default=100,
    )
    micro_batch_tokens: int = doc("Token budget of one training micro-batch.", default=8192)
    seed: int = doc("Global seed (model init, sampling).", default=1234)
    output_dir: str = doc("Run directory: checkpoints, metrics, plots.", default="outputs/run")
    save_interval: int = doc("Steps between checkpoints; 0 saves only at the end.", default=0)
    eval_interval: int = doc(
        "Steps between evaluations of the policy on held-out prompts (greedy answers; task metrics as "
        "tools/evaluate.py computes them, and the rewards); 0 evaluates only at the end. Held-out "
        "prompts: data.eval_path, or a fresh seed of a synthetic task; none for a dataset without it.",
        default=0,
    )
    resume: bool = doc("Resume from the newest complete checkpoint in output_dir.", default=True)
    sft_warmup_steps: int = doc(
        "Supervised steps before GRPO that teach the <think>/<answer> format (0 disables).", default=0
    )
    sft_warmup_answers: Literal["random", "ground_truth"] = doc(
        "Answers the warm-up teaches: a random class name (format only: the task itself is left "
        "to GRPO) or the ground truth.",
        default="random",
    )
    keep_checkpoints: int = doc("Complete checkpoints kept in output_dir (older ones are deleted).", default=2)
    offload_during_rollout: list[str] = doc(
        "Trainer state moved to CPU memory while the colocated engine generates (GPU only): any of "
        "'params', 'grads', 'optimizer'. The reference model is also kept on the CPU except while "
        "it computes when this is non-empty.",
        default_factory=lambda: ["grads", "optimizer"],
    )

    def validate(self, prefix: str) -> None:
        if self.sft_warmup_steps < 0:
            raise ConfigError(f"{prefix}.sft_warmup_steps", self.sft_warmup_steps, "an integer >= 0")
        for i, kind in enumerate(self.offload_during_rollout):
            if kind not in ("params", "grads", "optimizer"):
                raise ConfigError(
                    f"{prefix}.offload_during_rollout[{i}]", kind, "one of 'params', 'grads', 'optimizer'"
                )
        if self.keep_checkpoints < 1:
            raise ConfigError(f"{prefix}.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        if self.num_steps < 1:
            raise ConfigError(f"{prefix}.num_steps", self.num_steps, "an integer >= 1")
        if self.micro_batch_tokens < 1:
            raise ConfigError(f"{prefix}.micro_batch_tokens", self.micro_batch_tokens, "an integer >= 1")
        if self.save_interval < 0:
            raise ConfigError(f"{prefix}.save_interval", self.save_interval, "an integer >= 0")
        if self.eval_interval < 0:
            raise ConfigError(f"{prefix}.eval_interval", self.eval_interval, "an integer >= 0")


@dataclass(kw_only=True)
class LoggingConfig:
    log_interval: int = doc(
        "Steps between updates of the metrics shown on the console (the progress bar's read-out, "
        "or a metric line when the progress bar is off). Every step is written to the metric sinks.",
        default=1,
    )
    progress_bar: bool = doc("Show tqdm progress bars on long work.", default=True)
    plots: bool = doc("Write PNG plots of metrics to output_dir.", default=True)
    jsonl: bool = doc("Append metrics to output_dir/metrics.jsonl.", default=True)
    tensorboard: bool = doc("Write TensorBoard event files to output_dir/tensorboard.", default=True)
    wandb_project: str | None = doc(
        "Also log to Weights & Biases under this project (needs `pip install wandb`; WANDB_MODE, "
        "WANDB_ENTITY and the API key come from the environment). The run is named after "
        "output_dir and a resumed run continues the same W&B run. None: off.",
        default=None,
    )

    def validate(self, prefix: str) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"{prefix}.log_interval", self.log_interval, "an integer >= 1")


@dataclass(kw_only=True)
class VisualRFTConfig:
    """A whole run. Sections map 1:1 to YAML top-level keys."""

    model: ModelConfig = doc("Policy model.")
    data: DataConfig = doc("Dataset and preprocessing.")
    parallel: ParallelConfig = doc("Trainer parallel layout.", default_factory=ParallelConfig)
    rollout: RolloutConfig = doc("Generation.", default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = doc("RL algorithm.", default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = doc("Optimiser.", default_factory=OptimizerConfig)
    reward: RewardConfig = doc("Rewards.", default_factory=RewardConfig)
    trainer: TrainerConfig = doc("Loop, checkpoints.", default_factory=TrainerConfig)
    logging: LoggingConfig = doc("Metrics and plots.", default_factory=LoggingConfig)

    def validate(self, prefix: str = "") -> None:
        pass


RETIRED_KEYS: dict[str, str] = {
    "algorithm.clip_ratio_low": "renamed to 'algorithm.clip_eps_low' (the rl/ name)",
    "algorithm.clip_ratio_high": "renamed to 'algorithm.clip_eps_high' (the rl/ name)",
    "algorithm.dual_clip_c": "renamed to 'algorithm.clip_ratio_c' (the rl/ name)",
    "rollout.tensor_parallel_size": "moved to 'rollout.vllm.tensor_parallel_size' (a vLLM option)",
    "rollout.gpu_memory_utilization": "moved to 'rollout.vllm.gpu_memory_utilization' (a vLLM option)",
    "rollout.sleep_level": "moved to 'rollout.vllm.sleep_level' (a vLLM option)",
    "parallel.virtual_pipeline_parallel_size": (
        "removed: interleaved pipeline stages are not wired into the trainer (its token-budget "
        "micro-batches vary in shape); the model and the converter support them"
    ),
}
"""Keys that configs used to have: loading one is an error that says what replaced it."""
