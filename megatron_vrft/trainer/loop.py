"""The Visual-RFT training loop: the only place that knows the order of the stages.

Per GRPO step::

    prompts (seeded, resumable)  ->  weight sync (trainer shards -> engine, bucketed)
    -> rollout (G per prompt, split over all ranks, gathered)  ->  rewards + group advantages
    -> reference (and old-policy) log-probs, forward-only  ->  PPO epochs (megatron-core schedules)
    -> metrics, checkpoint

An SFT phase on the same infrastructure runs first (``trainer.sft_warmup_steps``, the format
warm-up) or alone (``algorithm.name = "sft"``, the paper's SFT baseline).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_vrft import builders
from megatron_vrft.config import RUN_CONFIG_FILE, VisualRFTConfig, config_to_dict
from megatron_vrft.data import dp_shard
from megatron_vrft.data.prompts import format_answer
from megatron_vrft.eval.evaluate import evaluate_completions
from megatron_vrft.rl import aggregate_loss, compute_grpo_loss, compute_kl, compute_rollout_correction
from megatron_vrft.rollout.engine import RolloutEngine
from megatron_vrft.rollout.offload import Offloader, trainer_tensors
from megatron_vrft.rollout.types import RolloutBatch, SamplingParams
from megatron_vrft.rollout.weight_export import export_hf_weights
from megatron_vrft.storage import atomic_write_bytes
from megatron_vrft.trainer import checkpoint as ckpt
from megatron_vrft.trainer.actor import copy_weights, forward_logprobs, policy_sharded_state_dict
from megatron_vrft.trainer.batching import MicroBatch, build_micro_batches
from megatron_vrft.trainer.faults import fault_active, maybe_crash, poisoned
from megatron_vrft.trainer.flops import lm_forward_flops, peak_flops
from megatron_vrft.trainer.metrics import MetricsLogger
from megatron_vrft.trainer.scoring import score_rollout, scored_metrics
from megatron_vrft.trainer.setup import RunContext, build_run
from megatron_vrft.trainer.timing import PhaseTimer

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainResult:
    output_dir: Path
    steps: int
    final_metrics: dict
    hf_checkpoint: Path | None
    files: dict[str, str]


def run_summary(run: RunContext) -> str:
    """The start-up summary: layout, engine, model, data, steps and output, one line each."""
    cfg, g = run.cfg, run.groups
    model = cfg.model.hf_path or f"the built-in random '{cfg.model.tiny_preset}' preset"
    steps = f"{cfg.trainer.num_steps} {cfg.algorithm.name.upper()} steps"
    if cfg.algorithm.name == "grpo" and cfg.trainer.sft_warmup_steps:
        steps = f"{cfg.trainer.sft_warmup_steps} SFT warm-up steps, then {steps}"
    return "\n".join([
        "run:",
        f"  layout   world {run.world_size} = TP {g.tp_size} x PP {g.pp_size} x DP {g.dp_size}",
        f"  engine   {run.engine.name} (rollout.engine={cfg.rollout.engine}; {run.engine.num_replicas} replica(s))",
        f"  model    {cfg.model.family}: {model}, {cfg.model.dtype}",
        f"  data     {cfg.data.source} {cfg.data.task}: {len(run.examples)} prompts, {len(run.eval_prompts)} held out; "
        f"{cfg.data.prompts_per_step} prompts x {cfg.rollout.num_generations} responses per step",
        f"  steps    {steps}",
        f"  output   {cfg.trainer.output_dir}",
    ])  # fmt: skip


def prompt_seed(seed: int, step: int, index: int) -> int:
    """A seed for ``(run seed, step, index)`` (index: a rank's rollout call, or a marker)."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def sft_warmup_before_grpo(cfg: VisualRFTConfig) -> int:
    """SFT steps before GRPO starts (with a fresh optimizer); 0 when GRPO starts at once or the run
    is SFT only."""
    return cfg.trainer.sft_warmup_steps if cfg.algorithm.name == "grpo" else 0


def train(cfg: VisualRFTConfig) -> TrainResult:
    run = build_run(cfg)
    timer = PhaseTimer()
    out_dir = Path(cfg.trainer.output_dir)
    total_steps = cfg.trainer.sft_warmup_steps + cfg.trainer.num_steps
    if run.rank == 0:
        logger.info("%s", run_summary(run))
    start_step = 0
    warmup = sft_warmup_before_grpo(cfg)
    if cfg.trainer.resume and (path := ckpt.latest_checkpoint(out_dir)) is not None:
        start_step = load_train_state(run, path)
        logger.info("resumed from %s (step %d)", path, start_step)
    if run.rank == 0:
        ckpt.remove_incomplete(out_dir)
        # the run's config beside its checkpoints from the start: tools/evaluate.py finds it there
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / RUN_CONFIG_FILE, json.dumps(config_to_dict(cfg), indent=2).encode())
    metrics = MetricsLogger(
        out_dir,
        active=run.rank == 0,
        jsonl=cfg.logging.jsonl,
        tensorboard=cfg.logging.tensorboard,
        resume_step=start_step,
        wandb_project=cfg.logging.wandb_project,
        config=config_to_dict(cfg),
    )
    weights_stale = True
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        disable=run.rank != 0 or not cfg.logging.progress_bar,
        dynamic_ncols=True,
    )
    last: dict = {}
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        step_timer = PhaseTimer()
        if step <= cfg.trainer.sft_warmup_steps or cfg.algorithm.name == "sft":
            bar.set_description("sft warm-up" if cfg.algorithm.name == "grpo" else "sft", refresh=False)
            record = sft_step(run, step, step_timer)
            if run.reference is not None and step == warmup:
                with reference_resident(run):  # GRPO's reference is the warmed-up policy
                    copy_weights(run.actor.policies, run.reference)
        else:
            if warmup and step == warmup + 1:
                run.actor.reset_optimizer(cfg.trainer.num_steps)
            bar.set_description("grpo", refresh=False)
            record = grpo_step(run, step, step_timer, sync_weights=weights_stale)
        weights_stale = True
        record.update({f"time/{k}": v for k, v in step_timer.seconds.items()})
        record["time/step"] = time.perf_counter() - t0
        record["memory/rss_mb"] = _rss_mb()
        for k, v in step_timer.seconds.items():
            timer.seconds[k] = timer.seconds.get(k, 0.0) + v
            timer.calls[k] = timer.calls.get(k, 0) + 1
        metrics.log(step, record)
        last = record
        if step % cfg.logging.log_interval == 0:
            shown = {
                k.split("/")[-1]: f"{record[k]:.3f}"
                for k in ("reward/total", "reward/accuracy", "sft_loss")
                if k in record
            }
            bar.set_postfix(shown, refresh=False)
            if bar.disable and run.rank == 0:
                logger.info("step %d/%d %s", step, total_steps, " ".join(f"{k}={v}" for k, v in shown.items()))
        bar.update(1)
        if (
            run.eval_prompts
            and cfg.trainer.eval_interval
            and step % cfg.trainer.eval_interval == 0
            and step != total_steps
        ):  # the last step's evaluation follows the HF export
            with timer.phase("evaluation"):
                metrics.log(step, {"phase": "eval", **evaluate(run, step)})
        save_now = cfg.trainer.save_interval and step % cfg.trainer.save_interval == 0
        if save_now or step == total_steps:
            with timer.phase("checkpoint"):
                save_train_state(run, step)
            if cfg.logging.plots:
                metrics.plot()
    bar.close()
    with timer.phase("hf_export"):
        hf_dir = export_hf_checkpoint(run, out_dir / "hf_checkpoint")
    final = {}
    if run.eval_prompts:
        with timer.phase("evaluation"):
            final = evaluate(run, total_steps)
        metrics.log(total_steps, {"phase": "eval", **final})
    skipped = int(sum(r.get("skipped", 0) for r in metrics.records))  # the whole run's, resumes included
    if skipped and run.rank == 0:
        logger.warning("%d step(s) skipped for non-finite gradients (the 'skipped' metric names them)", skipped)
    files = {}
    if cfg.logging.plots and (png := metrics.plot()) is not None:
        files["reward_curve"] = str(png)
    metrics.close()
    if run.rank == 0:
        logger.info("phase timings (all steps)\n%s", timer.table())
    return TrainResult(
        output_dir=out_dir,
        steps=total_steps,
        final_metrics={**last, **final, "skipped_steps": skipped},
        hf_checkpoint=hf_dir,
        files=files,
    )


