"""Aggregation, KL estimators and entropy vs. float64 loop references (python math, not torch)."""

import math

import numpy as np
import pytest
import torch

from megatron_vrft.rl import (
    aggregate_loss,
    compute_entropy_from_logits,
    compute_entropy_from_logprobs,
    compute_entropy_loss,
    compute_kl,
    get_kl_estimator,
    get_loss_aggregator,
)
from megatron_vrft.rl.aggregation import LOSS_AGGREGATORS
from megatron_vrft.rl.kl import KL_ESTIMATORS

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _ref_aggregate(values, mask, mode, max_len=None, normalizer=None):
    rows = []
    total, count = 0.0, 0.0
    for v_row, m_row in zip(values, mask):
        s = math.fsum(v * m for v, m in zip(v_row, m_row) if m != 0)
        n = math.fsum(m_row)
        total += s
        count += n
        if n != 0:
            if mode == "seq-mean-token-mean":
                rows.append(s / n)
            elif mode == "seq-mean-token-sum":
                rows.append(s)
            elif mode == "seq-mean-token-sum-norm":
                rows.append(s / (max_len or len(v_row)))
    if mode == "token-mean":
        den = count if normalizer is None else normalizer
        return total / den if den else 0.0
    den = len(rows) if normalizer is None else normalizer
    return math.fsum(rows) / den if den else 0.0


def _random_mask(gen, b, t, float_weights=False):
    mask = torch.rand(b, t, generator=gen) > 0.4
    mask[0] = False  # a fully masked row
    if float_weights:
        return mask.to(torch.float64) * torch.rand(b, t, generator=gen, dtype=torch.float64)
    return mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("float_weights", [False, True])
