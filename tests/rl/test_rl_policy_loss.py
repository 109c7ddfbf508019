"""Policy losses and the full GRPO loss vs. a float64 per-token loop reference with analytic
gradients (python math, not the vectorised torch code)."""

import math

import pytest
import torch

from megatron_vrft.rl import (
    compute_grpo_loss,
    compute_policy_loss,
    get_policy_loss,
)
from megatron_vrft.rl.policy_loss import POLICY_LOSSES

LOSSES = ["ppo_clip", "dual_clip", "visual_rft_unclipped"]
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
CFG = dict(clip_eps_low=0.2, clip_eps_high=0.28, clip_ratio_c=3.0, log_ratio_clamp=20.0)


def _clamp(x, c):
    return x if c is None else min(max(x, -c), c)


def _ref_token(name, lp, old, adv, eps_low, eps_high, c, lr_clamp):
    """-> (loss, d loss / d lp, ratio, low, high, dual, log_ratio)."""
    if name == "visual_rft_unclipped":
        return -adv, -adv, 1.0, False, False, False, 0.0
    raw = lp - old
    lr = _clamp(raw, lr_clamp)
    in_clamp = lr_clamp is None or abs(raw) <= lr_clamp
    r = math.exp(lr)
    unclipped = -adv * r
    clipped = -adv * min(max(r, 1 - eps_low), 1 + eps_high)
    if clipped > unclipped:
        loss, grad, low, high = clipped, 0.0, r < 1, r > 1
    else:
        loss, grad, low, high = unclipped, -adv * r * in_clamp, False, False
    dual = False
    if name == "dual_clip" and adv < 0 and -adv * c < loss:
        loss, grad, dual = -adv * c, 0.0, True
    return loss, grad, r, low, high, dual, lr


def _ref_kl(name, lp, ref, lr_clamp, kl_clamp):
    """-> (kl, d kl / d lp)."""
    raw = lp - ref
    d = _clamp(raw, lr_clamp)
    if name == "k1":
        k, g = d, 1.0
    elif name == "k2":
        k, g = 0.5 * d * d, d
    else:
        k, g = math.exp(-d) + d - 1, 1 - math.exp(-d)
    in_clamp = (lr_clamp is None or abs(raw) <= lr_clamp) and (kl_clamp is None or abs(k) <= kl_clamp)
    return _clamp(k, kl_clamp), g * in_clamp


def _ref_grpo(name, lp, old, ref, adv, mask, mode, kl_name, kl_coef, kl_clamp, max_len, cfg):
    """Loop reference of compute_grpo_loss: (loss, grad (B,T) nested list, metrics dict)."""
    b_sz, t_sz = len(lp), len(lp[0])
    per_tok, dtok, kls = [], [], []
    stats = dict(low=0.0, high=0.0, dual=0.0, akl=0.0, rsum=0.0, n=0.0)
    ratios = []
    for b in range(b_sz):
        row_l, row_g, row_k = [], [], []
        for t in range(t_sz):
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            loss, g, r, low, high, dual, lr = _ref_token(
                name,
                lp[b][t],
                old[b][t],
                a,
                cfg["clip_eps_low"],
                cfg["clip_eps_high"],
                cfg["clip_ratio_c"],
                cfg["log_ratio_clamp"],
            )
            k, kg = _ref_kl(kl_name, lp[b][t], ref[b][t], cfg["log_ratio_clamp"], kl_clamp)
            row_l.append(loss + kl_coef * k)
            row_g.append(g + kl_coef * kg)
            row_k.append(k)
            m = mask[b][t]
            if m:
                stats["low"] += m * low
                stats["high"] += m * high
                stats["dual"] += m * dual
                stats["akl"] += m * (math.exp(lr) - 1 - lr)
                stats["rsum"] += m * r
                stats["n"] += m
                ratios.append(r)
        per_tok.append(row_l)
        dtok.append(row_g)
        kls.append(row_k)
    # Aggregation weights w_bt with loss = sum_bt w_bt * per_tok_bt.
    valid_rows = [b for b in range(b_sz) if sum(mask[b]) != 0]
    n_tok = sum(sum(row) for row in mask)
    weights = [[0.0] * t_sz for _ in range(b_sz)]
    for b in valid_rows:
        for t in range(t_sz):
            m = mask[b][t]
            if mode == "token-mean":
                w = m / n_tok
            elif mode == "seq-mean-token-mean":
                w = m / sum(mask[b]) / len(valid_rows)
            elif mode == "seq-mean-token-sum":
                w = m / len(valid_rows)
            else:
                w = m / (max_len or t_sz) / len(valid_rows)
            weights[b][t] = w

    def agg(vals):
        return math.fsum(weights[b][t] * vals[b][t] for b in range(b_sz) for t in range(t_sz) if weights[b][t])

    grad = [[weights[b][t] * dtok[b][t] for t in range(t_sz)] for b in range(b_sz)]
    n = stats["n"] or 1.0
    metrics = {
        "clip_frac_low": stats["low"] / n,
        "clip_frac_high": stats["high"] / n,
        "clip_frac": (stats["low"] + stats["high"]) / n,
        "dual_clip_frac": stats["dual"] / n,
        "approx_kl": stats["akl"] / n,
        "ratio_mean": stats["rsum"] / n,
        "ratio_min": min(ratios) if ratios else 0.0,
        "ratio_max": max(ratios) if ratios else 0.0,
        "kl_loss": agg(kls),
    }
    return agg(per_tok), grad, metrics


