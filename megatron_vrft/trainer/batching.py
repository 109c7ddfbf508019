"""Training micro-batches from (prompt, response) rows, cut by a token budget.

A row is a prompt (token ids with image pads expanded, its pixels) followed by a response. Rows are
right-padded into ``(B, S)`` micro-batches with ``B * S <= micro_batch_tokens`` (at least one row),
in row order, so a row lands in the same micro-batch on every rank of a model-parallel group.
Position ``t`` predicts token ``t + 1``: the response mask is 1 at the positions that predict a
response token (``P - 1 .. P + R - 2`` for a prompt of ``P`` and a response of ``R`` tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_vrft.data.processing import PreprocessedExample
from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch
from megatron_vrft.models.qwen2_vl.inputs import build_padded_inputs


@dataclass(kw_only=True)
class MicroBatch:
    """One training micro-batch; per-row tensors are aligned with ``rows``."""

    rows: list[int]
    """Indices of its rows in the batch it was cut from."""
    input_ids: torch.Tensor
    """``(B, S)`` prompt + response, right-padded."""
    position_ids: torch.Tensor
    """``(3, B, S)`` M-RoPE positions."""
    attention_mask: torch.Tensor
    """``(B, 1, S, S)`` bool, True = masked (causal + padding)."""
    pixel_values: torch.Tensor | None
    """Patches of the rows' images, in row order."""
    image_grid_thw: torch.Tensor | None
    """``(num_images, 3)``."""
    targets: torch.Tensor
    """``(B, S)`` next-token ids (``input_ids`` shifted left)."""
    response_mask: torch.Tensor
    """``(B, S)`` float: 1 where the target is a response token."""
    advantages: torch.Tensor
    """``(B,)`` per-row advantages (zeros for SFT)."""
    sampling_logprobs: torch.Tensor
    """``(B, S)`` the engine's log-probs at response positions, 0 elsewhere (zeros for SFT)."""
    ref_logprobs: torch.Tensor | None = None
    """``(B, S)`` reference-model log-probs (last pipeline stage, when KL is on)."""
    old_logprobs: torch.Tensor | None = None
    """``(B, S)`` log-probs before the first PPO epoch (when ``ppo_epochs > 1``); None = on-policy."""

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())


def build_micro_batches(
    arch: Qwen2VLArch,
    prompts: Sequence[PreprocessedExample],
    responses: Sequence[torch.Tensor],
    *,
    micro_batch_tokens: int,
    pad_token_id: int,
    advantages: torch.Tensor | None = None,
    sampling_logprobs: Sequence[torch.Tensor] | None = None,
) -> list[MicroBatch]:
    """Cut rows ``(prompts[i], responses[i])`` into micro-batches within ``micro_batch_tokens``."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [p.input_ids.numel() + r.numel() for p, r in zip(prompts, responses)]
    groups: list[list[int]] = []
    for i, length in enumerate(lengths):
        if groups:
            current = groups[-1]
            width = max(length, *(lengths[j] for j in current))
            if width * (len(current) + 1) <= micro_batch_tokens:
                current.append(i)
                continue
        groups.append([i])
    out = []
    for rows in groups:
        width = max(lengths[i] for i in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        pad_mask = torch.zeros(len(rows), width, dtype=torch.long)
        response_mask = torch.zeros(len(rows), width)
        sampled = torch.zeros(len(rows), width)
        for b, i in enumerate(rows):
            p, r = prompts[i].input_ids, responses[i]
            n = p.numel() + r.numel()
            ids[b, :n] = torch.cat([p, r])
            pad_mask[b, :n] = 1
            response_mask[b, p.numel() - 1 : n - 1] = 1
            if sampling_logprobs is not None:
                sampled[b, p.numel() - 1 : n - 1] = sampling_logprobs[i]
        with_images = [prompts[i] for i in rows if prompts[i].pixel_values is not None]
        pixels = torch.cat([p.pixel_values for p in with_images]) if with_images else None
        grid = torch.cat([p.image_grid_thw for p in with_images]) if with_images else None
        inputs = build_padded_inputs(arch, ids, pad_mask, pixel_values=pixels, image_grid_thw=grid)
        out.append(
            MicroBatch(
                rows=rows,
                input_ids=ids,
                position_ids=inputs.position_ids,
                attention_mask=inputs.attention_mask,
                pixel_values=pixels,
                image_grid_thw=grid,
                targets=torch.roll(ids, -1, dims=1),
                response_mask=response_mask,
                advantages=advantages[rows].float() if advantages is not None else torch.zeros(len(rows)),
                sampling_logprobs=sampled,
            )
        )
    return out