# -- stages ----------------------------------------------------------------------------------------


def sft_step(run: RunContext, step: int, timer: PhaseTimer) -> dict:
    """One supervised step: cross-entropy on target answers (random class names for the format
    warm-up, ground truth for the SFT baseline)."""
    cfg = run.cfg
    with timer.phase("data"):
        prompts = [run.examples[i] for i in run.batcher.next_indices()]
        rng = random.Random(prompt_seed(cfg.trainer.seed, step, 2**31))  # not a call index
        class_names = sorted({e.ground_truth.label for e in run.examples if e.ground_truth.label})
        end_of_answer = run.sampling.stop_token_ids[0]
        responses = []
        for p in prompts:
            gt = p.ground_truth
            if cfg.algorithm.name == "grpo" and cfg.trainer.sft_warmup_answers == "random":
                gt = type(gt)(label=rng.choice(class_names))
            text = format_answer(gt, p.task)
            responses.append(torch.tensor(run.tokenizer.encode(text, add_special_tokens=False) + [end_of_answer]))
        # Answers are drawn for the whole batch, then sliced: the same whatever the DP size.
        mine = dp_shard(len(prompts), dp_rank=run.groups.dp_rank, dp_size=run.groups.dp_size)
        mbs = build_micro_batches(
            run.arch,
            prompts[mine],
            responses[mine],
            micro_batch_tokens=cfg.trainer.micro_batch_tokens,
            pad_token_id=run.tokenizer.pad_token_id,
        )
    total = dp_mean(sum(mb.num_tokens for mb in mbs), group=run.groups.dp_group)

    def loss_fn(mb: MicroBatch, lp: torch.Tensor, ent: torch.Tensor):
        loss = aggregate_loss(-lp, mb.response_mask, "token-mean", normalizer=total)
        return loss, {
            "sft_loss": float(loss.detach()),
            "entropy": float((ent.detach() * mb.response_mask).sum() / total),
        }

    if fault_active("nan_loss", step):
        loss_fn = poisoned(loss_fn)
    with timer.phase("update"):
        stats, opt = run.actor.train_step(mbs, loss_fn, temperature=1.0)
    out = {"phase": "sft", **mean_over_ranks(sum_micro_batch_stats(stats, sums=("sft_loss", "entropy"))), **opt}
    out.update(model_flops_metrics(run, mbs, passes=3, seconds=timer.seconds["update"]))
    return out


