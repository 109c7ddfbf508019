"""Model FLOPs of the trainer's passes and MFU (model FLOPs utilisation) on GPUs.

Counts the language model's matrix multiplications, dense (as profilers and torch's FlopCounterMode
count them: the causal half of attention is not subtracted): per layer QKV, output projection,
gate/up/down MLP and the two attention products; the LM head once. Norms, rotary embeddings and
the vision tower are left out (vision is under ~5 % of a Visual-RFT step's tokens); the figure is
the usual "model FLOPs", not the hardware's.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_vrft.models.qwen2_vl.arch import Qwen2VLArch

# Dense peak FLOP/s per device by (name fragment, compute dtype): datasheet figures without sparsity.
PEAK_FLOPS = {
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "fp32"): 67e12,
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "fp32"): 67e12,
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "fp32"): 19.5e12,
}  # fmt: skip


def lm_forward_flops(arch: Qwen2VLArch, seq_lens: Sequence[int]) -> int:
    """Matmul FLOPs of one forward pass of the language model over sequences of these lengths."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    per_token = 2 * (h * (q + 2 * kv) + q * h + 3 * h * arch.intermediate_size) * arch.num_layers
    per_token += 2 * h * arch.vocab_size  # LM head
    tokens = sum(seq_lens)
    attention = sum(2 * 2 * s * s * q for s in seq_lens) * arch.num_layers  # Q K^T and (softmax) V
    return per_token * tokens + attention


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The device's dense peak for ``dtype`` ("bf16" | "fp16" | "fp32"), or None when unknown."""
    for (fragment, dt), peak in PEAK_FLOPS.items():
        if fragment in device_name and dt == dtype:
            return peak
    return None
