"""Vocab-parallel log-probs at TP=2 over gloo: every check for both kernels in ONE launch.

Each rank holds a contiguous half of the vocabulary (1013 ids each, an odd size) and the same
random data; targets include both shard boundaries. On each rank the TP result must equal the
single-rank, full-vocabulary result computed in the same process: log-probs and entropies equal,
this rank's slice of the full logits gradient, the full grad_hidden (all-reduced over TP) and this
rank's rows of grad_weight. Checked for token_logprobs (Triton, fp32 and bf16, copy and in-place
backward), token_logprobs_reference, fused_linear_token_logprobs (fp32 and bf16) and
linear_token_logprobs_reference, and that the forward uses exactly one collective of 3N floats and
the logits backward none.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SHARD = 1013
NUM_TOKENS = 37
HIDDEN = 24
TEMPERATURE = 0.8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CollectiveCounter:
    """Counts collective calls and the floats each sends, while active."""

    NAMES = tuple(
        name
        for name in ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "reduce_scatter_tensor")
        if hasattr(dist, name)
    )

    def __enter__(self):
        self.calls = []
        self._saved = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            tensor = args[1] if name in ("all_gather_single", "all_gather_into_tensor") else args[0]
            numel = tensor.numel() if isinstance(tensor, torch.Tensor) else -1
            self.calls.append((name, numel))
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _close(got, want, dtype, what):
    scale = want.abs().amax().item()
    if dtype == torch.float32 or got.dtype == torch.float32:
        # Floor of 1e-5 x the largest entry: lse differs by an fp32 ulp between the two orders of
        # summation, which entries near a cancellation (log p + H ~ 0) feel in absolute terms.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(scale, 1e-3), msg=lambda m: f"{what}: {m}")
    else:
        # Same kernel, lse combined in a different order: at most a bf16 ulp or two apart.
        torch.testing.assert_close(
            got.float(), want.float(), rtol=2**-7, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}"
        )


def _targets(gen):
    targets = torch.randint(0, WORLD * SHARD, (NUM_TOKENS,), generator=gen)
    targets[:4] = torch.tensor([0, SHARD - 1, SHARD, WORLD * SHARD - 1])
    return targets


def _check_token_logprobs(rank, group, dtype, fn, impl_kwargs, inplace=False):
    from megatron_vrft.ops.logprob import token_logprobs  # noqa: F401  (import under the env)

    gen = torch.Generator().manual_seed(7)
    full = (torch.randn(NUM_TOKENS, WORLD * SHARD, generator=gen) * 4).to(dtype)
    targets = _targets(gen)
    g_lp, g_ent = torch.randn(NUM_TOKENS, generator=gen), torch.randn(NUM_TOKENS, generator=gen)

    def run(logits, **kwargs):
        leaf = logits.clone().requires_grad_()
        lp, ent = fn(leaf * 1, targets, temperature=TEMPERATURE, return_entropy=True, **kwargs)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp.detach(), ent.detach(), leaf.grad

    want = run(full, **impl_kwargs)
    lo, hi = rank * SHARD, (rank + 1) * SHARD
    extra = {"inplace_backward": True} if inplace else {}
    with _CollectiveCounter() as counter:
        got = run(full[:, lo:hi], tp_group=group, vocab_start_index=lo, **impl_kwargs, **extra)
    name = f"{fn.__name__} {dtype} {impl_kwargs} inplace={inplace}"
    _close(got[0], want[0], torch.float32, f"{name} logprobs")
    _close(got[1], want[1], torch.float32, f"{name} entropy")
    _close(got[2], want[2][:, lo:hi], dtype, f"{name} grad_logits")
    return counter.calls


def _check_fused_linear(rank, group, dtype, fn, impl_kwargs):
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(WORLD * SHARD, HIDDEN, generator=gen) * 0.6).to(dtype)
    targets = _targets(gen)
    g_lp, g_ent = torch.randn(NUM_TOKENS, generator=gen), torch.randn(NUM_TOKENS, generator=gen)

    def run(w_rows, **kwargs):
        h = hidden.clone().requires_grad_()
        w = w_rows.clone().requires_grad_()
        lp, ent = fn(h, w, targets, temperature=TEMPERATURE, return_entropy=True, **kwargs)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp.detach(), ent.detach(), h.grad, w.grad

    want = run(weight, **impl_kwargs)
    lo, hi = rank * SHARD, (rank + 1) * SHARD
    got = run(weight[lo:hi], tp_group=group, vocab_start_index=lo, **impl_kwargs)
    name = f"{fn.__name__} {dtype}"
    _close(got[0], want[0], torch.float32, f"{name} logprobs")
    _close(got[1], want[1], torch.float32, f"{name} entropy")
    if dtype == torch.float32:
        _close(got[2], want[2], dtype, f"{name} grad_hidden")
        _close(got[3], want[3][lo:hi], dtype, f"{name} grad_weight")
    else:  # bf16 GEMM outputs summed in a different order: compare against the largest entry
        for got_t, want_t, what in ((got[2], want[2], "grad_hidden"), (got[3], want[3][lo:hi], "grad_weight")):
            err = (got_t.float() - want_t.float()).abs().max().item()
            assert err <= 2 * 2**-8 * want_t.float().abs().max().item(), f"{name} {what}: {err}"


def _worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from megatron_vrft.ops.fused_linear_logprob import (
            fused_linear_token_logprobs,
            linear_token_logprobs_reference,
        )
        from megatron_vrft.ops.logprob import token_logprobs, token_logprobs_reference

        group = dist.group.WORLD
        for dtype in (torch.float32, torch.bfloat16):
            calls = _check_token_logprobs(rank, group, dtype, token_logprobs, {"impl": "triton"})
            assert len(calls) == 1 and calls[0][0].startswith("all_gather"), calls
            assert calls[0][1] == 3 * NUM_TOKENS, calls
        _check_token_logprobs(rank, group, torch.bfloat16, token_logprobs, {"impl": "triton"}, inplace=True)
        _check_token_logprobs(rank, group, torch.float32, token_logprobs_reference, {})
        for dtype in (torch.float32, torch.bfloat16):
            _check_fused_linear(
                rank, group, dtype, fused_linear_token_logprobs, {"chunk_tokens": 20, "chunk_vocab": 700}
            )
        _check_fused_linear(rank, group, torch.float32, linear_token_logprobs_reference, {})
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_vocab_parallel_tp2_matches_single_rank():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
