"""Model definitions (megatron-core language models + HF vision towers)."""
