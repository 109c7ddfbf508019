"""Built-in random model presets (no download): Hugging Face configs for tiny Qwen2-VL / Qwen2.5-VL.

``ModelConfig.hf_path = None`` builds one of these, sized by ``ModelConfig.tiny_preset``. The
special-token ids come from the tokenizer the run uses, so prompts built by the processor place
their image tokens where the model expects them.
"""

from __future__ import annotations

from typing import Any

from megatron_vrft.models.qwen2_vl.arch import hf_classes

PRESET_SIZES: dict[str, dict[str, int]] = {
    # hidden, intermediate, layers, heads, kv heads, vision depth, vision width. head_dim is 32 in
    # both: vLLM's CPU attention supports head sizes 32, 64, 80, ... (not 8 or 16), and 2 query
    # groups split over TP = 2.
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=2, vdepth=2, vwidth=32),
    "small": dict(hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, vdepth=2, vwidth=64),
}

VOCAB_MULTIPLE = 64
"""The preset's embedding rows are ``len(tokenizer)`` rounded up to this multiple, as Qwen's own
configs pad 151,646 tokens to 151,936: every supported TP size (1, 2, 4, 8) divides it. The extra
rows are real (never produced by the tokenizer) vocabulary entries; rollout engines block them."""


def padded_vocab_size(num_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``num_tokens`` rounded up to a multiple of ``multiple``."""
    return -(-num_tokens // multiple) * multiple


def build_preset_hf_config(family: str, preset: str, tokenizer: Any) -> Any:
    """A transformers ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` of the named size for ``tokenizer``."""
    if preset not in PRESET_SIZES:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESET_SIZES)}")
    size = PRESET_SIZES[preset]
    head_dim = size["hidden"] // size["heads"]
    # mrope_section splits head_dim / 2 rotary frequencies over (t, h, w)
    half = head_dim // 2
    mrope = [half - 2 * (half // 4 + half // 8), half // 4 + half // 8, half // 4 + half // 8]
    text = dict(
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": mrope},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    tid = tokenizer.convert_tokens_to_ids
    tokens = dict(
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    if family == "qwen2_vl":
        vision = dict(
            depth=size["vdepth"],
            embed_dim=size["vwidth"],
            hidden_size=size["hidden"],
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return hf_classes(family).config(text_config=text, vision_config=vision, **tokens)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=size["vdepth"],
            hidden_size=size["vwidth"],
            intermediate_size=2 * size["vwidth"],
            out_hidden_size=size["hidden"],
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[size["vdepth"] - 1],
        )
        return hf_classes(family).config(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"unknown model family {family!r}; expected 'qwen2_vl' or 'qwen2_5_vl'")


def build_preset_hf_model(family: str, preset: str, tokenizer: Any, *, seed: int = 0):
    """A randomly initialised transformers model for the preset (eval mode, float32)."""
    import torch

    config = build_preset_hf_config(family, preset, tokenizer)
    cls = hf_classes(family).for_generation
    torch.manual_seed(seed)
    return cls(config).eval()