def grpo_step(run: RunContext, step: int, timer: PhaseTimer, *, sync_weights: bool) -> dict:
    cfg = run.cfg
    with timer.phase("data"):
        indices = [int(i) for i in run.batcher.next_indices()]
        prompts = [run.examples[i] for i in indices]
    if sync_weights:
        with timer.phase("weight_sync"):
            run.engine.wake_up(["weights"])
            run.engine.update_weights(policy_weights(run))
    offload = cfg.trainer.offload_during_rollout if run.on_gpu else []
    if offload:
        with timer.phase("offload"):
            offloader = Offloader(trainer_tensors(run.actor.chunks, run.actor.optimizer))
            released_bytes = offloader.offload(offload)
    with timer.phase("rollout"):
        run.engine.wake_up(["kv_cache"])
        batch = rollout(
            run.engine,
            prompts,
            run.sampling,
            seed=cfg.trainer.seed,
            step=step,
            prompts_per_call=cfg.rollout.prompts_per_call,
        )
        run.engine.sleep(cfg.rollout.vllm.sleep_level)
    if offload:
        with timer.phase("offload"):
            offloader.onload()

    maybe_crash("step", step)
    with timer.phase("rewards"):
        gts = [run.reward_ground_truths[i] for i in indices]
        scored = score_rollout(
            batch,
            gts,
            terms=run.reward_terms,
            options=run.reward_options,
            advantage_estimator=cfg.algorithm.advantage_estimator,
        )
        record = {"phase": "grpo", **scored_metrics(scored, cfg.rollout.num_generations)}
        local = dp_rows(batch.group_ids, batch.num_groups, dp_rank=run.groups.dp_rank, dp_size=run.groups.dp_size)
        mbs = build_micro_batches(
            run.arch,
            [batch.prompt_of(i) for i in local],
            [batch.response_ids[i] for i in local],
            micro_batch_tokens=cfg.trainer.micro_batch_tokens,
            pad_token_id=run.tokenizer.pad_token_id,
            advantages=scored.advantages[local],
            sampling_logprobs=[batch.sampling_logprobs[i] for i in local],
        )
    temperature = cfg.rollout.temperature
    if run.reference is not None:
        with timer.phase("ref_logprobs"):
            if run.reference_offloader is not None:
                run.reference_offloader.onload()
            ref = forward_logprobs(
                run.reference,
                mbs,
                groups=run.groups,
                temperature=temperature,
                blocked_token_ids=run.actor.blocked_token_ids,
            )
            if run.reference_offloader is not None:
                run.reference_offloader.offload(["params"])
            for mb, lp in zip(mbs, ref or [None] * len(mbs)):
                mb.ref_logprobs = lp
    if cfg.algorithm.ppo_epochs > 1:
        with timer.phase("old_logprobs"):
            old = forward_logprobs(
                run.actor.chunks,
                mbs,
                groups=run.groups,
                temperature=temperature,
                blocked_token_ids=run.actor.blocked_token_ids,
            )
            for mb, lp in zip(mbs, old or [None] * len(mbs)):
                mb.old_logprobs = lp
    a = cfg.algorithm
    total_tokens = dp_mean(sum(mb.num_tokens for mb in mbs), group=run.groups.dp_group)
    total_rows = dp_mean(sum(int((mb.response_mask.sum(1) > 0).sum()) for mb in mbs), group=run.groups.dp_group)
    loss_fn = build_grpo_loss_fn(
        builders.grpo_loss_options(a),
        correction=builders.rollout_correction_options(a),
        entropy_coef=a.entropy_coef,
        normalizer=total_tokens if a.loss_agg_mode == "token-mean" else total_rows,
        total_tokens=total_tokens,
        max_response_length=cfg.rollout.max_new_tokens,
    )
    if fault_active("nan_loss", step):
        loss_fn = poisoned(loss_fn)
    with timer.phase("update"):
        for epoch in range(cfg.algorithm.ppo_epochs):
            stats, opt = run.actor.train_step(mbs, loss_fn, temperature=temperature)
            if epoch == 0:
                record.update(mean_over_ranks(sum_micro_batch_stats(stats, sums=SUMMED_STATS)))
            record.update(opt)
    if offload:
        record["memory/offloaded_during_rollout_mb"] = released_bytes / 2**20
    # forward + backward (3 forward-equivalents) per PPO epoch, plus the forward-only passes
    passes = 3 * cfg.algorithm.ppo_epochs + (run.reference is not None) + (cfg.algorithm.ppo_epochs > 1)
    seconds = sum(timer.seconds.get(k, 0.0) for k in ("update", "ref_logprobs", "old_logprobs"))
    record.update(model_flops_metrics(run, mbs, passes=passes, seconds=seconds))
    n_tokens = int(batch.response_lengths().sum())
    record["throughput/rollout_tokens_per_s"] = n_tokens / max(timer.seconds.get("rollout", 1e-9), 1e-9)
    record["throughput/update_tokens_per_s"] = (
        sum(mb.input_ids.numel() for mb in mbs) * cfg.algorithm.ppo_epochs / max(timer.seconds["update"], 1e-9)
    )
    return record


