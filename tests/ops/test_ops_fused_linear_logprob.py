"""fused_linear_token_logprobs against the unfused reference and a float64 oracle, plus memory.

fp32: compared with a float64 oracle written here (logits = hidden @ weight.T in float64, then
log-softmax / entropy and autograd). bf16: the logits themselves are rounded to bf16 by the LM-head
GEMM (as in any bf16 model), which moves log-probs by ~1e-2; so bf16 is compared with
``linear_token_logprobs_reference`` (same bf16 GEMM, unfused, autograd) at bf16 tolerances.

Memory: a TorchDispatchMode records the bytes of every tensor any aten op produces during forward
and backward. The fused op's largest tensor must stay below N*V*4/16 (one logits block), while the
same probe must see a tensor of at least N*V*4 bytes in the unfused reference, which shows the
probe can fail.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_vrft.ops.fused_linear_logprob import (
    fused_linear_token_logprobs,
    linear_token_logprobs_reference,
)


def _case(num_tokens, hidden_size, num_vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(num_vocab, hidden_size, generator=gen) * 0.6).to(dtype)
    targets = torch.randint(0, num_vocab, (num_tokens,), generator=gen)
    targets[0], targets[1] = 0, num_vocab - 1
    g_lp = torch.randn(num_tokens, generator=gen)
    g_ent = torch.randn(num_tokens, generator=gen)
    return hidden, weight, targets, g_lp, g_ent


def _run(fn, hidden, weight, targets, g_lp, g_ent, **kwargs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logprobs, ent = fn(h, w, targets, return_entropy=True, **kwargs)
    ((logprobs * g_lp).sum() + (ent * g_ent).sum()).backward()
    return logprobs.detach(), ent.detach(), h.grad, w.grad


def _oracle(hidden, weight, targets, g_lp, g_ent, temperature):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    z = (h @ w.T) / temperature
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    logprobs = logp.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    ((logprobs * g_lp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return logprobs.detach(), ent.detach(), h.grad, w.grad


def _close_to_max(got, want, rel):
    """Elementwise error within ``rel`` of the tensor's largest magnitude."""
    err = (got.double() - want.double()).abs().max()
    scale = want.double().abs().max()
    assert err <= rel * scale, f"max error {float(err):.3g} > {rel} x {float(scale):.3g}"


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fp32_matches_float64_oracle(impl, temperature):
    hidden, weight, targets, g_lp, g_ent = _case(37, 24, 1500, torch.float32, seed=1)
    got = _run(
        fused_linear_token_logprobs,
        hidden,
        weight,
        targets,
        g_lp,
        g_ent,
        temperature=temperature,
        chunk_tokens=10,
        chunk_vocab=333,
        impl=impl,
    )
    want = _oracle(hidden, weight, targets, g_lp, g_ent, temperature)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-5)
    assert got[2].dtype == got[3].dtype == torch.float32
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[3].double(), want[3], rtol=1e-4, atol=1e-5)
    # The unfused reference agrees with the oracle too.
    ref = _run(linear_token_logprobs_reference, hidden, weight, targets, g_lp, g_ent, temperature=temperature)
    torch.testing.assert_close(ref[0].double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref[3].double(), want[3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_bf16_matches_unfused_reference(impl):
    hidden, weight, targets, g_lp, g_ent = _case(37, 32, 2100, torch.bfloat16, seed=2)
    got = _run(
        fused_linear_token_logprobs,
        hidden,
        weight,
        targets,
        g_lp,
        g_ent,
        temperature=0.8,
        chunk_tokens=16,
        chunk_vocab=512,
        impl=impl,
    )
    ref = _run(linear_token_logprobs_reference, hidden, weight, targets, g_lp, g_ent, temperature=0.8)
    # Same bf16 logits on both sides: the fp32 outputs agree to fp32 precision.
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=2e-5)
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    # Gradients: both round the (N, V) gradient to bf16 before the GEMMs; 2 bf16 ulps of the
    # largest entry bounds the difference.
    _close_to_max(got[2], ref[2], rel=2 * 2.0**-8)
    _close_to_max(got[3], ref[3], rel=2 * 2.0**-8)


def test_only_weight_or_only_hidden_needs_grad_and_batched_shape():
    hidden, weight, targets, g_lp, _ = _case(24, 16, 700, torch.float32, seed=3)
    want = _oracle(hidden, weight, targets, g_lp, torch.zeros(24), 1.0)
    w = weight.clone().requires_grad_()
    logprobs = fused_linear_token_logprobs(
        hidden.view(4, 6, 16), w, targets.view(4, 6), chunk_tokens=7, chunk_vocab=256
    )
    assert logprobs.shape == (4, 6)
    (logprobs * g_lp.view(4, 6)).sum().backward()
    torch.testing.assert_close(w.grad.double(), want[3], rtol=1e-4, atol=1e-5)
    h = hidden.clone().requires_grad_()
    logprobs = fused_linear_token_logprobs(h, weight, targets, chunk_tokens=5, chunk_vocab=99)
    (logprobs * g_lp).sum().backward()
    torch.testing.assert_close(h.grad.double(), want[2], rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(30, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="disagree"):
        fused_linear_token_logprobs(hidden, torch.randn(30, 9), targets)
    with pytest.raises(ValueError, match="targets shape"):
        fused_linear_token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_linear_token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="chunk sizes"):
        fused_linear_token_logprobs(hidden, weight, targets, chunk_vocab=0)


class _LargestTensorProbe(TorchDispatchMode):
    """Records the largest tensor (bytes) produced by any aten op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _largest_tensor(fn, hidden, weight, targets, **kwargs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with _LargestTensorProbe() as probe:
        logprobs, ent = fn(h, w, targets, return_entropy=True, **kwargs)
        (logprobs.sum() + ent.sum()).backward()
    assert h.grad is not None and w.grad is not None
    return probe.largest


def test_peak_tensor_is_one_chunk_not_the_logits():
    num_tokens, hidden_size, num_vocab = 1024, 16, 4096
    hidden, weight, targets, _, _ = _case(num_tokens, hidden_size, num_vocab, torch.float32, seed=4)
    logits_bytes = num_tokens * num_vocab * 4
    unfused = _largest_tensor(linear_token_logprobs_reference, hidden, weight, targets)
    assert unfused >= logits_bytes, "the probe must see the reference's (N, V) logits"
    fused = _largest_tensor(
        fused_linear_token_logprobs, hidden, weight, targets, chunk_tokens=128, chunk_vocab=1024, impl="torch"
    )
    assert fused <= 128 * 1024 * 4, f"fused op built a {fused}-byte tensor"
    assert fused * 16 <= logits_bytes
