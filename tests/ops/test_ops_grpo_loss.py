"""Fused GRPO loss (Triton, interpreted here under TRITON_INTERPRET=1) vs. the one torch
implementation, ``megatron_vrft.rl.compute_grpo_loss``, evaluated in float64 on the same (upcast)
inputs; and the dispatch of ``compute_grpo_loss(impl=...)`` to the kernel."""

import pytest
import torch

import megatron_vrft.ops.grpo_loss as G
from megatron_vrft.ops.grpo_loss import fused_grpo_loss
from megatron_vrft.rl import aggregate_loss, compute_grpo_loss, compute_kl

LOSSES = ["ppo_clip", "dual_clip", "visual_rft_unclipped"]
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLS = [None, "k1", "k2", "k3"]
IMPLS = ["triton"]
CFG = dict(clip_eps_low=0.2, clip_eps_high=0.28, clip_ratio_c=3.0)


def _inputs(seed, b=3, t=37, dtype=torch.float32, token_adv=False, float_mask=False, other_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    old = lp - (torch.rand(b, t, generator=gen, dtype=torch.float64) * 3 - 1.5)
    ref = lp - torch.randn(b, t, generator=gen, dtype=torch.float64) * 1.5
    adv = torch.randn(*((b, t) if token_adv else (b,)), generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[1] = False  # a fully masked row
    if float_mask:
        mask = mask.to(torch.float32) * torch.rand(b, t, generator=gen)
    other = other_dtype or dtype
    return lp.to(dtype), old.to(other), ref.to(other), adv.to(other), mask


def _reference(lp, old, ref, adv, mask, **kw):
    x = lp.to(torch.float64).requires_grad_(True)
    res = compute_grpo_loss(
        x,
        old.to(torch.float64),
        None if ref is None else ref.to(torch.float64),
        adv.to(torch.float64),
        mask.to(torch.float64) if mask.is_floating_point() else mask,
        **kw,
    )
    res.loss.backward()
    return res, x.grad


def _fused(lp, old, ref, adv, mask, impl, grad_scale=1.0, **kw):
    x = lp.clone().requires_grad_(True)
    assert impl == "triton"
    out = fused_grpo_loss(x, old, ref, adv, mask, **kw)
    (out.loss * grad_scale).backward()
    return out, x.grad


def _assert_close_rel(got, want, rtol, what, magnitude=None):
    """``|got - want| <= rtol * (|want| + magnitude)``; ``magnitude`` defaults to 0.1 * max|want|."""
    got, want = got.double(), want.double()
    if magnitude is None:
        magnitude = 0.1 * want.abs().max().item() if want.numel() else 0.0
    bad = (got - want).abs() > rtol * (want.abs() + magnitude) + 1e-30
    assert not bad.any(), (what, got[bad][:5], want[bad][:5])


def _assert_within_ulps(got, want, dtype, ulps, what):
    want = want.double()
    exponent = torch.floor(torch.log2(want.abs().clamp(min=torch.finfo(dtype).tiny)))
    ulp = torch.finfo(dtype).eps * torch.pow(2.0, exponent)
    bad = (got.double() - want).abs() > ulps * ulp + 1e-6 * want.abs().max()
    assert not bad.any(), (what, got[bad][:5], want[bad][:5])


def _check(out, grad, res, ref_grad, rtol, what, lp, ref, mask, kw):
    """Compare every output. Aggregated losses are sums of signed per-token terms that may cancel:
    an fp32 sum's error scales with the sum of the terms' magnitudes, so their tolerance is relative
    to ``aggregate(|terms|)``; per-token values and gradients are compared elementwise."""
    agg = dict(
        mode=kw.get("loss_agg_mode", "token-mean"),
        max_response_length=kw.get("max_response_length"),
        normalizer=kw.get("normalizer"),
    )
    m = mask.to(torch.float64) if mask.is_floating_point() else mask

    def magnitude(per_token):
        return aggregate_loss(
            per_token.detach().abs(),
            m,
            agg["mode"],
            max_response_length=agg["max_response_length"],
            normalizer=agg["normalizer"],
        ).item()

    loss_mag = magnitude(res.per_token_loss)
    _assert_close_rel(out.loss.detach().reshape(1), res.loss.detach().reshape(1), rtol, f"{what} loss", loss_mag)
    _assert_close_rel(out.per_token_loss, res.per_token_loss.detach(), rtol, f"{what} per-token")
    assert set(out.metrics) == set(res.metrics), (set(out.metrics), set(res.metrics))
    kl_mag = 0.0
    if ref is not None:
        kl_tok = compute_kl(
            lp.double(),
            ref.double(),
            kw.get("kl_estimator", "k3"),
            log_ratio_clamp=kw.get("log_ratio_clamp", 20.0),
            kl_clamp=kw.get("kl_clamp", 10.0),
        )
        kl_mag = magnitude(kl_tok)
    for key, value in res.metrics.items():
        mag = {"pg_loss": loss_mag + kl_mag, "kl_loss": kl_mag}.get(key, 0.0)
        _assert_close_rel(out.metrics[key].reshape(1), value.reshape(1), rtol, f"{what} {key}", mag)
    if grad.dtype in (torch.float32, torch.float64):
        _assert_close_rel(grad, ref_grad, rtol, f"{what} grad")


# The interpreted kernel (~0.2 s a call) runs a Latin square that pairs every policy loss with every
# mode and every KL type.
FP32_CASES = [("triton", p, m, KLS[(i + j) % len(KLS)]) for i, p in enumerate(LOSSES) for j, m in enumerate(MODES)]


@pytest.mark.parametrize("impl,policy_loss,mode,kl", FP32_CASES)
def test_fp32_matches_reference(impl, policy_loss, mode, kl):
    seed = LOSSES.index(policy_loss) * 16 + MODES.index(mode) * 4 + KLS.index(kl)
    lp, old, ref, adv, mask = _inputs(seed, token_adv=seed % 2 == 1)
    kw = dict(
        policy_loss=policy_loss,
        loss_agg_mode=mode,
        kl_estimator=kl or "k3",
        kl_coef=0.0 if kl is None else 0.07,
        kl_clamp=2.0,
        log_ratio_clamp=1.3,
        max_response_length=50,
        **CFG,
    )
    ref_in = None if kl is None else ref
    res, ref_grad = _reference(lp, old, ref_in, adv, mask, **kw)
    out, grad = _fused(lp, old, ref_in, adv, mask, impl, **kw)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.float32
    _check(out, grad, res, ref_grad, 1e-5, f"{impl}/{policy_loss}/{mode}/{kl}", lp, ref_in, mask, kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("policy_loss", LOSSES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_low_precision_log_probs(impl, dtype, policy_loss, mode):
    # Half-precision log-probs; old/ref/advantages in fp32 for one mode, in the same dtype for the other.
    other = torch.float32 if mode == "token-mean" else dtype
    lp, old, ref, adv, mask = _inputs(7, dtype=dtype, other_dtype=other, float_mask=mode != "token-mean")
    kw = dict(policy_loss=policy_loss, loss_agg_mode=mode, kl_estimator="k3", kl_coef=0.05, **CFG)
    res, ref_grad = _reference(lp, old, ref, adv, mask, **kw)
    out, grad = _fused(lp, old, ref, adv, mask, impl, **kw)
    assert grad.dtype == dtype and out.loss.dtype == torch.float32
    # Inputs are exact in fp32, so everything up to the final cast is fp32-accurate.
    _check(out, grad, res, ref_grad, 1e-5, f"{impl}/{dtype}/{policy_loss}", lp, ref, mask, kw)
    _assert_within_ulps(grad, ref_grad, dtype, 2, f"{impl}/{dtype} grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_normalizer_float_mask_and_grad_scale(impl, mode):
    lp, old, ref, adv, mask = _inputs(21, b=4, t=19, float_mask=True, token_adv=True)
    kw = dict(policy_loss="dual_clip", loss_agg_mode=mode, kl_estimator="k2", kl_coef=0.2, normalizer=11.0, **CFG)
    res, ref_grad = _reference(lp, old, ref, adv, mask, **kw)
    out, grad = _fused(lp, old, ref, adv, mask, impl, grad_scale=2.5, **kw)
    _check(out, grad / 2.5, res, ref_grad, 1e-5, f"{impl}/{mode}", lp, ref, mask, kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_rows(impl):
    lp, old, ref, adv, mask = _inputs(3, b=5, t=40)
    wide = torch.zeros(5, 64)
    wide[:, 3:43] = lp  # row stride 64: a view into a larger buffer
    kw = dict(policy_loss="ppo_clip", loss_agg_mode="seq-mean-token-sum", kl_coef=0.1, **CFG)
    res, ref_grad = _reference(lp, old, ref, adv, mask, **kw)
    out, grad = _fused(wide[:, 3:43], old[:, ::1], ref, adv, mask, impl, **kw)
    _check(out, grad, res, ref_grad, 1e-5, impl, lp, ref, mask, kw)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # r = inf, unclamped
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("policy_loss", LOSSES)
def test_extreme_log_ratios_and_all_masked(impl, policy_loss):
    lp = torch.tensor([[0.0, -1e4, -1.0, -2.0], [-2.0, -3.0, 0.0, -0.5]])
    old = torch.tensor([[-1e4, 0.0, -1.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, 1e3, -1e3, -1e-4], [0.0, 0.0, 0.0, 0.0]])
    adv = torch.tensor([-2.0, 1.0])
    mask = torch.tensor([[True, True, True, True], [False, False, False, False]])
    for clamps in ((20.0, 10.0), (None, 10.0)):
        kw = dict(policy_loss=policy_loss, kl_coef=0.5, log_ratio_clamp=clamps[0], kl_clamp=clamps[1], **CFG)
        res, ref_grad = _reference(lp, old, ref, adv, mask, **kw)
        out, grad = _fused(lp, old, ref, adv, mask, impl, **kw)
        if clamps[0] is not None:
            assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
            _check(out, grad, res, ref_grad, 1e-5, f"{impl}/{policy_loss}", lp, ref, mask, kw)
        else:  # unclamped: r = exp(1e4) = inf is the defined answer unless a clip bounds it
            assert torch.isfinite(out.loss) == torch.isfinite(res.loss) == (policy_loss != "ppo_clip")
            # (The autograd reference gets 0 * inf = NaN here through the k3 clamp; the kernel's
            # where-based gradient does not.)
            assert not grad.isnan().any()
    out, grad = _fused(
        lp, old, ref, adv, torch.zeros(2, 4, dtype=torch.bool), impl, policy_loss=policy_loss, kl_coef=0.5
    )
    assert out.loss.item() == 0.0 and torch.all(grad == 0)
    assert all(v.item() == 0.0 for v in out.metrics.values())


def test_rl_dispatches_to_the_kernel_where_it_can(monkeypatch):
    """compute_grpo_loss(impl="auto") runs the kernel for what it implements and its torch code
    otherwise; impl="fused" refuses what the kernel cannot do; impl="torch" never calls it."""
    lp, old, ref, adv, mask = _inputs(0, b=2, t=5)
    calls = []
    real = G._forward_triton

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(G, "_forward_triton", spy)
    kw = dict(kl_coef=0.1, **CFG)
    torch_out = compute_grpo_loss(lp, old, ref, adv, mask, impl="torch", **kw)
    compute_grpo_loss(lp.double(), old.double(), ref.double(), adv.double(), mask, impl="auto", **kw)  # fp64
    compute_grpo_loss(lp, old, ref, adv, mask, impl="auto", policy_loss="gspo", **CFG)  # not in the kernel
    compute_grpo_loss(lp, old, ref, adv, mask, impl="auto", token_weights=torch.ones_like(lp), **kw)
    compute_grpo_loss(lp, old, ref, adv, mask, impl="auto", kl_importance_weighted=True, **kw)
    assert not calls
    auto = compute_grpo_loss(lp, old, ref, adv, mask, impl="auto", **kw)
    assert calls == [1]
    assert torch.allclose(auto.loss, torch_out.loss, rtol=1e-5) and set(auto.metrics) == set(torch_out.metrics)
    with pytest.raises(ValueError, match="cannot run this call"):
        compute_grpo_loss(lp, old, ref, adv, mask, impl="fused", policy_loss="cispo", **CFG)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        compute_grpo_loss(lp, old, ref, adv, mask, impl="auto", **kw)  # no Triton here: torch
        assert calls == [1]
        with pytest.raises(ValueError, match="cannot run this call"):
            compute_grpo_loss(lp, old, ref, adv, mask, impl="fused", **kw)
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            fused_grpo_loss(lp, old, ref, adv, mask)
    with pytest.raises(ValueError, match="impl must be"):
        compute_grpo_loss(lp, old, ref, adv, mask, impl="cuda")


def test_bad_arguments_raise():
    lp, old, ref, adv, mask = _inputs(0, b=2, t=5)
    with pytest.raises(KeyError, match="ppo_clip"):
        fused_grpo_loss(lp, old, ref, adv, mask, policy_loss="ppo")
    with pytest.raises(KeyError, match="token-mean"):
        fused_grpo_loss(lp, old, ref, adv, mask, loss_agg_mode="sum")
    with pytest.raises(KeyError, match="k3"):
        fused_grpo_loss(lp, old, ref, adv, mask, kl_estimator="k5")
    with pytest.raises(ValueError, match="old_log_probs"):
        fused_grpo_loss(lp, None, ref, adv, mask)
    with pytest.raises(ValueError, match="ref_log_probs"):
        fused_grpo_loss(lp, old, None, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        fused_grpo_loss(lp, old, ref, adv, mask, policy_loss="dual_clip", clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="advantages"):
        fused_grpo_loss(lp, old, ref, adv[:1], mask)
    with pytest.raises(ValueError, match="Triton kernel supports"):
        fused_grpo_loss(lp.double(), old, ref, adv, mask)


def test_compile_specs_cover_every_kernel_and_branch():
    specs = G.compile_specs()
    fns = {fn for fn, _, _ in specs}
    assert fns == {G._grpo_loss_fwd_kernel, G._grpo_loss_reduce_kernel, G._grpo_loss_bwd_kernel}
    fwd = [c for fn, _, c in specs if fn is G._grpo_loss_fwd_kernel]
    assert {c["POLICY"] for c in fwd} == set(G.POLICY_LOSS_CODES.values())
    assert {c["KL"] for c in fwd} == {0, *G.KL_CODES.values()}
    reduce = [c for fn, _, c in specs if fn is G._grpo_loss_reduce_kernel]
    assert {c["MODE"] for c in reduce} == set(range(len(G.LOSS_AGG_MODES)))
    for fn, sig, constexprs in specs:
        assert list(sig) == fn.arg_names  # every argument typed, in order
        assert {k for k, v in sig.items() if v == "constexpr"} == set(constexprs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("b,t", [(11, 5), (3, 1030)])
def test_many_rows_and_multi_block_rows(impl, mode, b, t, monkeypatch):
    # B=11 > a 4-row reduction block (3 loop iterations, the last partial); T=1030 > the 1024-token
    # block (each row's partial sums come from 2 programs).
    monkeypatch.setattr(G, "_REDUCE_BLOCK_B", 4)
    lp, old, ref, adv, mask = _inputs(13, b=b, t=t)
    kw = dict(policy_loss="dual_clip", loss_agg_mode=mode, kl_estimator="k3", kl_coef=0.1, **CFG)
    res, ref_grad = _reference(lp, old, ref, adv, mask, **kw)
    out, grad = _fused(lp, old, ref, adv, mask, impl, **kw)
    _check(out, grad, res, ref_grad, 1e-5, f"{impl}/{mode}", lp, ref, mask, kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    lp = torch.zeros(0, 5, requires_grad=True)
    out = fused_grpo_loss(lp, lp.detach(), None, torch.zeros(0), torch.zeros(0, 5, dtype=torch.bool))
    out.loss.backward()
    assert out.loss.item() == 0.0 and lp.grad.shape == (0, 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_per_token_loss(impl):
    lp, old, ref, adv, mask = _inputs(17, b=2, t=9)
    kw = dict(policy_loss="ppo_clip", kl_coef=0.1, **CFG)
    full, grad_full = _fused(lp, old, ref, adv, mask, impl, **kw)
    lean, grad_lean = _fused(lp, old, ref, adv, mask, impl, return_per_token_loss=False, **kw)
    assert lean.per_token_loss is None
    assert torch.equal(lean.loss, full.loss) and torch.equal(grad_lean, grad_full)
    assert all(torch.equal(lean.metrics[k], full.metrics[k]) for k in full.metrics)
