"""The reward/eval pipeline: every stage of a Visual-RFT step except the optimiser, end to end.

    data -> Qwen2-VL preprocessing -> rollout -> rewards -> group advantages -> GRPO loss -> eval

Two rollout sources run on the same preprocessed batch:

1. a Qwen2-VL model (the built-in random preset, or ``model.hf_path``) generating on the real
   images through transformers — the model-facing path (processor, image tokens, generation) and
   the rewards' robustness on what an untrained model emits;
2. scripted policies of known quality (``rollout.scripted``), sweeping quality from 0 to 1 — the
   rewards, advantages and metrics must rise with quality, which the report plots.

For the GRPO loss the model scores (teacher-forced, with images) one group of scripted completions
per prompt: per-token log-probs through ``ops.logprob``, group advantages, clipped-ratio loss with
KL to a frozen reference copy, and a backward pass — the numbers a training step starts from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_vrft.config import VisualRFTConfig, config_to_dict
from megatron_vrft.data import (
    build_qwen2vl_processor,
    build_tiny_tokenizer,
    load_records,
    load_tokenizer,
    preprocess_records,
)
from megatron_vrft.eval.evaluate import evaluate_completions
from megatron_vrft.models.qwen2_vl.presets import build_preset_hf_model
from megatron_vrft.ops.logprob import token_logprobs
from megatron_vrft.rewards import compute_rewards
from megatron_vrft.rl import compute_advantages, compute_grpo_loss
from megatron_vrft.rollout.scripted import ScriptedPolicy
from megatron_vrft.trainer.report import write_report
from megatron_vrft.trainer.scoring import reward_terms
from megatron_vrft.trainer.timing import PhaseTimer

logger = logging.getLogger(__name__)

DEFAULT_QUALITIES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(kw_only=True)
class RewardEvalResult:
    """What the pipeline measured; also written to ``output_dir/metrics.json``."""

    task: str
    num_examples: int
    data_skips: dict[str, int]
    model_rollout: dict[str, Any]
    sweep: list[dict[str, Any]]
    loss: dict[str, float]
    timings: dict[str, float]
    files: dict[str, str] = field(default_factory=dict)


def _load_model_and_processor(cfg: VisualRFTConfig, work_dir: Path):
    if cfg.model.hf_path is None:
        tokenizer = build_tiny_tokenizer(work_dir / "tokenizer")
        model = build_preset_hf_model(cfg.model.family, cfg.model.tiny_preset, tokenizer, seed=cfg.trainer.seed)
    else:
        from transformers import AutoModelForImageTextToText

        tokenizer = load_tokenizer(cfg.model.hf_path)
        model = AutoModelForImageTextToText.from_pretrained(cfg.model.hf_path, dtype=torch.float32).eval()
    processor = build_qwen2vl_processor(tokenizer, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    return tokenizer, model, processor


def _model_inputs(example, extra_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Batch-of-one model inputs for a preprocessed example, optionally with appended tokens."""
    ids = example.input_ids if extra_ids is None else torch.cat([example.input_ids, extra_ids])
    n_extra = 0 if extra_ids is None else extra_ids.numel()
    mm = torch.cat([example.mm_token_type_ids, torch.zeros(n_extra, dtype=torch.long)])
    return {
        "input_ids": ids[None],
        "attention_mask": torch.ones_like(ids)[None],
        "mm_token_type_ids": mm[None],
        "pixel_values": example.pixel_values,
        "image_grid_thw": example.image_grid_thw,
    }


@torch.no_grad()
def generate_with_model(model, tokenizer, examples, *, max_new_tokens: int, temperature: float, top_p: float,
                        seed: int, progress: bool) -> list[str]:
    """One sampled completion per example from a transformers Qwen2-VL model (CPU)."""
    torch.manual_seed(seed)
    completions = []
    for example in tqdm(examples, desc="model rollout", disable=not progress, leave=False):
        inputs = _model_inputs(example)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                             top_p=top_p, pad_token_id=tokenizer.pad_token_id)
        completions.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return completions


def score_completion_logprobs(model, tokenizer, example, completions: list[str], temperature: float):
    """Teacher-forced per-token log-probs of each completion, padded: ``(G, T)`` and mask ``(G, T)``."""
    rows = []
    for text in completions:
        ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False) or [tokenizer.pad_token_id])
        logits = model(**_model_inputs(example, ids)).logits[0]  # (P + T, V)
        prompt_len = example.input_ids.numel()
        # position p predicts token p + 1: completion tokens are predicted by positions P-1 .. P+T-2
        rows.append(token_logprobs(logits[prompt_len - 1:-1].float(), ids, temperature=temperature, impl="torch"))
    width = max(r.numel() for r in rows)
    logp = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])
    mask = torch.stack([torch.arange(width) < r.numel() for r in rows]).float()
    return logp, mask


