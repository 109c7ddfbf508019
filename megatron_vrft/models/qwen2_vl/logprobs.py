"""Per-token log-probs (and entropy) from the policy's vocab-parallel logits, never gathering the vocab."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vrft.ops.logprob import token_logprobs


def compute_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log p(targets)`` ``(B, S)`` fp32 from this TP rank's logits shard ``(B, S, V / TP)``.

    The shard of rank ``r`` covers vocabulary ids ``[r * V/TP, (r + 1) * V/TP)`` (megatron's
    contiguous vocab-parallel split). ``targets`` are global token ids ``(B, S)``. With
    ``return_entropy`` also returns the entropy ``(B, S)`` of ``softmax(logits / temperature)``.
    """
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    # Rows flattened to (N, V / TP): the kernels and the TP combine work on 2-D inputs.
    out = token_logprobs(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        temperature=temperature,
        tp_group=tp_group if tp_size > 1 else None,
        vocab_start_index=tp_rank * logits.shape[-1],
        return_entropy=return_entropy,
        impl=impl,
    )
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)