def test_aggregation_matches_loop_reference(mode, seed, float_weights):
    gen = torch.Generator().manual_seed(seed)
    b, t = int(torch.randint(2, 7, (1,), generator=gen)), int(torch.randint(1, 13, (1,), generator=gen))
    values = torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = _random_mask(gen, b, t, float_weights)
    for kwargs in ({}, {"max_response_length": 17}, {"normalizer": 5.0}):
        got = aggregate_loss(values, mask, mode, **kwargs)
        want = _ref_aggregate(
            values.tolist(),
            mask.to(torch.float64).tolist(),
            mode,
            kwargs.get("max_response_length"),
            kwargs.get("normalizer"),
        )
        assert got.shape == ()
        assert abs(got.item() - want) <= 1e-10 * max(abs(want), 1e-300), (kwargs, got.item(), want)


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_all_masked_and_nonfinite_padding(mode):
    values = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    loss = aggregate_loss(values, torch.zeros(3, 5, dtype=torch.bool), mode)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(values.grad == 0)
    padded = torch.tensor([[1.0, float("inf")], [float("nan"), 2.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [False, True]])
    assert torch.isfinite(aggregate_loss(padded, mask, mode))


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_gradcheck(mode):
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = _random_mask(gen, 4, 6)
    assert torch.autograd.gradcheck(lambda v: aggregate_loss(v, mask, mode), (values,))
    assert torch.autograd.gradcheck(
        lambda v: get_loss_aggregator(mode)(v, mask, max_response_length=9, normalizer=3), (values,)
    )


def _ref_kl(name, lp, ref, lr_clamp, kl_clamp):
    d = lp - ref
    if lr_clamp is not None:
        d = min(max(d, -lr_clamp), lr_clamp)
    if name == "k1":
        k = d
    elif name == "k2":
        k = 0.5 * d * d
    else:
        k = math.exp(-d) + d - 1.0 if abs(d) > 1e-3 else sum((-d) ** n / math.factorial(n) for n in range(2, 9))
    if kl_clamp is not None:
        k = min(max(k, -kl_clamp), kl_clamp)
    return k


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamps", [(None, None), (20.0, 10.0), (1.5, 0.7)])
def test_kl_matches_loop_reference(name, clamps):
    gen = torch.Generator().manual_seed(1)
    lp = torch.randn(5, 9, generator=gen, dtype=torch.float64) * 2
    ref = torch.randn(5, 9, generator=gen, dtype=torch.float64) * 2
    ref[0, 0] = lp[0, 0] + 1e-5  # tiny log-ratio: k3 must not cancel to garbage
    got = compute_kl(lp, ref, name, log_ratio_clamp=clamps[0], kl_clamp=clamps[1])
    want = torch.tensor(
        [[_ref_kl(name, a, b, *clamps) for a, b in zip(ra, rb)] for ra, rb in zip(lp.tolist(), ref.tolist())],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-300)
    if name == "k3":
        assert torch.all(got >= 0)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_gradcheck_and_analytic_gradient(name):
    gen = torch.Generator().manual_seed(2)
    lp = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    ref[0, :3] = lp[0, :3].detach() + torch.tensor([30.0, -30.0, 2.5], dtype=torch.float64)
    for clamps in ((None, None), (20.0, 10.0), (1.0, 0.5)):
        assert torch.autograd.gradcheck(
            lambda x: compute_kl(x, ref, name, log_ratio_clamp=clamps[0], kl_clamp=clamps[1]), (lp,)
        )
    # Analytic derivative d KL / d logp with clamps active on some tokens.
    kl = compute_kl(lp, ref, name, log_ratio_clamp=20.0, kl_clamp=10.0)
    (grad,) = torch.autograd.grad(kl.sum(), lp)
    d = (lp - ref).detach()
    deriv = {"k1": torch.ones_like(d), "k2": d, "k3": 1 - torch.exp(-d)}[name]
    dc = d.clamp(-20.0, 20.0)
    raw = {"k1": dc, "k2": 0.5 * dc**2, "k3": torch.exp(-dc) + dc - 1}[name]
    inside = (d.abs() <= 20.0) & (raw.abs() <= 10.0)
    torch.testing.assert_close(grad, torch.where(inside, deriv, 0.0), rtol=1e-12, atol=0)


def test_kl_extreme_log_ratios_are_finite():
    lp = torch.tensor([[-1e4, 0.0, -50.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, -1e4, 0.0]], dtype=torch.float64)
    for name in ("k1", "k2", "k3"):
        kl = compute_kl(lp, ref, name)
        (g,) = torch.autograd.grad(kl.sum(), lp)
        assert torch.isfinite(kl).all() and torch.isfinite(g).all()
        assert kl.abs().max() <= 10.0
        assert torch.all(g == 0)  # every token is beyond a clamp
    with pytest.raises(KeyError):
        get_kl_estimator("k4")
    with pytest.raises(ValueError, match="already registered"):
        KL_ESTIMATORS.register("k3")(lambda d: d)


def test_entropy_matches_numpy_reference_and_handles_neg_inf():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 11, generator=gen, dtype=torch.float64) * 3
    logits[0, 0, :5] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    want = np.zeros((3, 4))
    for idx in np.ndindex(3, 4):
        row = logits[idx].numpy()
        finite = row[np.isfinite(row)]
        p = np.exp(finite - finite.max())
        p /= p.sum()
        want[idx] = -sum(pi * math.log(pi) for pi in p)
    torch.testing.assert_close(compute_entropy_from_logprobs(logp), torch.from_numpy(want), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(compute_entropy_from_logits(logits), torch.from_numpy(want), rtol=1e-10, atol=1e-14)
    x = logp.clone().requires_grad_(True)
    compute_entropy_from_logprobs(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[0, 0, :5] == 0)
    lg = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(compute_entropy_from_logits, (lg,))
    uniform = torch.full((7,), -math.log(7.0))
    assert abs(compute_entropy_from_logprobs(uniform).item() - math.log(7.0)) < 1e-6


def test_entropy_loss_is_aggregation_passthrough():
    gen = torch.Generator().manual_seed(6)
    ent = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    mask = _random_mask(gen, 3, 5)
    for mode in MODES:
        want = _ref_aggregate(ent.tolist(), mask.to(torch.float64).tolist(), mode)
        assert abs(compute_entropy_loss(ent, mask, mode).item() - want) <= 1e-12


def test_aggregation_registry_errors():
    with pytest.raises(KeyError, match="token-mean"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "seq-sum")
    with pytest.raises(ValueError, match="already registered"):
        LOSS_AGGREGATORS.register("token-mean")(lambda v, m, **k: v)
    with pytest.raises(ValueError, match="differ"):
        aggregate_loss(torch.zeros(2, 3), torch.ones(2, 2))