def model_flops_metrics(run: RunContext, mbs: list[MicroBatch], *, passes: int, seconds: float) -> dict:
    """Achieved model TFLOP/s per device in the trainer's passes over ``mbs`` (this DP rank's share,
    split over its TP x PP devices), and MFU against the device's dense peak on a known GPU."""
    flops = passes * sum(lm_forward_flops(run.arch, [mb.input_ids.shape[1]] * mb.input_ids.shape[0]) for mb in mbs)
    per_device = flops / (run.groups.tp_size * run.groups.pp_size) / max(seconds, 1e-9)
    out = {"perf/model_tflops_per_device": per_device / 1e12}
    if run.on_gpu:
        dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[run.cfg.model.dtype]
        if (peak := peak_flops(torch.cuda.get_device_name(), dtype)) is not None:
            out["perf/mfu"] = per_device / peak
    return out


SUMMED_STATS = (
    "loss",
    "pg_loss",
    "kl_loss",
    "entropy",
    "rollout/logprob_abs_diff_mean",
    "rollout/kl_k3",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "approx_kl",
    "ratio_mean",
    "rollout/rollout_is_mean",
    "rollout/rollout_is_truncated_frac",
    "rollout/rollout_is_masked_frac",
    "rollout/rollout_kl_k3",
)


