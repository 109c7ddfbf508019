"""GSPO, CISPO, the importance-weighted KL, token weights and the rollout-mismatch correction vs.
float64 per-token loop references (python math, not the vectorised torch code), plus gradcheck."""

import math

import pytest
import torch

from megatron_vrft.rl import (
    ROLLOUT_IS_LEVELS,
    compute_grpo_loss,
    compute_rollout_correction,
    get_policy_loss,
)

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
CFG = dict(clip_eps_low=0.2, clip_eps_high=0.28, clip_ratio_c=3.0, log_ratio_clamp=20.0)


def _inputs(seed, b=5, t=7, token_adv=False, float_mask=False):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    old = lp - (torch.rand(b, t, generator=gen, dtype=torch.float64) * 3 - 1.5)
    ref = lp - torch.randn(b, t, generator=gen, dtype=torch.float64)
    shape = (b, t) if token_adv else (b,)
    adv = torch.randn(*shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[:, 0] = True
    mask[-1] = False  # fully masked row
    if float_mask:
        mask = mask.to(torch.float64) * (0.5 + torch.rand(b, t, generator=gen, dtype=torch.float64))
    return lp, old, ref, adv, mask


def _adv(adv, b, t):
    return adv[b][t] if isinstance(adv[b], list) else adv[b]


def _agg_weights(mask, mode, max_len):
    """w_bt with loss = sum_bt w_bt * v_bt (see aggregation.py)."""
    rows = [b for b, row in enumerate(mask) if sum(row) != 0]
    n_tok = sum(sum(row) for row in mask)
    w = [[0.0] * len(row) for row in mask]
    for b in rows:
        for t, m in enumerate(mask[b]):
            if mode == "token-mean":
                w[b][t] = m / n_tok
            elif mode == "seq-mean-token-mean":
                w[b][t] = m / sum(mask[b]) / len(rows)
            elif mode == "seq-mean-token-sum":
                w[b][t] = m / len(rows)
            else:
                w[b][t] = m / max_len / len(rows)
    return w


def _ref_gspo(lp, old, adv, mask, el, eh):
    """-> per-token (loss, dloss/dlp, ratio, low, high) nested lists."""
    out = []
    for b in range(len(lp)):
        valid = [t for t in range(len(lp[b])) if mask[b][t] != 0]
        log_s = math.fsum(lp[b][t] - old[b][t] for t in valid) / len(valid) if valid else 0.0
        s = math.exp(log_s)
        row = []
        for t in range(len(lp[b])):
            a = _adv(adv, b, t)
            unclipped, clipped = -a * s, -a * min(max(s, 1 - el), 1 + eh)
            if clipped > unclipped:
                row.append((clipped, 0.0, s, s < 1, s > 1))
            else:
                row.append((unclipped, -a * s, s, False, False))
        out.append(row)
    return out


def _ref_cispo(lp, old, adv, el, eh):
    out = []
    for b in range(len(lp)):
        row = []
        for t in range(len(lp[b])):
            a, r = _adv(adv, b, t), math.exp(lp[b][t] - old[b][t])
            w = min(max(r, 1 - el), 1 + eh)
            row.append((-w * a * lp[b][t], -w * a, r, r < 1 - el, r > 1 + eh))
        out.append(row)
    return out


def _ref_ppo(lp, old, a, el, eh):
    r = math.exp(lp - old)
    unclipped, clipped = -a * r, -a * min(max(r, 1 - el), 1 + eh)
    return (clipped, 0.0) if clipped > unclipped else (unclipped, -a * r)


def _ref_k3(lp, ref):
    d = lp - ref
    return math.exp(-d) + d - 1, 1 - math.exp(-d)


@pytest.mark.parametrize("name", ["gspo", "cispo"])
@pytest.mark.parametrize("seed", range(3))
def test_per_token_loss_matches_loop(name, seed):
    lp, old, _, adv, mask = _inputs(seed, b=6, t=9, token_adv=seed == 1, float_mask=seed == 2)
    x = lp.clone().requires_grad_(True)
    tok = get_policy_loss(name)(x, old, adv, response_mask=mask, **CFG)
    coef = torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    (tok.loss * coef).sum().backward()
    args = (lp.tolist(), old.tolist(), adv.tolist())
    want = _ref_gspo(*args, mask.tolist(), 0.2, 0.28) if name == "gspo" else _ref_cispo(*args, 0.2, 0.28)
    c = coef.tolist()
    for b, row in enumerate(want):
        for t, (loss, grad, r, low, high) in enumerate(row):
            assert tok.loss[b, t].item() == pytest.approx(loss, rel=1e-12, abs=1e-15)
            assert x.grad[b, t].item() == pytest.approx(c[b][t] * grad, rel=1e-12, abs=1e-15)
            assert tok.ratio[b, t].item() == pytest.approx(r, rel=1e-12)
            assert bool(tok.clipped_low[b, t]) == low and bool(tok.clipped_high[b, t]) == high
    assert not tok.ratio.requires_grad and not tok.log_ratio.requires_grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_grpo_loss_with_new_policy_losses_matches_loop(name, mode):
    lp, old, _, adv, mask = _inputs(4, b=6, t=8, float_mask=True)
    x = lp.clone().requires_grad_(True)
    kw = dict(policy_loss=name, loss_agg_mode=mode, max_response_length=10, **CFG)
    res = compute_grpo_loss(x, old, None, adv, mask, **kw)
    res.loss.backward()
    args = (lp.tolist(), old.tolist(), adv.tolist())
    want = _ref_gspo(*args, mask.tolist(), 0.2, 0.28) if name == "gspo" else _ref_cispo(*args, 0.2, 0.28)
    w = _agg_weights(mask.tolist(), mode, 10)
    pairs = [(b, t) for b in range(6) for t in range(8)]
    loss = math.fsum(w[b][t] * want[b][t][0] for b, t in pairs)
    assert res.loss.item() == pytest.approx(loss, rel=1e-12)
    grad = torch.tensor([[w[b][t] * want[b][t][1] for t in range(8)] for b in range(6)], dtype=torch.float64)
    torch.testing.assert_close(x.grad, grad, rtol=1e-12, atol=1e-15)
    m = mask.tolist()
    n = math.fsum(v for row in m for v in row)
    frac = math.fsum(m[b][t] * (want[b][t][3] + want[b][t][4]) for b, t in pairs) / n
    assert res.metrics["clip_frac"].item() == pytest.approx(frac, rel=1e-12, abs=1e-15)


def test_gspo_sequence_objective_and_branches():
    # With seq-mean-token-mean the token form's loss and gradient are those of the sequence-level
    # objective (1/S) sum_b max(-A_b s_b, -A_b clip(s_b)), s_b = exp(mean_t (logp - old)).
    lp, old, _, adv, mask = _inputs(7, b=12, t=6)
    x = lp.clone().requires_grad_(True)
    kw = dict(policy_loss="gspo", loss_agg_mode="seq-mean-token-mean", **CFG)
    res = compute_grpo_loss(x, old, None, adv, mask, **kw)
    rows, total = 0, 0.0
    for b in range(12):
        valid = [t for t in range(6) if mask[b, t]]
        if not valid:
            continue
        s = math.exp(math.fsum(lp[b, t].item() - old[b, t].item() for t in valid) / len(valid))
        a = adv[b].item()
        total += max(-a * s, -a * min(max(s, 0.8), 1.28))
        rows += 1
    assert res.loss.item() == pytest.approx(total / rows, rel=1e-12)
    assert 0 < res.metrics["clip_frac"].item() < 1  # both branches hit

    def fn(v):
        kw = dict(policy_loss="gspo", loss_agg_mode="seq-mean-token-mean", **CFG)
        return compute_grpo_loss(v, old, None, adv, mask, **kw).loss

    assert torch.autograd.gradcheck(fn, (x,))


def test_cispo_gradcheck_with_ratio_held_fixed():
    # The IS weight is detached: hold r fixed (old moves with logp) so finite differences see only
    # the -w A logp term, whose gradient autograd must reproduce.
    lp, old, ref, adv, mask = _inputs(8, b=3, t=5)
    shift = lp - old
    x = lp.clone().requires_grad_(True)
    for mode in MODES:
        kw = dict(policy_loss="cispo", loss_agg_mode=mode, kl_coef=0.1, **CFG)
        assert torch.autograd.gradcheck(lambda v: compute_grpo_loss(v, v - shift, ref, adv, mask, **kw).loss, (x,))
    tok = get_policy_loss("cispo")(lp, old, adv, **CFG)
    assert tok.clipped_low.any() and tok.clipped_high.any()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_kl_importance_weighting_and_token_weights_match_loop(mode, weighted, seed):
    lp, old, ref, adv, mask = _inputs(seed + 20, b=5, t=6, token_adv=seed == 1, float_mask=seed == 1)
    tw = 0.1 + 2 * torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    kl_coef = 0.3
    x = lp.clone().requires_grad_(True)
    res = compute_grpo_loss(
        x,
        old,
        ref,
        adv,
        mask,
        loss_agg_mode=mode,
        kl_estimator="k3",
        kl_coef=kl_coef,
        kl_clamp=None,
        max_response_length=8,
        kl_importance_weighted=weighted,
        token_weights=tw,
        **CFG,
    )
    res.loss.backward()
    w = _agg_weights(mask.tolist(), mode, 8)
    a_l, L, O, R, TW = adv.tolist(), lp.tolist(), old.tolist(), ref.tolist(), tw.tolist()
    loss, pg, kl_total = 0.0, 0.0, 0.0
    grad = [[0.0] * 6 for _ in range(5)]
    for b in range(5):
        for t in range(6):
            p, pg_g = _ref_ppo(L[b][t], O[b][t], _adv(a_l, b, t), 0.2, 0.28)
            k, k_g = _ref_k3(L[b][t], R[b][t])
            rho = math.exp(L[b][t] - O[b][t]) if weighted else 1.0
            pg += w[b][t] * TW[b][t] * p
            kl_total += w[b][t] * rho * k
            grad[b][t] = w[b][t] * (TW[b][t] * pg_g + kl_coef * rho * k_g)
    loss = pg + kl_coef * kl_total
    assert res.loss.item() == pytest.approx(loss, rel=1e-12)
    assert res.metrics["pg_loss"].item() == pytest.approx(pg, rel=1e-12)
    assert res.metrics["kl_loss"].item() == pytest.approx(kl_total, rel=1e-12)
    torch.testing.assert_close(x.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_new_options_default_off_and_gradcheck():
    lp, old, ref, adv, mask = _inputs(30, b=3, t=5)
    base = compute_grpo_loss(lp, old, ref, adv, mask, kl_coef=0.2, **CFG)
    ones = compute_grpo_loss(lp, old, ref, adv, mask, kl_coef=0.2, token_weights=torch.ones_like(lp), **CFG)
    assert torch.equal(base.loss, ones.loss)
    # Without old_log_probs (on-policy unclipped variant) the KL ratio is 1: weighting changes nothing.
    a = compute_grpo_loss(lp, None, ref, adv, mask, policy_loss="visual_rft_unclipped", kl_coef=0.2)
    b = compute_grpo_loss(
        lp, None, ref, adv, mask, policy_loss="visual_rft_unclipped", kl_coef=0.2, kl_importance_weighted=True
    )
    assert torch.equal(a.loss, b.loss)
    tw = torch.rand(lp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = lp.clone().requires_grad_(True)
    for mode in MODES:
        kw = dict(loss_agg_mode=mode, kl_coef=0.2, **CFG)
        assert torch.autograd.gradcheck(
            lambda v: compute_grpo_loss(v, old, ref, adv, mask, token_weights=tw, **kw).loss, (x,)
        )
        # KL ratio detached: hold it fixed (old moves with logp) for finite differences.
        assert torch.autograd.gradcheck(
            lambda v: compute_grpo_loss(v, v - (lp - old), ref, adv, mask, kl_importance_weighted=True, **kw).loss,
            (x,),
        )


def _ref_correction(old, roll, mask, level, mode, thr):
    b_sz, t_sz = len(old), len(old[0])
    w = [[0.0] * t_sz for _ in range(b_sz)]
    over = [[False] * t_sz for _ in range(b_sz)]
    n = kl = 0.0
    for b in range(b_sz):
        seq = math.fsum(old[b][t] - roll[b][t] for t in range(t_sz) if mask[b][t])
        for t in range(t_sz):
            if not mask[b][t]:
                continue
            d = old[b][t] - roll[b][t]
            raw = math.exp(seq if level == "sequence" else d)
            over[b][t] = raw > thr
            w[b][t] = min(raw, thr) if mode == "truncate" else (raw if raw <= thr else 0.0)
            n += 1
            kl += math.exp(d) - 1 - d
    valid = [(b, t) for b in range(b_sz) for t in range(t_sz) if mask[b][t]]
    frac = sum(over[b][t] for b, t in valid) / n if n else 0.0
    mean = math.fsum(w[b][t] for b, t in valid) / n if n else 0.0
    return w, frac, mean, (kl / n if n else 0.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("seed", range(3))
def test_rollout_correction_matches_loop(level, mode, seed):
    gen = torch.Generator().manual_seed(seed + 40)
    old = -torch.rand(6, 7, generator=gen, dtype=torch.float64) * 3
    roll = old - 0.6 * torch.randn(6, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 7, generator=gen) > 0.3
    mask[-1] = False
    roll[~mask] = float("-inf")  # padding garbage must not leak
    old_g = old.clone().requires_grad_(True)
    thr = 1.5 if level == "token" else 2.0
    w, metrics = compute_rollout_correction(old_g, roll, mask, level=level, mode=mode, threshold=thr)
    want_w, frac, mean, kl = _ref_correction(old.tolist(), roll.tolist(), mask.tolist(), level, mode, thr)
    assert not w.requires_grad and w.shape == (6, 7)
    torch.testing.assert_close(w, torch.tensor(want_w, dtype=torch.float64), rtol=1e-12, atol=0)
    key = "rollout_is_truncated_frac" if mode == "truncate" else "rollout_is_masked_frac"
    assert 0 < metrics[key].item() < 1
    assert metrics[key].item() == pytest.approx(frac, rel=1e-12)
    assert metrics["rollout_is_mean"].item() == pytest.approx(mean, rel=1e-12)
    assert metrics["rollout_kl_k3"].item() == pytest.approx(kl, rel=1e-12)
    if level == "sequence" and mode == "mask":  # whole rows zeroed
        for b in range(6):
            vals = w[b][mask[b]]
            assert bool((vals == 0).all()) or bool((vals > 0).all())


def test_rollout_correction_feeds_token_weights_and_errors():
    lp, old, ref, adv, mask = _inputs(50, b=4, t=5)
    roll = old + 0.1
    w, _ = compute_rollout_correction(old, roll, mask, level="sequence", mode="mask", threshold=3.0)
    res = compute_grpo_loss(lp, old, ref, adv, mask, token_weights=w, **CFG)
    assert torch.isfinite(res.loss)
    empty_w, empty_m = compute_rollout_correction(old, roll, torch.zeros_like(mask))
    assert torch.all(empty_w == 0) and all(v.item() == 0 for v in empty_m.values())
    assert set(ROLLOUT_IS_LEVELS.names()) == {"token", "sequence"}
    with pytest.raises(KeyError, match="token"):
        compute_rollout_correction(old, roll, mask, level="tok")
    with pytest.raises(KeyError, match="truncate"):
        compute_rollout_correction(old, roll, mask, mode="clip")
    with pytest.raises(ValueError, match="threshold"):
        compute_rollout_correction(old, roll, mask, threshold=0.0)
    with pytest.raises(ValueError, match="shape"):
        compute_rollout_correction(old, roll[:, :2], mask)
    with pytest.raises(ValueError, match="token_weights"):
        compute_grpo_loss(lp, old, ref, adv, mask, token_weights=w[:, :2])
    with pytest.raises(ValueError, match="response_mask"):
        get_policy_loss("gspo")(lp, old, adv)
    for name in ("gspo", "cispo"):
        with pytest.raises(ValueError, match="old_log_probs"):
            get_policy_loss(name)(lp, None, adv, response_mask=mask)
