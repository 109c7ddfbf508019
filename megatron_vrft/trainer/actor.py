"""The policy on megatron-core: DDP-wrapped chunks, the megatron optimizer and LR schedule, and the
forward(-backward) passes through megatron-core's pipeline schedules.

``run_forward`` is the one place that runs the model over micro-batches; callers give it a
per-micro-batch loss function evaluated on the last pipeline stage, which returns
``(loss, stats)``. Stats come back (last stage only) as a list, one dict per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vrft.distributed.parallel_state import ParallelGroups
from megatron_vrft.models.conversion import build_policy_sharded_state_dict
from megatron_vrft.models.qwen2_vl.logprobs import compute_token_logprobs
from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy
from megatron_vrft.models.qwen2_vl.parallelize import allreduce_tied_embedding_grads, allreduce_vision_grads
from megatron_vrft.trainer.batching import MicroBatch

BLOCKED_LOGIT = -1.0e4
"""Logit given to blocked tokens: exp() underflows to exactly 0 (no NaN in the entropy, unlike -inf)."""

# loss_fn(micro_batch, log_probs (B, S), entropy (B, S)) -> (scalar loss, stats dict of floats)
LossFn = Callable[[MicroBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass(kw_only=True)
class OptimizerSettings:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    warmup_steps: int
    total_steps: int


def run_forward(
    chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[MicroBatch],
    loss_fn: LossFn,
    *,
    groups: ParallelGroups,
    temperature: float,
    forward_only: bool,
    blocked_token_ids: Sequence[int] = (),
) -> list[dict[str, float]]:
    """One pass of megatron-core's schedule (1F1B with PP, plain with PP = 1) over ``micro_batches``.

    ``blocked_token_ids`` (the rollout engine's, never sampled) get a logit of ``BLOCKED_LOGIT``:
    the log-probs are those of the distribution the engine actually samples from, renormalised
    over the allowed vocabulary.

    The loss the schedule back-propagates is ``loss_fn``'s, multiplied by the number of
    micro-batches (the schedule divides by it): losses given as sums over a global normaliser
    accumulate to the whole-batch loss.
    """
    num = len(micro_batches)
    shard = None

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(
            mb.input_ids,
            mb.position_ids,
            mb.attention_mask,
            pixel_values=mb.pixel_values,
            image_grid_thw=mb.image_grid_thw,
        )

        def loss_func(logits):
            # Only response positions carry a loss: the log-softmax runs over those rows alone
            # (a response is ~10 % of a Visual-RFT sequence), then scatters back into (B, S).
            nonlocal shard
            where = mb.response_mask.bool()
            rows = logits[where]
            if shard is None:
                lo = groups.tp_rank * rows.shape[-1]
                shard = torch.tensor(
                    [t - lo for t in blocked_token_ids if lo <= t < lo + rows.shape[-1]],
                    dtype=torch.long,
                    device=rows.device,
                )
            if shard.numel():
                rows = rows.index_fill(-1, shard, BLOCKED_LOGIT)
            lp_rows, ent_rows = compute_token_logprobs(
                rows, mb.targets[where], tp_group=groups.tp_group, temperature=temperature, return_entropy=True
            )
            lp = torch.zeros(mb.targets.shape, dtype=lp_rows.dtype).masked_scatter(where, lp_rows)
            ent = torch.zeros(mb.targets.shape, dtype=ent_rows.dtype).masked_scatter(where, ent_rows)
            loss, stats = loss_fn(mb, lp, ent)
            return loss * num, stats

        return out, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=list(chunks),
        num_microbatches=num,
        seq_length=max(mb.input_ids.shape[1] for mb in micro_batches),
        micro_batch_size=max(mb.input_ids.shape[0] for mb in micro_batches),
        forward_only=forward_only,
    )


class PolicyActor:
    """Trainable policy chunks of this rank with their optimizer and LR schedule."""

    def __init__(
        self,
        chunks: list[Qwen2VLPolicy],
        groups: ParallelGroups,
        settings: OptimizerSettings,
        *,
        blocked_token_ids: Sequence[int] = (),
    ) -> None:
        self.groups = groups
        self.blocked_token_ids = tuple(blocked_token_ids)
        self.policies = chunks
        config = chunks[0].config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        )
        self.chunks = [DistributedDataParallel(config, ddp_config, c) for c in chunks]
        self.settings = settings
        self.reset_optimizer(settings.total_steps)

    def reset_optimizer(self, total_steps: int) -> None:
        """A fresh optimizer (no moments) and LR schedule (warm-up from 0) over ``total_steps``.

        Called when GRPO starts after the SFT warm-up: the warm-up's Adam moments, fitted to a
        supervised loss, would otherwise scale the first policy-gradient steps.
        """
        s, config = self.settings, self.policies[0].config
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=s.lr,
            min_lr=s.lr,
            weight_decay=s.weight_decay,
            adam_beta1=s.betas[0],
            adam_beta2=s.betas[1],
            clip_grad=s.grad_clip,
            bf16=config.bf16,
            fp16=config.fp16,
            params_dtype=config.params_dtype,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.chunks)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if s.warmup_steps else s.lr,
            max_lr=s.lr,
            min_lr=s.lr,
            lr_warmup_steps=s.warmup_steps,
            lr_decay_steps=max(total_steps, s.warmup_steps + 1),
            lr_decay_style="constant",
            start_wd=s.weight_decay,
            end_wd=s.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )

    def train_step(
        self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, *, temperature: float
    ) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Forward-backward over all micro-batches, gradient sync, one optimizer step.

        Returns the per-micro-batch stats and ``{"grad_norm", "lr", "skipped"}``. A non-finite
        gradient anywhere (a NaN/inf loss, an overflow) skips the update on every rank: no
        optimizer step (megatron's fp32/bf16 optimizers would apply it: they check for overflow only
        under a loss scaler), no LR-schedule step; ``skipped`` is 1 and the caller counts it.
        """
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = run_forward(
            self.chunks,
            micro_batches,
            loss_fn,
            groups=self.groups,
            temperature=temperature,
            forward_only=False,
            blocked_token_ids=self.blocked_token_ids,
        )
        for c in self.chunks:
            c.finish_grad_sync()
        for p in self.policies:
            allreduce_vision_grads(p.vision, self.groups.tp_group, grad_attr="main_grad")
            allreduce_tied_embedding_grads(p.language_model, self.groups.embedding_group, grad_attr="main_grad")
        lr = float(self.optimizer.param_groups[0]["lr"])
        if not self._grads_finite():
            return stats, {"grad_norm": float("nan"), "lr": lr, "skipped": 1.0}
        ok, grad_norm, _ = self.optimizer.step()
        finite = bool(ok) and grad_norm is not None and torch.isfinite(torch.tensor(grad_norm)).item()
        if finite:
            self.scheduler.step(increment=1)
        return stats, {"grad_norm": float(grad_norm or 0.0), "lr": lr, "skipped": float(not finite)}

    def _grads_finite(self) -> bool:
        """Every rank's gradients finite (one flag, MAX-reduced over the world: all ranks agree)."""
        flags = [
            torch.isfinite(p.main_grad).all()
            for c in self.chunks
            for p in c.parameters()
            if getattr(p, "main_grad", None) is not None
        ]
        bad = (~torch.stack(flags)).any().float().reshape(1) if flags else torch.zeros(1)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def sharded_state_dict(self, *, is_loading: bool = False) -> dict:
        """Model chunks, optimizer and LR schedule as a megatron-core sharded state dict (global
        tensor keys: loadable at any TP/PP/DP). ``is_loading`` creates the optimizer state to fill."""
        model = {f"chunk{i}": policy_sharded_state_dict(p, self.groups) for i, p in enumerate(self.policies)}
        return {
            "model": model,
            "optimizer": self.optimizer.sharded_state_dict(model, is_loading=is_loading),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_sharded_state_dict(self, state: dict) -> None:
        """Load what :func:`megatron.core.dist_checkpointing.load` returned for
        :meth:`sharded_state_dict` (``is_loading=True``)."""
        for i, p in enumerate(self.policies):
            p.load_state_dict(state["model"][f"chunk{i}"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def policy_sharded_state_dict(policy: Qwen2VLPolicy, groups: ParallelGroups, *, prefix: str = "") -> dict:
    """One policy chunk as a sharded state dict in the model-checkpoint format (see
    :func:`megatron_vrft.models.conversion.build_policy_sharded_state_dict`)."""
    return build_policy_sharded_state_dict(policy, tp_rank=groups.tp_rank, dp_rank=groups.dp_rank, prefix=prefix)


def forward_logprobs(
    chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[MicroBatch],
    *,
    groups: ParallelGroups,
    temperature: float,
    blocked_token_ids: Sequence[int] = (),
) -> list[torch.Tensor] | None:
    """Per-micro-batch log-probs ``(B, S)`` (last pipeline stage; None elsewhere), no gradients."""

    def collect(mb, lp, ent):
        return torch.zeros(()), {"logprobs": lp.detach()}

    with torch.no_grad():
        stats = run_forward(
            chunks,
            micro_batches,
            collect,
            groups=groups,
            temperature=temperature,
            forward_only=True,
            blocked_token_ids=blocked_token_ids,
        )
    return [s["logprobs"] for s in stats] if groups.is_last_stage else None


def copy_weights(src: Sequence[torch.nn.Module], dst: Sequence[torch.nn.Module]) -> None:
    """Copy parameters chunk by chunk (same layout), e.g. the policy into the reference model."""
    with torch.no_grad():
        for a, b in zip(src, dst, strict=True):
            for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
                if na != nb:
                    raise ValueError(f"parameter order differs: {na} vs {nb}")
                pb.copy_(pa)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