def build_grpo_loss_fn(
    loss_options: dict,
    *,
    correction: dict | None,
    entropy_coef: float,
    normalizer: float,
    total_tokens: float,
    max_response_length: int | None = None,
):
    """The per-micro-batch GRPO loss and its stats, for megatron's schedule.

    ``loss_options``: ``rl.compute_grpo_loss`` keywords (``builders.grpo_loss_options``);
    ``correction``: ``rl.compute_rollout_correction`` keywords or None; ``normalizer``: the global
    token or sequence count the loss is a sum over (DP mean, see :func:`dp_mean`); ``total_tokens``:
    the global token count, which weighs the micro-batch means in the stats; ``max_response_length``:
    the constant length ``seq-mean-token-sum-norm`` divides by (``rollout.max_new_tokens``; None
    would be each micro-batch's padded prompt + response width, which differs between them).
    """
    loss_agg_mode = loss_options["loss_agg_mode"]

    def loss_fn(mb: MicroBatch, lp: torch.Tensor, ent: torch.Tensor):
        mask = mb.response_mask
        old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
        weights, correction_stats = None, {}
        if correction is not None:
            weights, correction_stats = compute_rollout_correction(old, mb.sampling_logprobs, mask, **correction)
        out = compute_grpo_loss(
            lp,
            old,
            mb.ref_logprobs,
            mb.advantages,
            mask,
            normalizer=normalizer,
            token_weights=weights,
            impl="auto",
            max_response_length=max_response_length,
            **loss_options,
        )
        loss = out.loss
        entropy = aggregate_loss(
            ent, mask, loss_agg_mode, normalizer=normalizer, max_response_length=max_response_length
        )
        if entropy_coef:
            loss = loss - entropy_coef * entropy
        w = mb.num_tokens / max(total_tokens, 1)
        m = out.metrics
        mismatch = (mb.sampling_logprobs - lp.detach()) * mask
        stats = {
            "loss": float(loss.detach()),
            "pg_loss": float(m["pg_loss"]),
            "entropy": float(entropy.detach()),
            "rollout/logprob_abs_diff_mean": float(mismatch.abs().sum() / max(total_tokens, 1)),
            "rollout/logprob_abs_diff_max": float(mismatch.abs().max()),
            "rollout/kl_k3": float(
                (compute_kl(lp.detach(), mb.sampling_logprobs, "k3") * mask).sum() / max(total_tokens, 1)
            ),
        }
        if "kl_loss" in m:
            stats["kl_loss"] = float(m["kl_loss"])
        for k in ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean"):
            stats[k] = float(m[k]) * w
        for k, v in correction_stats.items():
            stats[f"rollout/{k}"] = float(v) * w
        return loss, stats

    return loss_fn


