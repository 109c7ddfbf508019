"""Batch preprocessed examples for the model: pad the text, concatenate the patches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .processing import PreprocessedExample
from .records import GroundTruth


@dataclass(kw_only=True)
class VisionLanguageBatch:
    """A padded batch of ``B`` prompts with their images."""

    input_ids: torch.Tensor
    """``(B, T)`` int64, padded with ``pad_token_id`` on ``padding_side``."""
    attention_mask: torch.Tensor
    """``(B, T)`` int64, 0 on padding."""
    mm_token_type_ids: torch.Tensor
    """``(B, T)`` int64, 0 text / padding, 1 image."""
    pixel_values: torch.Tensor
    """``(sum_i P_i, D)`` float32: every example's patches, in batch order."""
    image_grid_thw: torch.Tensor
    """``(sum_b I_b, 3)`` int64: every image's grid, in batch order."""
    prompt_lengths: torch.Tensor
    """``(B,)`` int64 unpadded token counts."""
    num_images: torch.Tensor
    """``(B,)`` int64 images per example (to split ``image_grid_thw`` back)."""
    source_ids: list[str]
    """``(B,)`` record ids."""
    tasks: list[str]
    """``(B,)`` task names."""
    ground_truths: list[GroundTruth]
    """``(B,)`` model-space ground truth."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``Qwen2VLForConditionalGeneration.forward`` / ``generate``."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }


def collate_examples(
    examples: Sequence[PreprocessedExample],
    *,
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "left",
) -> VisionLanguageBatch:
    """Pad ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` to the longest prompt
    (left padding by default: prompts are generation prefixes), concatenate ``pixel_values`` and
    ``image_grid_thw`` in batch order."""
    if not examples:
        raise ValueError("collate_examples: empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [int(e.input_ids.numel()) for e in examples]
    t = max(lengths)
    b = len(examples)
    input_ids = torch.full((b, t), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    mm_types = torch.zeros((b, t), dtype=torch.long)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        sl = slice(t - n, t) if padding_side == "left" else slice(0, n)
        input_ids[i, sl] = e.input_ids
        attention_mask[i, sl] = e.attention_mask
        mm_types[i, sl] = e.mm_token_type_ids
    return VisionLanguageBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_types,
        pixel_values=torch.cat([e.pixel_values for e in examples], dim=0),
        image_grid_thw=torch.cat([e.image_grid_thw for e in examples], dim=0),
        prompt_lengths=torch.tensor(lengths, dtype=torch.long),
        num_images=torch.tensor([int(e.image_grid_thw.shape[0]) for e in examples], dtype=torch.long),
        source_ids=[e.source_id for e in examples],
        tasks=[e.task for e in examples],
        ground_truths=[e.ground_truth for e in examples],
    )
