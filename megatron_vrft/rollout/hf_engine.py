"""The transformers engine: Qwen2-VL ``generate`` (KV cache, batched) on any device.

The default where vLLM is absent (a laptop, this CPU), fed through the same ``update_weights`` path
as the vLLM engine. One left-padded ``generate`` call with ``num_return_sequences = n``, seeded per
call: the samples depend on the seed and on which prompts share the call (the trainer splits
prompts over ranks the same way whatever the TP/PP layout, so a layout change alone does not
change them).

Sampling log-probs are read from ``generate``'s processed scores (after temperature, top-k, top-p and
the blocked tokens), i.e. the distribution each token was actually drawn from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_vrft.data.processing import PreprocessedExample
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch, hf_classes
from megatron_vrft.models.qwen2_vl.state_dict_adapter import hf_hub_name, hf_in_memory_name, hf_param_shapes
from megatron_vrft.rollout.types import FINISH_LENGTH, FINISH_STOP, RolloutBatch, SamplingParams


class WeightUpdateError(ValueError):
    """A weight update named a tensor the engine does not have, missed one, or mis-shaped one."""


def check_weight_names(received: dict[str, torch.Size], expected: dict[str, torch.Size]) -> None:
    """Raise :class:`WeightUpdateError` naming every missing, extra and mis-shaped tensor."""
    missing = sorted(set(expected) - set(received))
    extra = sorted(set(received) - set(expected))
    bad = sorted(
        f"{n}: got {tuple(received[n])}, expected {tuple(expected[n])}"
        for n in set(received) & set(expected)
        if tuple(received[n]) != tuple(expected[n])
    )
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
        if extra:
            parts.append(f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''} ({len(extra)})")
        if bad:
            parts.append(f"mis-shaped {bad[:8]}")
        raise WeightUpdateError("weight update does not match the engine's model: " + "; ".join(parts))


class HFEngine:
    """Rollout engine on transformers' Qwen2-VL.

    Args:
        arch: architecture (its HF config builds the model; weights come from ``update_weights``).
        pad_token_id: id used by ``generate`` to pad finished rows.
        blocked_token_ids: never sampled (image/vision special tokens, padded vocabulary rows).
        device: where the model runs.
        dtype: model dtype.
    """

    name = "hf"

    def __init__(
        self,
        arch: Qwen2VLArch,
        *,
        tokenizer,
        blocked_token_ids: Sequence[int] = (),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.arch = arch
        self.tokenizer = tokenizer
        self.blocked_token_ids = sorted(set(int(t) for t in blocked_token_ids))
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = (
            hf_classes(arch.family).for_generation._from_config(arch.hf_config, dtype=dtype).to(self.device).eval()
        )
        self._expected = hf_param_shapes(arch)
        self._params = dict(self.model.named_parameters())
        self.weights_version = 0
        self._asleep = False
        # one replica per rank: each generates its own calls and reports them
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.num_replicas, self.replica_index = world, dist.get_rank() if dist.is_initialized() else 0
        self.reports_samples = True

    # -- weights -------------------------------------------------------------------------------
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors (hub or in-memory names) in place; all must come, once each.

        Tensors are checked by name and shape as they arrive; a mis-named or mis-shaped one raises
        before anything is copied from it, and a missing one raises at the end.
        """
        if self._asleep:
            raise RuntimeError("update_weights on a sleeping engine: wake_up(['weights']) first")
        received: dict[str, torch.Size] = {}
        with torch.no_grad():
            for name, tensor in weights:
                hub = hf_hub_name(name)
                if hub in received:
                    raise WeightUpdateError(f"weight update sent {hub!r} twice")
                received[hub] = tensor.shape
                expected = self._expected.get(hub)
                if expected is None:
                    raise WeightUpdateError(f"weight update sent {hub!r}, which the engine's model does not have")
                if tuple(tensor.shape) != tuple(expected):
                    raise WeightUpdateError(
                        f"weight update sent {hub!r} with shape {tuple(tensor.shape)}, expected {tuple(expected)}"
                    )
                param = self._params[hf_in_memory_name(hub)]
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))
        check_weight_names(received, self._expected)
        self.weights_version += 1
        self.reset_caches()

    def reset_caches(self) -> None:
        """No cache outlives a ``generate`` call here (the KV cache is per call)."""

    # -- memory --------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory between rollouts: the model moves to the CPU (on a CPU: nothing)."""
        if self.device.type != "cpu":
            self.model.to("cpu")
        self._asleep = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        if self.device.type != "cpu":
            self.model.to(self.device)
        self._asleep = False

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[PreprocessedExample], sampling: SamplingParams, *, seed: int) -> RolloutBatch:
        """``sampling.n`` responses per prompt, in one batched ``generate`` (prompts left-padded);
        ``seed`` seeds the whole call."""
        from transformers import GenerationConfig

        if self._asleep:
            raise RuntimeError("generate on a sleeping engine: wake_up() first")
        if not prompts:
            return RolloutBatch(
                prompts=[],
                group_ids=torch.zeros(0, dtype=torch.long),
                response_ids=[],
                sampling_logprobs=[],
                finish_reasons=[],
                texts=[],
            )
        stop = list(sampling.stop_token_ids)
        pad_id = stop[0] if stop else self.tokenizer.pad_token_id
        gen_config = GenerationConfig(
            do_sample=not sampling.greedy,
            num_return_sequences=sampling.n,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stop or None,
            pad_token_id=pad_id,
            suppress_tokens=self.blocked_token_ids or None,
            output_scores=True,
            return_dict_in_generate=True,
            **(
                {}
                if sampling.greedy
                else dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0))
            ),
        )
        width = max(p.input_ids.numel() for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        mm_types = torch.zeros(len(prompts), width, dtype=torch.long)
        for b, p in enumerate(prompts):
            n = p.input_ids.numel()
            ids[b, width - n :] = p.input_ids
            mask[b, width - n :] = 1
            mm_types[b, width - n :] = p.mm_token_type_ids
        with_images = [p for p in prompts if p.pixel_values is not None]
        images = {}
        if with_images:
            images = dict(
                pixel_values=torch.cat([p.pixel_values for p in with_images]).to(self.device, self.dtype),
                image_grid_thw=torch.cat([p.image_grid_thw for p in with_images]).to(self.device),
            )
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                mm_token_type_ids=mm_types.to(self.device),
                generation_config=gen_config,
                **images,
            )
        new = out.sequences[:, width:]
        scores = torch.stack(out.scores, dim=1).float()  # (B * n, steps, V), after the logits processors
        token_lp = torch.log_softmax(scores, dim=-1).gather(-1, new[..., None])[..., 0].cpu()
        new = new.cpu()
        group_ids, responses, logprobs, finishes, texts = [], [], [], [], []
        for row in range(new.shape[0]):
            tokens = new[row]
            hits = [i for i, t in enumerate(tokens.tolist()) if t in stop]
            end = hits[0] + 1 if hits else len(tokens)
            group_ids.append(row // sampling.n)
            responses.append(tokens[:end].clone())
            logprobs.append(token_lp[row, :end].clone())
            finishes.append(FINISH_STOP if hits else FINISH_LENGTH)
            texts.append(self.tokenizer.decode(tokens[:end], skip_special_tokens=True))
        return RolloutBatch(
            prompts=list(prompts),
            group_ids=torch.tensor(group_ids, dtype=torch.long),
            response_ids=responses,
            sampling_logprobs=logprobs,
            finish_reasons=finishes,
            texts=texts,
        )