def rollout(
    engine: RolloutEngine, prompts: list, sampling: SamplingParams, *, seed: int, step: int, prompts_per_call: int
) -> RolloutBatch:
    """Generate for ``prompts``: calls of ``prompts_per_call`` prompts, each seeded by
    ``(seed, step, call)``, dealt to the engine replicas round-robin and gathered on every rank in
    prompt order. The samples depend on neither the world size nor the trainer's TP/PP layout."""
    calls = [list(range(s, min(s + prompts_per_call, len(prompts)))) for s in range(0, len(prompts), prompts_per_call)]
    parts = []
    for c in range(engine.replica_index, len(calls), engine.num_replicas):
        local = engine.generate([prompts[i] for i in calls[c]], sampling, seed=prompt_seed(seed, step, c))
        rows = local.rows()
        rows.group_ids = rows.group_ids + calls[c][0]
        parts.append(rows)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, parts if engine.reports_samples else [])
    batch = RolloutBatch.from_rows(prompts, [p for rank_parts in gathered for p in rank_parts])
    order = torch.argsort(batch.group_ids, stable=True)
    return RolloutBatch(
        prompts=prompts,
        group_ids=batch.group_ids[order],
        response_ids=[batch.response_ids[i] for i in order],
        sampling_logprobs=[batch.sampling_logprobs[i] for i in order],
        finish_reasons=[batch.finish_reasons[i] for i in order],
        texts=[batch.texts[i] for i in order],
    )