def _random_inputs(seed, b=None, t=None, token_adv=False, float_mask=False):
    gen = torch.Generator().manual_seed(seed)
    b = b or int(torch.randint(2, 6, (1,), generator=gen))
    t = t or int(torch.randint(1, 12, (1,), generator=gen))
    lp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    # Log-ratios spread over [-1.5, 1.5]: every clip branch and dual-clip get hit.
    old = lp - (torch.rand(b, t, generator=gen, dtype=torch.float64) * 3 - 1.5)
    ref = lp - torch.randn(b, t, generator=gen, dtype=torch.float64)
    adv = (
        torch.randn(b, t, generator=gen, dtype=torch.float64)
        if token_adv
        else torch.randn(b, generator=gen, dtype=torch.float64)
    )
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[-1] = False  # fully masked row
    if float_mask:
        mask = mask.to(torch.float64) * torch.rand(b, t, generator=gen, dtype=torch.float64)
    return lp, old, ref, adv, mask


def _check(got: float, want: float, what: str):
    assert abs(got - want) <= 1e-10 * abs(want) + 1e-300, (what, got, want)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kl_name", ["k1", "k2", "k3"])
@pytest.mark.parametrize("seed", range(2))
def test_grpo_loss_matches_loop_reference(name, mode, kl_name, seed):
    lp, old, ref, adv, mask = _random_inputs(seed, token_adv=seed == 1, float_mask=seed == 1)
    kl_coef, kl_clamp, max_len = 0.05, 1.2, 16
    x = lp.clone().requires_grad_(True)
    res = compute_grpo_loss(
        x,
        old,
        ref,
        adv,
        mask,
        policy_loss=name,
        loss_agg_mode=mode,
        kl_estimator=kl_name,
        kl_coef=kl_coef,
        kl_clamp=kl_clamp,
        max_response_length=max_len,
        **CFG,
    )
    res.loss.backward()
    want_loss, want_grad, want_metrics = _ref_grpo(
        name,
        lp.tolist(),
        old.tolist(),
        ref.tolist(),
        adv.tolist(),
        mask.to(torch.float64).tolist(),
        mode,
        kl_name,
        kl_coef,
        kl_clamp,
        max_len,
        CFG,
    )
    _check(res.loss.item(), want_loss, "loss")
    torch.testing.assert_close(x.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-300)
    for key, value in want_metrics.items():
        _check(res.metrics[key].item(), value, key)
        assert not res.metrics[key].requires_grad
    torch.testing.assert_close(res.metrics["pg_loss"] + kl_coef * res.metrics["kl_loss"], res.loss.detach())


def test_every_branch_is_exercised():
    lp, old, _, adv, mask = _random_inputs(0, b=6, t=40)
    res = compute_policy_loss("dual_clip", lp, old, adv, mask, **CFG)
    for key in ("clip_frac_low", "clip_frac_high", "dual_clip_frac"):
        assert res.metrics[key] > 0, key


