"""Crash-safe file output shared by every layer (standard library only)."""

from megatron_vrft.storage.atomic import atomic_dir, atomic_write_bytes

__all__ = ["atomic_dir", "atomic_write_bytes"]