def run_reward_eval(cfg: VisualRFTConfig, *, qualities=DEFAULT_QUALITIES, num_model_prompts: int = 4,
                    num_loss_prompts: int = 2) -> RewardEvalResult:
    """Run the pipeline for ``cfg`` and write metrics, a report and plots to ``trainer.output_dir``."""
    timer = PhaseTimer()
    out_dir = Path(cfg.trainer.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = cfg.logging.progress_bar
    task = cfg.data.task
    group_size = cfg.rollout.num_generations

    with timer.phase("data"):
        records = load_records(
            cfg.data.source, task, path=cfg.data.path, image_root=cfg.data.image_root,
            box_space=cfg.data.coord_space, annotation_coord_space=cfg.data.annotation_coord_space,
            k_shot=cfg.data.k_shot, categories=cfg.data.categories, num_synthetic=cfg.data.num_synthetic,
            seed=cfg.data.seed, on_error=cfg.data.on_error,
        )
    with timer.phase("model_build"):
        tokenizer, model, processor = _load_model_and_processor(cfg, out_dir)
    with timer.phase("preprocess"):
        examples, skips = preprocess_records(records, processor, box_space=cfg.data.coord_space,
                                             on_error=cfg.data.on_error)
        skips.merge(records.skips)
        ground_truths = [e.ground_truth for e in examples]  # in the model's box space
    terms, options = reward_terms(cfg)
    class_names = sorted({gt.label for gt in ground_truths if gt.label})

    with timer.phase("model_rollout"):
        head = examples[:num_model_prompts]
        model_completions = generate_with_model(
            model, tokenizer, head, max_new_tokens=min(cfg.rollout.max_new_tokens, 48),
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=cfg.trainer.seed, progress=progress)
        model_scores = compute_rewards(model_completions, ground_truths[:len(head)], terms, reward_options=options)
    model_rollout = {
        "num_prompts": len(head),
        "reward_mean": float(model_scores.total.mean()),
        "metrics": model_scores.metrics(),
        "example_completion": model_completions[0][:200],
    }

    sweep = []
    for quality in tqdm(qualities, desc="quality sweep", disable=not progress, leave=False):
        policy = ScriptedPolicy(quality=quality, class_names=class_names, seed=cfg.trainer.seed)
        with timer.phase("scripted_rollout"):
            completions = [c for gt in ground_truths for c in policy.sample(task, gt, group_size)]
            gts = [gt for gt in ground_truths for _ in range(group_size)]
        with timer.phase("rewards"):
            scores = compute_rewards(completions, gts, terms, reward_options=options)
        with timer.phase("advantages"):
            group_ids = torch.arange(len(ground_truths)).repeat_interleave(group_size)
            advantages = compute_advantages(cfg.algorithm.advantage_estimator, scores.total, group_ids)
        with timer.phase("evaluation"):
            first = completions[::group_size]  # one answer per example, as at evaluation time
            eval_options = {"mode": cfg.reward.classification_mode} if task == "classification" else {}
            evaluation = evaluate_completions(task, first, ground_truths, **eval_options)
        sweep.append({
            "quality": quality,
            "reward_mean": float(scores.total.mean()),
            "reward_columns": {n: float(c.mean()) for n, c in scores.scores.items()},
            "parse_failures": {n: dict(f) for n, f in scores.failures.items()},
            "advantage_abs_mean": float(advantages.abs().mean()),
            "zero_advantage_groups": int((advantages.view(-1, group_size).abs().sum(1) == 0).sum()),
            "evaluation": {k: v for k, v in evaluation.items() if k not in ("per_category", "per_class_accuracy")},
        })

    with timer.phase("grpo_loss"):
        loss = _grpo_loss_on_model(cfg, model, tokenizer, examples[:num_loss_prompts],
                                   ground_truths[:num_loss_prompts], terms, options, class_names)

    result = RewardEvalResult(
        task=task, num_examples=len(examples), data_skips=dict(skips.counts), model_rollout=model_rollout,
        sweep=sweep, loss=loss, timings=dict(timer.seconds),
    )
    with timer.phase("report"):
        result.files = write_report(result, out_dir, plots=cfg.logging.plots)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    result.timings = dict(timer.seconds)
    (out_dir / "metrics.json").write_text(json.dumps(_jsonable(result.__dict__), indent=2))
    logger.info("phase timings\n%s", timer.table())
    return result


def _grpo_loss_on_model(cfg, model, tokenizer, examples, ground_truths, terms, options, class_names):
    """One GRPO loss + backward on the model for a group of mid-quality completions per prompt."""
    import copy

    group_size = cfg.rollout.num_generations
    policy = ScriptedPolicy(quality=0.5, class_names=class_names, seed=cfg.trainer.seed + 1)
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    model.train()
    model.zero_grad(set_to_none=True)
    total_loss, metrics = 0.0, {}
    for example, gt in zip(examples, ground_truths):
        completions = policy.sample(example.task, gt, group_size)
        scores = compute_rewards(completions, [gt] * group_size, terms, reward_options=options)
        advantages = compute_advantages(cfg.algorithm.advantage_estimator, scores.total[None])[0]
        logp, mask = score_completion_logprobs(model, tokenizer, example, completions, cfg.rollout.temperature)
        with torch.no_grad():
            ref_logp, _ = score_completion_logprobs(reference, tokenizer, example, completions, cfg.rollout.temperature)
        a = cfg.algorithm
        out = compute_grpo_loss(
            logp, logp.detach(), ref_logp, advantages, mask, policy_loss=a.policy_loss,
            loss_agg_mode=a.loss_agg_mode, clip_eps_low=a.clip_ratio_low, clip_eps_high=a.clip_ratio_high,
            clip_ratio_c=a.dual_clip_c, kl_estimator=a.kl_estimator, kl_coef=a.kl_coef, kl_clamp=a.kl_clamp,
        )
        (out.loss / len(examples)).backward()
        total_loss += out.loss.item() / len(examples)
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v.item() / len(examples)
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    vision_grads = [p.grad.norm() for n, p in model.named_parameters() if p.grad is not None and "visual" in n]
    model.eval()
    return {
        "loss": total_loss,
        "grad_norm": float(torch.stack(grads).norm()) if grads else 0.0,
        "vision_grad_norm": float(torch.stack(vision_grads).norm()) if vision_grads else 0.0,
        **metrics,
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value