def dp_mean(local_count: float, *, group) -> float:
    """The data-parallel mean of a count. Losses normalised by it and averaged over DP ranks by
    megatron's DDP equal the loss of the whole batch normalised by the global count."""
    t = torch.tensor(float(local_count), dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return float(t) / dist.get_world_size(group)


def dp_rows(group_ids: torch.Tensor, num_groups: int, *, dp_rank: int, dp_size: int) -> list[int]:
    """Rows of this data-parallel rank: those of the groups in its :func:`dp_shard` of the prompts."""
    mine = dp_shard(num_groups, dp_rank=dp_rank, dp_size=dp_size)
    return [i for i, g in enumerate(group_ids.tolist()) if mine.start <= g < mine.stop]


def sum_micro_batch_stats(stats: list[dict] | None, *, sums: tuple[str, ...]) -> dict:
    """One rank's stats of a step from its micro-batches' (last pipeline stage; others have none):
    ``*_max`` keys by max, ``sums`` keys summed (they are pre-weighted per micro-batch), the rest
    dropped."""
    local: dict = {}
    for s in stats or []:
        for k, v in s.items():
            if k.endswith("_max"):
                local[k] = max(local.get(k, float("-inf")), v)
            elif k in sums:
                local[k] = local.get(k, 0.0) + v
    return local


def mean_over_ranks(local: dict) -> dict:
    """Each key's mean over the ranks that have it (every rank of the world takes part)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    filled = [g for g in gathered if g]
    keys = sorted({k for g in filled for k in g})
    return {k: float(np.mean([g[k] for g in filled if k in g])) for k in keys}


@torch.no_grad()
def evaluate(run: RunContext, step: int) -> dict:
    """Greedy answers of the trained policy on held-out prompts, scored by the rewards."""
    cfg = run.cfg
    run.engine.wake_up(["weights"])
    run.engine.update_weights(policy_weights(run))
    run.engine.wake_up(["kv_cache"])
    prompts = run.eval_prompts
    batch = rollout(
        run.engine,
        prompts,
        run.eval_sampling,
        seed=cfg.trainer.seed,
        step=0,
        prompts_per_call=cfg.rollout.prompts_per_call,
    )
    run.engine.sleep(cfg.rollout.vllm.sleep_level)
    scored = score_rollout(
        batch, run.eval_ground_truths, terms=run.reward_terms, options=run.reward_options, advantage_estimator="drgrpo"
    )
    out = {f"eval/{k.split('/', 1)[1]}": v for k, v in scored_metrics(scored, 1).items() if k.startswith("reward/")}
    # the task metrics tools/evaluate.py reports (accuracy / COCO mAP / grounding IoU), same code
    task = evaluate_completions(
        cfg.data.task, batch.texts, batch.ground_truths(), **builders.eval_options(cfg.data, cfg.reward)
    )
    out.update({f"eval/task/{k}": float(v) for k, v in task.items() if isinstance(v, (int, float))})
    out["eval/num_prompts"] = len(prompts)
    if run.rank == 0:
        shown = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in out.items() if k.startswith("eval/task/") and
                          k != "eval/task/num_samples")  # fmt: skip
        tqdm.write(f"evaluation at step {step} on {len(prompts)} held-out prompts: {shown}")
        examples = [
            {"source_id": batch.prompt_of(i).source_id, "completion": batch.texts[i]} for i in range(min(8, len(batch)))
        ]
        (Path(cfg.trainer.output_dir) / "eval_examples.json").write_text(json.dumps(examples, indent=1))
    return out


# -- state -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def reference_resident(run: RunContext):
    """The reference model's parameters in place (onloaded) for the duration of the block."""
    if run.reference_offloader is None:
        yield
        return
    run.reference_offloader.onload()
    try:
        yield
    finally:
        run.reference_offloader.offload(["params"])


def train_state(run: RunContext, step: int, *, is_loading: bool = False, with_rng: bool = True) -> dict:
    """Everything a resume needs, as one megatron-core sharded state dict: the actor (model,
    optimizer, LR schedule), the reference model, the prompt iterator and the RNG states.

    Tensors carry global keys (any layout loads them); the RNG states are one object per rank, so
    ``with_rng=False`` when loading a checkpoint written at another layout.
    """
    from megatron.core.dist_checkpointing import ShardedObject

    state = {
        "step": step,
        "actor": run.actor.sharded_state_dict(is_loading=is_loading),
        "batcher": run.batcher.state_dict(),
    }
    if run.reference is not None:
        state["reference"] = {
            f"chunk{i}": policy_sharded_state_dict(m, run.groups, prefix="reference.")
            for i, m in enumerate(run.reference)
        }
    if with_rng:
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        state["rng"] = ShardedObject("rng_state", rng, (run.world_size,), (run.rank,), replica_id=0)
    return state


def save_train_state(run: RunContext, step: int) -> Path:
    """Checkpoint ``step`` (collective); the directory doubles as a model checkpoint."""
    from megatron_vrft.models.conversion import write_checkpoint_meta

    with reference_resident(run):
        return ckpt.save_checkpoint(
            run.cfg.trainer.output_dir,
            step,
            train_state(run, step),
            layout=run.layout,
            keep=run.cfg.trainer.keep_checkpoints,
            describe=lambda d: write_checkpoint_meta(d, run.arch),
        )


def load_train_state(run: RunContext, path: Path) -> int:
    """Restore the run from checkpoint ``path`` (written at any layout); returns its step."""
    written = ckpt.read_train_state(path)
    same_layout = written["layout"] == run.layout
    if not same_layout and run.rank == 0:
        logger.warning(
            "resharding checkpoint %s from layout %s to %s; RNG states re-seeded", path, written["layout"], run.layout
        )
    warmup = sft_warmup_before_grpo(run.cfg)
    if warmup and written["step"] >= warmup:
        run.actor.reset_optimizer(run.cfg.trainer.num_steps)  # the GRPO optimizer, then its state
    with reference_resident(run):
        state = ckpt.load_checkpoint(path, train_state(run, written["step"], is_loading=True, with_rng=same_layout))
        run.actor.load_sharded_state_dict(state["actor"])
        if run.reference is not None:
            for i, m in enumerate(run.reference):
                m.load_state_dict(state["reference"][f"chunk{i}"])
    run.batcher.load_state_dict(state["batcher"])
    if same_layout:
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def policy_weights(run: RunContext):
    """The policy's HF-named full tensors, streamed bucket by bucket (collective: every rank of the
    model-parallel group iterates it to the end). One export feeds the engine and the HF writer."""
    return itertools.chain.from_iterable(
        export_hf_weights(
            run.actor.policies, run.arch, run.groups, bucket_bytes=run.cfg.rollout.weight_sync_bucket_mb * 2**20
        )
    )


def export_hf_checkpoint(run: RunContext, out_dir: Path) -> Path | None:
    """The policy as an HF checkpoint (safetensors, config, tokenizer, image processor). Collective."""
    from megatron_vrft.models.conversion_hf import write_hf_checkpoint

    stream = policy_weights(run)
    if run.rank == 0:
        write_hf_checkpoint(
            ((n, t.contiguous()) for n, t in stream), out_dir, config=run.arch.hf_config.to_dict(), overwrite=True
        )
        run.tokenizer.save_pretrained(str(out_dir))
        run.processor.image_processor.save_pretrained(str(out_dir))
    else:
        for _ in stream:
            pass
    dist.barrier()
    return out_dir


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20
