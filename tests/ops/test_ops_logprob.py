"""token_logprobs (Triton under TRITON_INTERPRET=1 here) against an independent float64 oracle.

The oracle is written here from the definition, in float64, on the exact values the kernel reads
(bf16/fp16 logits upcast exactly): log p = z - log sum exp z with z = x / T, entropy
-sum p log p, gradients by float64 autograd. Tolerances: fp32 outputs ~1e-5 relative; gradients
in bf16/fp16 within 2 ulps of the float64 value (the interpreter truncates fp32 -> bf16, a GPU
rounds), plus an absolute floor of 1e-5 x the row's largest gradient for elements whose value
cancels to ~0 in the entropy term.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_vrft.ops import _logprob_stats
from megatron_vrft.ops.logprob import (
    compile_specs,
    select_backend,
    token_logprobs,
    token_logprobs_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _oracle(x: torch.Tensor, targets: torch.Tensor, temperature: float, vocab_start: int = 0):
    """float64 log-probs and entropy of targets (..., ) under softmax(x / T); off-shard -> -lse."""
    z = x.double() / temperature
    hi = z.max(dim=-1, keepdim=True).values
    lse = (hi + torch.log(torch.exp(z - hi).sum(-1, keepdim=True))).squeeze(-1)
    local = targets - vocab_start
    owned = (local >= 0) & (local < z.shape[-1])
    tgt = torch.gather(z, -1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(owned, tgt, torch.zeros_like(tgt)) - lse
    logp = z - lse.unsqueeze(-1)
    entropy = -(torch.exp(logp) * logp).sum(-1)
    return logprobs, entropy


def _assert_grad_close(got: torch.Tensor, want: torch.Tensor, ulps: float = 2.0) -> None:
    """``got`` (in its dtype) within ``ulps`` ulps of the float64 ``want``, plus a small floor."""
    want = want.double()
    bits = MANTISSA_BITS[got.dtype]
    exponent = torch.floor(torch.log2(want.abs().clamp_min(torch.finfo(got.dtype).tiny)))
    ulp = torch.pow(2.0, exponent - bits)
    floor = 1e-5 * want.abs().amax(dim=-1, keepdim=True)
    if got.dtype == torch.float32:
        tol = 1e-5 * want.abs() + floor  # "fp32 <= 1e-5 rel"
    else:
        tol = ulps * ulp + floor
    err = (got.double() - want).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} gradient elements off; worst err {float(err.max()):.3g} at "
        f"{torch.nonzero(bad)[0].tolist()} (got {float(got.double()[bad][0]):.6g}, "
        f"want {float(want[bad][0]):.6g})"
    )


def _random_case(shape, num_vocab, dtype, seed, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, num_vocab, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, num_vocab, shape, generator=gen)
    flat = targets.view(-1)
    flat[0], flat[1] = 0, num_vocab - 1  # first and last vocabulary ids
    g_lp = torch.randn(shape, generator=gen)
    g_ent = torch.randn(shape, generator=gen)
    return x, targets, g_lp, g_ent


def _run(x, targets, g_lp, g_ent, temperature, entropy, **kwargs):
    leaf = x.clone().requires_grad_()
    out = token_logprobs(leaf * 1, targets, temperature=temperature, return_entropy=entropy, **kwargs)
    logprobs, ent = out if entropy else (out, None)
    loss = (logprobs * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    loss.backward()
    return logprobs.detach(), None if ent is None else ent.detach(), leaf.grad


def _oracle_grad(x, targets, g_lp, g_ent, temperature, entropy, vocab_start=0):
    x64 = x.double().requires_grad_()
    logprobs, ent = _oracle(x64, targets, temperature, vocab_start)
    loss = (logprobs * g_lp.double()).sum() + ((ent * g_ent.double()).sum() if entropy else 0.0)
    loss.backward()
    return logprobs.detach(), ent.detach(), x64.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.9])
@pytest.mark.parametrize("entropy", [False, True], ids=["lp", "lp+entropy"])
def test_token_logprobs_match_float64_oracle(dtype, temperature, entropy):
    num_vocab = {torch.float32: 1000, torch.bfloat16: 2011, torch.float16: 3000}[dtype]
    x, targets, g_lp, g_ent = _random_case((37,), num_vocab, dtype, seed=num_vocab)
    assert select_backend("auto", x) is not None, "the fused kernel must be what is tested here"
    logprobs, ent, grad = _run(x, targets, g_lp, g_ent, temperature, entropy)
    want_lp, want_ent, want_grad = _oracle_grad(x, targets, g_lp, g_ent, temperature, entropy)
    assert logprobs.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(logprobs.double(), want_lp, rtol=1e-5, atol=1e-5)
    if entropy:
        torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    _assert_grad_close(grad, want_grad)
    # The torch reference (the CPU path) agrees with the same oracle.
    ref_lp, ref_ent, ref_grad = _run(x, targets, g_lp, g_ent, temperature, entropy, impl="torch")
    torch.testing.assert_close(ref_lp.double(), want_lp, rtol=1e-5, atol=1e-5)
    if entropy:
        torch.testing.assert_close(ref_ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    _assert_grad_close(ref_grad, want_grad)


def test_batched_shape_and_only_entropy_gradient():
    x, targets, _, g_ent = _random_case((3, 13), 1531, torch.float32, seed=5)
    leaf = x.clone().requires_grad_()
    logprobs, ent = token_logprobs(leaf, targets, temperature=1.3, return_entropy=True)
    assert logprobs.shape == ent.shape == (3, 13)
    (ent * g_ent).sum().backward()  # no gradient flows into the log-prob output
    _, want_ent, want_grad = _oracle_grad(x, targets, torch.zeros(3, 13), g_ent, 1.3, True)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    _assert_grad_close(leaf.grad, want_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_gives_same_grad_in_the_logits_buffer(dtype):
    x, targets, g_lp, g_ent = _random_case((37,), 1777, dtype, seed=11)
    _, _, grad_copy = _run(x, targets, g_lp, g_ent, 0.8, True)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf buffer nothing else needs: the case the flag is for
    logprobs, ent = token_logprobs(logits, targets, temperature=0.8, return_entropy=True, inplace_backward=True)
    grads = {}
    logits.register_hook(lambda g: grads.setdefault("logits", g))
    ((logprobs * g_lp).sum() + (ent * g_ent).sum()).backward()
    assert grads["logits"].data_ptr() == logits.data_ptr(), "gradient was not written in place"
    torch.testing.assert_close(leaf.grad, grad_copy, rtol=0, atol=0)
    torch.testing.assert_close(logits.detach(), grad_copy, rtol=0, atol=0)


def test_vocab_shard_offset_and_out_of_vocabulary_targets():
    num_vocab, start = 1200, 3000
    x, _, g_lp, _ = _random_case((37,), num_vocab, torch.float32, seed=2)
    gen = torch.Generator().manual_seed(3)
    targets = torch.randint(start, start + num_vocab, (37,), generator=gen)
    targets[:6] = torch.tensor([start, start + num_vocab - 1, start - 1, start + num_vocab, -100, 0])
    logprobs, _, grad = _run(x, targets, g_lp, None, 1.0, False, vocab_start_index=start)
    want_lp, _, want_grad = _oracle_grad(x, targets, g_lp, None, 1.0, False, vocab_start=start)
    torch.testing.assert_close(logprobs.double(), want_lp, rtol=1e-5, atol=1e-5)
    _assert_grad_close(grad, want_grad)
    # Rows whose target is not in this shard get no one-hot term: their gradient is -g * softmax.
    lse = torch.logsumexp(x.double(), -1)
    torch.testing.assert_close(logprobs[2:5].double(), -lse[2:5], rtol=1e-6, atol=1e-5)
    assert (grad[2:6] * g_lp[2:6, None].sign() <= 0).all()


def test_extreme_and_masked_logits_stay_finite():
    x, targets, g_lp, g_ent = _random_case((37,), 1000, torch.float32, seed=9, scale=150.0)
    x[:, 100:400] = float("-inf")  # masked vocabulary entries
    x[3, :999] = float("-inf")  # a row with a single live entry
    targets[3] = 999
    targets[targets.sub(250).abs() < 150] = 7  # never target a masked entry
    logprobs, ent, grad = _run(x, targets, g_lp, g_ent, 0.9, True)
    assert torch.isfinite(logprobs).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    want_lp, want_ent, want_grad = _oracle_grad(x.masked_fill(torch.isinf(x), -1e30), targets, g_lp, g_ent, 0.9, True)
    torch.testing.assert_close(logprobs.double(), want_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-4)
    assert abs(float(logprobs[3])) < 1e-6 and abs(float(ent[3])) < 1e-6
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_vocabulary_block_stats_combine_to_whole_row(backend_name):
    """Stats of vocabulary blocks merge (log-sum-exp rule) into the stats of the whole row: the
    rule the fused linear op and the TP all-gather rely on."""
    x, targets, _, _ = _random_case((37,), 2500, torch.bfloat16, seed=4)
    backend = _logprob_stats.torch_backend() if backend_name == "torch" else select_backend("triton", x)
    stats_fn = backend[0]
    whole = stats_fn(x, targets, 0, 1 / 0.7, True)
    cuts = [0, 1, 700, 701, 1999, 2500]
    blocks = torch.stack([stats_fn(x[:, a:b].contiguous(), targets, a, 1 / 0.7, True) for a, b in zip(cuts, cuts[1:])])
    pairwise = blocks[0]
    for block in blocks[1:]:
        pairwise = _logprob_stats.combine_stats(pairwise, block)
    want_lp, want_ent = _oracle(x, targets, 0.7)
    for merged in (_logprob_stats.combine_stacked_stats(blocks), pairwise):
        torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((merged[:, 1] - merged[:, 0]).double(), want_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged[:, 2].double(), want_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked_head", [False, True], ids=["random", "first-blocks-masked"])
def test_triton_multi_block_path_matches_oracle(masked_head):
    """Small vocabulary blocks force the online rescaling across blocks (a new max in a later
    block, and with a masked head, blocks that are entirely -inf before any finite value)."""
    from megatron_vrft.ops import _logprob_triton

    x, targets, g_lp, g_ent = _random_case((37,), 1000, torch.bfloat16, seed=13)
    x[:, 900:] += 6  # the row max arrives in the last blocks
    if masked_head:
        x[:, :300] = float("-inf")
        targets = targets.clamp(min=300)  # a masked target has log-prob -inf; not the point here
    z_lse = torch.logsumexp(x.float() / 0.7, -1)
    stats = _logprob_triton.logprob_stats_triton(x, targets, 0, 1 / 0.7, True, block_v=128)
    want_lp, want_ent = _oracle(x.masked_fill(torch.isinf(x), -1e30), targets, 0.7)
    torch.testing.assert_close(stats[:, 0], z_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close((stats[:, 1] - stats[:, 0]).double(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[:, 2].double(), want_ent, rtol=1e-5, atol=1e-5)
    lse, ent = stats[:, 0].contiguous(), stats[:, 2].contiguous()
    grad = _logprob_triton.logprob_backward_triton(
        x, targets, lse, ent, g_lp, g_ent, 0, 1 / 0.7, torch.empty_like(x), block_v=128
    )
    _, _, want_grad = _oracle_grad(x.masked_fill(torch.isinf(x), -1e30), targets, g_lp, g_ent, 0.7, True)
    _assert_grad_close(grad, want_grad)


def test_vocabulary_wider_than_one_block():
    x, targets, g_lp, g_ent = _random_case((5,), 9000, torch.float32, seed=17)
    logprobs, ent, grad = _run(x, targets, g_lp, g_ent, 1.1, True)
    want_lp, want_ent, want_grad = _oracle_grad(x, targets, g_lp, g_ent, 1.1, True)
    torch.testing.assert_close(logprobs.double(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    _assert_grad_close(grad, want_grad)


class _TensorSizeProbe(TorchDispatchMode):
    """Records the bytes of every new tensor (not a view or in-place result) aten ops produce."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(ret.alias_info is not None for ret in func._schema.returns):
            self.sizes += [t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _tensor_sizes(fn, x, targets, **kwargs):
    leaf = x.clone().requires_grad_()
    with _TensorSizeProbe() as probe:
        logprobs, ent = fn(leaf * 1, targets, return_entropy=True, **kwargs)
        (logprobs.sum() + ent.sum()).backward()
    return probe.sizes


def test_no_softmax_or_fp32_copy_of_bf16_logits():
    """The largest tensor the kernel path creates is a bf16 (N, V) one (the logits / their
    gradient); the reference's fp32 copies show the probe can see them; the in-place backward
    allocates one (N, V) buffer fewer."""
    x, targets, _, _ = _random_case((64,), 2048, torch.bfloat16, seed=6)
    bf16_bytes = x.numel() * 2
    reference = _tensor_sizes(token_logprobs_reference, x, targets)
    assert max(reference) >= 2 * bf16_bytes
    copy = _tensor_sizes(token_logprobs, x, targets)
    inplace = _tensor_sizes(token_logprobs, x, targets, inplace_backward=True)
    assert max(copy) == max(inplace) == bf16_bytes
    count = lambda sizes: sum(size >= bf16_bytes for size in sizes)  # noqa: E731
    assert count(inplace) == count(copy) - 1


def test_float64_and_torch_impl_use_the_reference():
    x, targets, g_lp, _ = _random_case((37,), 1000, torch.float64, seed=1)
    assert select_backend("auto", x) is None and select_backend("torch", x.float()) is None
    logprobs, _, grad = _run(x, targets, g_lp, None, 1.5, False)
    want_lp, _, want_grad = _oracle_grad(x, targets, g_lp, None, 1.5, False)
    torch.testing.assert_close(logprobs.double(), want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 50)
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(x, torch.zeros(4))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="unknown log-prob impl"):
        token_logprobs(x, torch.zeros(4, dtype=torch.long), impl="fast")
    with pytest.raises(RuntimeError, match="CUDA"):
        token_logprobs(x, torch.zeros(4, dtype=torch.long), impl="cuda")
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        token_logprobs(x.double(), torch.zeros(4, dtype=torch.long), impl="triton")


