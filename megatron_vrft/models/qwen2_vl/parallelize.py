"""Keep the replicated vision tower identical across tensor-parallel ranks.

Why averaging is right: every TP rank runs the same vision forward on the same pixels. The image
features enter the language model through the replicated residual stream; megatron's column-parallel
layers all-reduce their input gradient (``copy_to_tensor_model_parallel_region``), so the gradient
reaching the image embeddings is already the *full* gradient on every TP rank. Each replica's
vision gradient therefore equals the single-model gradient; averaging over TP removes round-off
drift between replicas without changing it (a sum would scale it by TP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def allreduce_vision_grads(vision: nn.Module | None, tp_group: dist.ProcessGroup, *, grad_attr: str = "grad") -> None:
    """Average the vision tower's gradients over ``tp_group`` in one flat all-reduce.

    ``grad_attr``: ``"grad"``, or ``"main_grad"`` under megatron-core's DDP (its gradient buffers).
    """
    if vision is None or dist.get_world_size(tp_group) == 1:
        return
    grads = [getattr(p, grad_attr, None) for p in vision.parameters()]
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    flat /= dist.get_world_size(tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_tied_embedding_grads(
    language_model: nn.Module, embedding_group: dist.ProcessGroup | None, *, grad_attr: str = "grad"
) -> None:
    """Sum the tied embedding / output-layer gradients of the first and last pipeline stages.

    With tied embeddings and PP > 1 the last stage holds its own copy of the embedding matrix as
    ``output_layer.weight``; the true gradient of the shared matrix is the sum of both copies'
    gradients, and both copies must receive it to stay equal. ``embedding_group`` is the group of
    this rank's first- and last-stage peers (None on ranks outside it). No-op when untied or PP = 1.
    """
    if embedding_group is None or not getattr(language_model, "share_embeddings_and_output_weights", False):
        return
    if dist.get_world_size(embedding_group) == 1:
        return
    if not (language_model.pre_process or language_model.post_process):
        return
    grad = getattr(language_model.shared_embedding_or_output_weight(), grad_attr, None)
    if grad is not None:
        dist.all_reduce(grad, group=embedding_group)
