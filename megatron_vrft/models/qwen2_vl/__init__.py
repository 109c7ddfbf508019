"""Qwen2-VL / Qwen2.5-VL: HF vision tower + megatron-core GPTModel with M-RoPE."""