def test_compile_specs_cover_both_kernels_for_every_dtype():
    specs = compile_specs()
    names = {fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__ for fn, _, _ in specs}
    assert names == {"_logprob_stats_kernel", "_logprob_backward_kernel"}
    dtypes = {sig["logits_ptr"] for _, sig, _ in specs}
    assert dtypes == {"*fp32", "*bf16", "*fp16"}
    for _, sig, constexprs in specs:
        assert set(constexprs) <= set(sig) and all(sig[k] == "constexpr" for k in constexprs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_kernels_match_oracle(impl, dtype):
    from megatron_vrft.ops import cuda_ext

    if impl == "cuda" and not cuda_ext.is_built():
        pytest.skip("the optional CUDA extension is not built on this host")
    x, targets, g_lp, g_ent = _random_case((517,), 32003, dtype, seed=21)
    out = _run(x.cuda(), targets.cuda(), g_lp.cuda(), g_ent.cuda(), 0.9, True, impl=impl)
    want_lp, want_ent, want_grad = _oracle_grad(x, targets, g_lp, g_ent, 0.9, True)
    torch.testing.assert_close(out[0].cpu().double(), want_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[1].cpu().double(), want_ent, rtol=1e-5, atol=1e-4)
    _assert_grad_close(out[2].cpu(), want_grad, ulps=1.0)
