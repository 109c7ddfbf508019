"""Fused LM head + per-token log-probs: ``log p(target)`` from hidden states, never building logits.

``fused_linear_token_logprobs(hidden (..., H), weight (V_shard, H), targets (...))`` equals
``token_logprobs(hidden @ weight.T, targets)`` (same temperature, vocab parallelism, entropy and
out-of-vocabulary semantics, see ``megatron_vrft.ops.logprob``), but only ever holds one
``(chunk_tokens, chunk_vocab)`` block of logits:

- forward: for each token chunk and each vocabulary chunk, ``logits = hidden_c @ weight_c.T`` (a
  GEMM in the inputs' dtype, as an unfused LM head would produce), reduced at once to per-row stats
  (online log-sum-exp, target logit, entropy) by the log-prob kernels; stats of vocabulary
  chunks combine with the log-sum-exp rule, and TP shards with one all-gather of ``3N`` floats.
  Saved for backward: hidden, weight, targets and two fp32 values per token.
- backward: vocabulary chunks outer, token chunks inner; each logits block is recomputed, turned
  into its gradient in place by the log-prob backward kernel, then
  ``grad_hidden[c] += grad_logits @ weight_c`` and ``grad_weight[v] += grad_logits.T @ hidden_c``.
  ``grad_weight`` is accumulated per vocabulary chunk in fp32 and written once in the weight's
  dtype; ``grad_hidden`` is accumulated in an fp32 ``(N, H)`` buffer. With ``tp_group`` the hidden
  states are replicated over TP, so ``grad_hidden`` is all-reduced over the group (the backward of
  Megatron's ``copy_to_tensor_model_parallel_region``); pass ``reduce_grad_hidden=False`` when the
  caller reduces it itself (e.g. a reduce-scatter under sequence parallelism).

The backward GEMMs accumulate in fp32 (``mm(..., out_dtype=float32)`` on CUDA; chunk operands
upcast elsewhere), so splitting the vocabulary into chunks does not add bf16 roundings.

Peak extra memory: one logits block in the inputs' dtype (plus its fp32 upcast on the torch
backend and for the fp32 GEMMs off CUDA), an fp32 ``(chunk_vocab, H)`` accumulator and the fp32
``(N, H)`` grad_hidden buffer: O(chunk + N * H), independent of ``N * V``. The cost is one extra
GEMM (the forward's logits are recomputed in the backward). Defaults: 2048 x 16384 blocks, 64 MiB
in bf16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vrft.ops import _logprob_stats as S
from megatron_vrft.ops.logprob import select_backend, token_logprobs_reference

DEFAULT_CHUNK_TOKENS = 2048
DEFAULT_CHUNK_VOCAB = 16384


def _chunk_backend(impl: str, hidden: torch.Tensor) -> S.Backend:
    """The per-block stats/backward backend; plain torch where ``select_backend`` finds no kernel."""
    backend = select_backend(impl, hidden)
    return S.torch_backend() if backend is None else backend


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 accumulation even for bf16/fp16 ``a``, ``b``.

    Rounding each chunk's product to bf16 before summing chunks would lose up to an ulp per chunk;
    CUDA GEMMs can emit fp32 directly (``out_dtype``), elsewhere the chunk operands are upcast.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            acc += torch.mm(a, b, out_dtype=acc.dtype)
            return
        except (TypeError, RuntimeError):  # torch builds without mm.dtype
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, total)) for start in range(0, total, step)]


class _FusedLinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        inv_temperature,
        tp_group,
        vocab_start,
        with_entropy,
        chunk_tokens,
        chunk_vocab,
        reduce_grad_hidden,
        backend,
    ):
        stats_fn, backward_fn = backend
        num_tokens, num_vocab = hidden.shape[0], weight.shape[0]
        stats = torch.empty((num_tokens, S.NUM_STATS), dtype=torch.float32, device=hidden.device)
        for n0, n1 in _ranges(num_tokens, chunk_tokens):
            hidden_c, targets_c = hidden[n0:n1], targets[n0:n1]
            acc = None
            for v0, v1 in _ranges(num_vocab, chunk_vocab):
                logits = hidden_c @ weight[v0:v1].T
                block = stats_fn(logits, targets_c, vocab_start + v0, inv_temperature, with_entropy)
                acc = block if acc is None else S.combine_stats(acc, block)
                del logits
            stats[n0:n1] = acc
        stats = S.allgather_combine_stats(stats, tp_group)
        lse = stats[:, 0].contiguous()
        logprobs = stats[:, 1] - lse
        entropy = stats[:, 2].contiguous() if with_entropy else torch.zeros_like(lse)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.args = (
            inv_temperature,
            tp_group,
            vocab_start,
            with_entropy,
            chunk_tokens,
            chunk_vocab,
            reduce_grad_hidden,
            backward_fn,
        )
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        (
            inv_temperature,
            tp_group,
            vocab_start,
            with_entropy,
            chunk_tokens,
            chunk_vocab,
            reduce_grad_hidden,
            backward_fn,
        ) = ctx.args
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        grad_logprobs = grad_logprobs.float().contiguous()
        use_entropy = with_entropy and grad_entropy is not None
        grad_entropy = grad_entropy.float().contiguous() if use_entropy else None
        num_tokens, num_vocab = hidden.shape[0], weight.shape[0]
        grad_hidden_acc = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        for v0, v1 in _ranges(num_vocab, chunk_vocab):
            weight_c = weight[v0:v1]
            grad_weight_acc = (
                torch.zeros(weight_c.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            )
            for n0, n1 in _ranges(num_tokens, chunk_tokens):
                hidden_c = hidden[n0:n1]
                logits = hidden_c @ weight_c.T
                backward_fn(
                    logits,
                    targets[n0:n1],
                    lse[n0:n1],
                    entropy[n0:n1] if use_entropy else None,
                    grad_logprobs[n0:n1],
                    grad_entropy[n0:n1] if use_entropy else None,
                    vocab_start + v0,
                    inv_temperature,
                    logits,
                )  # in place: logits -> grad_logits
                if need_hidden:
                    _addmm_fp32(grad_hidden_acc[n0:n1], logits, weight_c)
                if need_weight:
                    _addmm_fp32(grad_weight_acc, logits.T, hidden_c)
                del logits
            if need_weight:
                grad_weight[v0:v1] = grad_weight_acc
        grad_hidden = None
        if need_hidden:
            if reduce_grad_hidden and tp_group is not None and dist.get_world_size(tp_group) > 1:
                dist.all_reduce(grad_hidden_acc, op=dist.ReduceOp.SUM, group=tp_group)
            grad_hidden = grad_hidden_acc.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
    return_entropy: bool = False,
    reduce_grad_hidden: bool = True,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``(...)`` fp32 of ``targets (...)`` under ``softmax(hidden @ weight.T / T)``.

    ``hidden (..., H)``; ``weight (V_shard, H)``, this rank's rows
    ``[vocab_start_index, vocab_start_index + V_shard)`` of the output layer. Returns ``logprobs``
    or ``(logprobs, entropy)``. ``impl`` picks the per-block kernels as in ``token_logprobs``
    (``"auto"``: Triton when usable, else plain torch on each block). See the module docstring.
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., H) and weight (V_shard, H) disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {chunk_tokens}, {chunk_vocab}")
    backend = _chunk_backend(impl, hidden)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    targets1d = targets.reshape(-1).to(device=hidden.device, dtype=torch.int64).contiguous()
    logprobs, entropy = _FusedLinearTokenLogprobs.apply(
        hidden2d,
        weight,
        targets1d,
        1.0 / float(temperature),
        tp_group,
        int(vocab_start_index),
        bool(return_entropy),
        int(chunk_tokens),
        int(chunk_vocab),
        bool(reduce_grad_hidden),
        backend,
    )
    logprobs = logprobs.reshape(targets.shape)
    if return_entropy:
        return logprobs, entropy.reshape(targets.shape)
    return logprobs


class _CopyToTpRegion(torch.autograd.Function):
    """Identity forward, all-reduce sum backward: hidden states replicated over TP."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Unfused torch reference: ``hidden @ weight.T`` (materialised) then ``token_logprobs_reference``.

    With ``tp_group`` the gradient of ``hidden`` is all-reduced over the group, like the fused op.
    """
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        hidden = _CopyToTpRegion.apply(hidden, tp_group)
    return token_logprobs_reference(
        hidden @ weight.T,
        targets,
        temperature=temperature,
        tp_group=tp_group,
        vocab_start_index=vocab_start_index,
        return_entropy=return_entropy,
    )


def compile_specs() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """No Triton kernel of its own: the blocks run the kernels of ``megatron_vrft.ops.logprob``."""
    return []
