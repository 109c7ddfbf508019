"""Shared helpers for the data tests (imported by name; pytest puts this directory on sys.path)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "tests" / "assets" / "tiny_qwen2vl_tokenizer"


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from megatron_vrft.data import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)


def tiny_processor(min_pixels: int = 56 * 56, max_pixels: int = 160 * 28 * 28):
    from megatron_vrft.data import build_qwen2vl_processor

    return build_qwen2vl_processor(tiny_tokenizer(), min_pixels=min_pixels, max_pixels=max_pixels)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(width, height, seed).save(path)
    return path


def truncate_file(path: Path, keep_fraction: float = 0.5) -> Path:
    """Cut an encoded image file short (a classic corrupt download)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(16, int(len(data) * keep_fraction))])
    return path


def tiny_qwen2vl_model(tokenizer, seed: int = 0):
    """A tiny transformers Qwen2VLForConditionalGeneration built from a config (random weights)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tid = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval()
