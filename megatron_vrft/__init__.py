"""megatron_vrft: Visual Reinforcement Fine-Tuning (GRPO) for Qwen2-VL on megatron-core."""

__version__ = "0.1.0"