@pytest.mark.parametrize("name", ["ppo_clip", "dual_clip"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(name, mode):
    lp, old, ref, adv, mask = _random_inputs(3, b=3, t=5)
    x = lp.clone().requires_grad_(True)

    def fn(v):
        return compute_grpo_loss(v, old, ref, adv, mask, policy_loss=name, loss_agg_mode=mode, kl_coef=0.1, **CFG).loss

    assert torch.autograd.gradcheck(fn, (x,))
    per_token = lambda v: get_policy_loss(name)(v, old, adv, **CFG).loss  # noqa: E731
    assert torch.autograd.gradcheck(per_token, (x,))


@pytest.mark.parametrize("mode", MODES)
def test_visual_rft_gradient_equals_on_policy_ppo_gradient(mode):
    # The surrogate's value is constant in logp (so finite differences cannot check it); its
    # gradient must equal that of the PPO objective evaluated on-policy (old = logp, r = 1).
    lp, _, ref, adv, mask = _random_inputs(5, b=3, t=5)
    x = lp.clone().requires_grad_(True)
    kw = dict(loss_agg_mode=mode, kl_coef=0.1)
    compute_grpo_loss(x, None, ref, adv, mask, policy_loss="visual_rft_unclipped", **kw).loss.backward()
    y = lp.clone().requires_grad_(True)
    compute_grpo_loss(y, lp, ref, adv, mask, policy_loss="ppo_clip", **kw).loss.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=0)


def test_visual_rft_unclipped_value_and_gradient():
    lp, _, _, adv, mask = _random_inputs(4, b=4, t=6)
    x = lp.clone().requires_grad_(True)
    tok = get_policy_loss("visual_rft_unclipped")(x, None, adv)
    torch.testing.assert_close(tok.loss.detach(), (-adv[:, None]).expand(4, 6))
    (g,) = torch.autograd.grad(tok.loss.sum(), x)
    torch.testing.assert_close(g, (-adv[:, None]).expand(4, 6))
    assert torch.all(tok.ratio == 1)


def test_clip_higher_is_asymmetric():
    lp = torch.zeros(1, 2, dtype=torch.float64)
    old = torch.tensor([[-math.log(1.25), math.log(1.25)]], dtype=torch.float64)  # r = 1.25, 0.8
    pos = get_policy_loss("ppo_clip")(
        lp, old, torch.tensor([1.0], dtype=torch.float64), clip_eps_low=0.2, clip_eps_high=0.28
    )
    # r = 1.25 < 1.28: not clipped with eps_high = 0.28 (it would be with a symmetric 0.2).
    assert not pos.clipped_high[0, 0] and abs(pos.loss[0, 0].item() + 1.25) < 1e-12
    neg = get_policy_loss("ppo_clip")(
        lp, old, torch.tensor([-1.0], dtype=torch.float64), clip_eps_low=0.1, clip_eps_high=0.28
    )
    assert neg.clipped_low[0, 1] and abs(neg.loss[0, 1].item() - 0.9) < 1e-12


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_extreme_log_ratios_and_all_masked(name, mode):
    lp = torch.tensor([[0.0, -1e4, -1.0], [-2.0, -3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1e4, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[0.0, 1e3, -1e3], [0.0, 0.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([-2.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [False, False, False]])
    res = compute_grpo_loss(lp, old, ref, adv, mask, policy_loss=name, loss_agg_mode=mode, kl_coef=0.5, **CFG)
    res.loss.backward()
    assert torch.isfinite(res.loss) and torch.isfinite(lp.grad).all()
    assert all(torch.isfinite(v) for v in res.metrics.values())
    assert res.metrics["ratio_max"] <= math.exp(20.0) * (1 + 1e-12)
    lp.grad = None
    empty = compute_grpo_loss(lp, old, ref, adv, torch.zeros(2, 3), policy_loss=name, loss_agg_mode=mode, kl_coef=0.5)
    empty.loss.backward()
    assert empty.loss.item() == 0.0 and torch.all(lp.grad == 0)
    assert all(v.item() == 0.0 for v in empty.metrics.values())


def test_bad_arguments_raise():
    lp, old, ref, adv, mask = _random_inputs(0, b=2, t=3)
    with pytest.raises(ValueError, match="clip_ratio_c > 1"):
        compute_policy_loss("dual_clip", lp, old, adv, mask, clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="old_log_probs"):
        compute_policy_loss("ppo_clip", lp, None, adv, mask)
    with pytest.raises(ValueError, match="ref_log_probs"):
        compute_grpo_loss(lp, old, None, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="advantages"):
        compute_policy_loss("ppo_clip", lp, old, torch.zeros(5), mask)
    with pytest.raises(KeyError, match="ppo_clip"):
        compute_policy_loss("ppo", lp, old, adv, mask)
    with pytest.raises(ValueError, match="already registered"):
        POLICY_LOSSES.register("ppo_clip")(lambda *a, **k: None)
