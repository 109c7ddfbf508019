"""Process groups and megatron-core CPU compatibility (the only package touching global state)."""
