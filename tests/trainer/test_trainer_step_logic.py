"""The GRPO step's logic (``megatron_vrft.trainer.loop``) in one process, in seconds.

``test_trainer_train.py`` runs whole 2-rank trainings; these tests check the pieces a step is made
of against independent references: the per-micro-batch loss (value, gradient, stats) against the
formulas written out here in float64, the config -> loss-option routing, the stats reduction, the
rollout dealing/gathering (with a recording fake engine; several ranks simulated by standing in for
the collectives), DP sharding of prompts and rollout rows, and the rewards stage.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_vrft import builders
from megatron_vrft.config import load_config
from megatron_vrft.data import dp_shard
from megatron_vrft.data.sampler import PromptBatcher
from megatron_vrft.distributed.parallel_state import single_rank_world
from megatron_vrft.rewards import GroundTruth
from megatron_vrft.rl import compute_grpo_loss, compute_rollout_correction
from megatron_vrft.rollout.types import RolloutBatch, SamplingParams
from megatron_vrft.trainer import loop
from megatron_vrft.trainer.scoring import score_rollout

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu.yaml"
B, T = 3, 5


def load(*overrides: str):
    return load_config(str(CONFIG), list(overrides))


@pytest.fixture(scope="module")
def world():
    with single_rank_world() as groups:
        yield groups


# -- the loss function: fake micro-batches and an independent float64 reference ---------------------


def fake_micro_batch(seed: int, *, dtype=torch.float64, old: bool = True, ref: bool = True, ratio_spread=0.45):
    """What ``build_grpo_loss_fn``'s closure reads from a MicroBatch, random; at least one response
    token per row, advantages of both signs, ratios on both sides of the clip range."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    mask = (torch.rand(B, T, generator=g) < 0.6).double()
    sure = torch.randint(T, (B,), generator=g)
    mask[torch.arange(B), sure] = 1.0
    lp = -0.05 - 2.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old_lp = lp + ratio_spread * rnd(B, T)
    old_lp[0, sure[0]] = lp[0, sure[0]] - 0.5  # A > 0, r = e^0.5: beyond any 1 + eps_high used here
    old_lp[1, sure[1]] = lp[1, sure[1]] + 0.5  # A < 0, r = e^-0.5: below any 1 - eps_low used here
    signs = torch.tensor([1.0, -1.0, 1.0 if torch.rand(1, generator=g) < 0.5 else -1.0], dtype=torch.float64)
    adv = signs * (0.2 + rnd(B).abs())
    mb = SimpleNamespace(
        response_mask=mask.to(dtype),
        old_logprobs=old_lp.to(dtype) if old else None,
        ref_logprobs=(lp + 0.5 * rnd(B, T)).to(dtype) if ref else None,
        advantages=adv.float(),  # MicroBatch advantages are float32
        sampling_logprobs=((old_lp + 0.3 * rnd(B, T)) * mask).to(dtype),
        num_tokens=int(mask.sum()),
    )
    ent = (0.1 + 2.0 * torch.rand(B, T, generator=g, dtype=torch.float64)).to(dtype)
    return mb, lp.to(dtype), ent


def leaves(lp, ent):
    return lp.clone().requires_grad_(True), ent.clone().requires_grad_(True)


def agg_weights(mask: torch.Tensor, mode: str, normalizer: float, length: int = 16) -> torch.Tensor:
    """``aggregate(v) = sum(weights * v)``: every aggregation mode is linear in the values; ``length``
    is Dr.GRPO's constant (tiny_cpu.yaml's ``rollout.max_new_tokens``)."""
    if mode in ("token-mean", "seq-mean-token-sum"):
        return mask / normalizer
    if mode == "seq-mean-token-mean":
        return mask / mask.sum(1, keepdim=True) / normalizer
    if mode == "seq-mean-token-sum-norm":
        return mask / length / normalizer
    raise AssertionError(mode)


def reference(
    mb,
    lp,
    ent,
    *,
    policy_loss,
    mode,
    eps_low,
    eps_high,
    clip_c,
    kl_coef,
    ent_coef,
    normalizer,
    total_tokens,
    correction=None,
):
    """Loss, d loss / d logprobs, d loss / d entropy and the stats, from the formulas (float64)."""
    d = lambda t: t.detach().double()  # noqa: E731
    m, lp, ent = d(mb.response_mask), d(lp), d(ent)
    old = d(mb.old_logprobs) if mb.old_logprobs is not None else lp
    samp = d(mb.sampling_logprobs)
    A = mb.advantages.double()[:, None].expand(B, T)
    r = torch.exp(lp - old)
    low = (A < 0) & (r < 1 - eps_low)
    high = (A > 0) & (r > 1 + eps_high)
    pg = torch.where(low | high, -A * r.clamp(1 - eps_low, 1 + eps_high), -A * r)
    dpg = torch.where(low | high, torch.zeros_like(r), -A * r)
    if policy_loss == "dual_clip":
        dual = (A < 0) & (r > clip_c)
        pg = torch.where(dual, -A * clip_c, pg)
        dpg = torch.where(dual, torch.zeros_like(r), dpg)
    else:
        assert policy_loss == "ppo_clip"
    stats = {}
    if correction is not None:
        level, cmode, C = correction
        dlt = (old - samp) * m
        w = torch.exp(dlt) if level == "token" else torch.exp(dlt.sum(1, keepdim=True)).expand(B, T)
        over = (w > C) & (m > 0)
        w = torch.where(over, torch.full_like(w, C) if cmode == "truncate" else torch.zeros_like(w), w) * m
        pg, dpg = pg * w, dpg * w
        frac_key = "rollout/rollout_is_truncated_frac" if cmode == "truncate" else "rollout/rollout_is_masked_frac"
        stats[frac_key] = float((over.double() * m).sum() / total_tokens)
        stats["rollout/rollout_is_mean"] = float(w.sum() / total_tokens)
        stats["rollout/rollout_kl_k3"] = float(((torch.exp(dlt) - dlt - 1) * m).sum() / total_tokens)
    aw = agg_weights(m, mode, normalizer)
    loss = (aw * pg).sum() - ent_coef * (aw * ent).sum()
    grad_lp = aw * dpg
    stats["pg_loss"] = float((aw * pg).sum())
    if mb.ref_logprobs is not None:
        x = d(mb.ref_logprobs) - lp
        kl = torch.exp(x) - x - 1  # k3
        stats["kl_loss"] = float((aw * kl).sum())
        loss = loss + kl_coef * (aw * kl).sum()
        grad_lp = grad_lp + kl_coef * aw * (1 - torch.exp(x))
    mis = (samp - lp) * m
    stats.update(
        {
            "loss": float(loss),
            "entropy": float((aw * ent).sum()),
            "clip_frac_low": float((low.double() * m).sum() / total_tokens),
            "clip_frac_high": float((high.double() * m).sum() / total_tokens),
            "clip_frac": float(((low | high).double() * m).sum() / total_tokens),
            "approx_kl": float(((r - 1 - torch.log(r)) * m).sum() / total_tokens),
            "ratio_mean": float((r * m).sum() / total_tokens),
            "rollout/logprob_abs_diff_mean": float(mis.abs().sum() / total_tokens),
            "rollout/logprob_abs_diff_max": float(mis.abs().max()),
            "rollout/kl_k3": float(((torch.exp(samp - lp) - (samp - lp) - 1) * m).sum() / total_tokens),
        }
    )
    return float(loss), grad_lp, -ent_coef * aw, stats


def run_loss_fn(cfg, mb, lp, ent, *, normalizer, total_tokens):
    a = cfg.algorithm
    loss_fn = loop.build_grpo_loss_fn(
        builders.grpo_loss_options(a),
        correction=builders.rollout_correction_options(a),
        entropy_coef=a.entropy_coef,
        normalizer=normalizer,
        total_tokens=total_tokens,
        max_response_length=cfg.rollout.max_new_tokens,  # as grpo_step passes it
    )
    lp_, ent_ = leaves(lp, ent)
    loss, stats = loss_fn(mb, lp_, ent_)
    loss.backward()
    g_ent = ent_.grad if ent_.grad is not None else torch.zeros_like(ent)  # None: entropy_coef 0
    return loss.detach(), lp_.grad, g_ent, stats


def base_keys():
    return {
        "loss",
        "pg_loss",
        "entropy",
        "rollout/logprob_abs_diff_mean",
        "rollout/logprob_abs_diff_max",
        "rollout/kl_k3",
        "clip_frac",
        "clip_frac_low",
        "clip_frac_high",
        "approx_kl",
        "ratio_mean",
    }


def assert_stats(stats, want, *, rtol=1e-9, atol=1e-12):
    assert set(stats) == set(want), sorted(set(stats) ^ set(want))
    for k, v in want.items():
        assert stats[k] == pytest.approx(v, rel=rtol, abs=atol), k


CASES = {
    # name: (overrides, policy loss, aggregation, correction (level, mode, threshold) or None)
    "ppo_clip-token-mean-kl-entropy": (
        [
            "algorithm.clip_eps_low=0.15",
            "algorithm.clip_eps_high=0.28",
            "algorithm.kl_coef=0.07",
            "algorithm.entropy_coef=0.013",
        ],
        "ppo_clip",
        "token-mean",
        None,
    ),
    "ppo_clip-seq-mean-token-mean-kl": (
        [
            "algorithm.loss_agg_mode=seq-mean-token-mean",
            "algorithm.kl_coef=0.2",
            "algorithm.entropy_coef=0.05",
            "algorithm.clip_eps_high=0.3",
        ],
        "ppo_clip",
        "seq-mean-token-mean",
        None,
    ),
    "ppo_clip-seq-mean-token-sum": (
        ["algorithm.loss_agg_mode=seq-mean-token-sum", "algorithm.entropy_coef=0.02"],
        "ppo_clip",
        "seq-mean-token-sum",
        None,
    ),
    "ppo_clip-seq-mean-token-sum-norm": (
        ["algorithm.loss_agg_mode=seq-mean-token-sum-norm", "algorithm.kl_coef=0.1"],
        "ppo_clip",
        "seq-mean-token-sum-norm",
        None,
    ),
    "dual_clip-token-mean": (
        ["algorithm.policy_loss=dual_clip", "algorithm.clip_ratio_c=1.4", "algorithm.clip_eps_low=0.1"],
        "dual_clip",
        "token-mean",
        None,
    ),
    "ppo_clip-token-correction-truncate": (
        [
            "algorithm.rollout_correction=token",
            "algorithm.rollout_correction_threshold=1.2",
            "algorithm.entropy_coef=0.01",
        ],
        "ppo_clip",
        "token-mean",
        ("token", "truncate", 1.2),
    ),
    "ppo_clip-sequence-correction-mask": (
        [
            "algorithm.rollout_correction=sequence",
            "algorithm.rollout_correction_mode=mask",
            "algorithm.rollout_correction_threshold=1.5",
            "algorithm.loss_agg_mode=seq-mean-token-mean",
        ],
        "ppo_clip",
        "seq-mean-token-mean",
        ("sequence", "mask", 1.5),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_loss_fn_matches_formulas(case):
    """Loss, gradients w.r.t. logprobs and entropy, and every stat, against the float64 formulas;
    the normalizer and total token count are global (other micro-batches' tokens included)."""
    overrides, policy, mode, correction = CASES[case]
    cfg = load(*overrides)
    a = cfg.algorithm
    assert (a.policy_loss, a.loss_agg_mode) == (policy, mode)
    mb, lp, ent = fake_micro_batch(sum(map(ord, case)))
    if a.kl_coef == 0:
        mb.ref_logprobs = None  # the trainer has no reference model then
    total_tokens = mb.num_tokens + 9.0
    normalizer = total_tokens if mode == "token-mean" else B + 2.0
    loss, g_lp, g_ent, stats = run_loss_fn(cfg, mb, lp, ent, normalizer=normalizer, total_tokens=total_tokens)
    want_loss, want_g_lp, want_g_ent, want = reference(
        mb,
        lp,
        ent,
        policy_loss=policy,
        mode=mode,
        eps_low=a.clip_eps_low,
        eps_high=a.clip_eps_high,
        clip_c=a.clip_ratio_c,
        kl_coef=a.kl_coef,
        ent_coef=a.entropy_coef,
        normalizer=normalizer,
        total_tokens=total_tokens,
        correction=correction,
    )
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(want_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(g_lp, want_g_lp, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g_ent, want_g_ent, rtol=1e-12, atol=1e-15)
    keys = base_keys() | ({"kl_loss"} if a.kl_coef else set()) | {k for k in want if k.startswith("rollout/rollout")}
    assert set(want) == keys
    assert_stats(stats, want)
    # the inputs reach every branch the reference distinguishes (else the case proves less)
    assert want["clip_frac_high"] > 0 and want["clip_frac_low"] > 0, want
    assert g_lp.abs().sum() > 0 and (g_lp * (1 - mb.response_mask)).abs().sum() == 0


def test_grpo_loss_fn_float32_matches_formulas():
    """The float32 path (the fused kernel where Triton runs, else torch) against the float64 reference."""
    cfg = load("algorithm.clip_eps_high=0.28", "algorithm.kl_coef=0.05", "algorithm.entropy_coef=0.01")
    a = cfg.algorithm
    mb, lp, ent = fake_micro_batch(7, dtype=torch.float32)
    total = mb.num_tokens + 4.0
    loss, g_lp, g_ent, stats = run_loss_fn(cfg, mb, lp, ent, normalizer=total, total_tokens=total)
    want_loss, want_g_lp, want_g_ent, want = reference(
        mb,
        lp,
        ent,
        policy_loss="ppo_clip",
        mode="token-mean",
        eps_low=a.clip_eps_low,
        eps_high=a.clip_eps_high,
        clip_c=a.clip_ratio_c,
        kl_coef=a.kl_coef,
        ent_coef=a.entropy_coef,
        normalizer=total,
        total_tokens=total,
    )
    assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_lp.double(), want_g_lp, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_ent.double(), want_g_ent, rtol=1e-5, atol=1e-7)
    assert_stats(stats, want, rtol=1e-5, atol=1e-6)


def test_grpo_loss_fn_on_policy_without_reference():
    """``ppo_epochs == 1``: old log-probs are None (ratio 1, never clipped), no reference (kl_coef 0):
    the loss is ``-sum(A m) / N``, its gradient ``-A m / N``, and no ``kl_loss`` stat."""
    cfg = load("algorithm.kl_coef=0")
    mb, lp, ent = fake_micro_batch(3, old=False, ref=False)
    n = mb.num_tokens + 2.0
    loss, g_lp, _, stats = run_loss_fn(cfg, mb, lp, ent, normalizer=n, total_tokens=n)
    A = mb.advantages.double()[:, None]
    m = mb.response_mask
    assert float(loss) == pytest.approx(float(-(A * m).sum() / n), rel=1e-12)
    torch.testing.assert_close(g_lp, -A * m / n)
    assert set(stats) == base_keys()
    assert stats["clip_frac"] == 0 and stats["approx_kl"] == pytest.approx(0, abs=1e-15)
    assert stats["ratio_mean"] == pytest.approx(mb.num_tokens / n)


def test_micro_batch_losses_and_stats_add_up_to_the_whole_batch():
    """Gradient accumulation: with the global normalizer, the loss of two micro-batches (rows 0-1,
    row 2) sums to the loss of one, and ``sum_micro_batch_stats`` of their stats gives the whole
    batch's stats (pre-weighted means summed, ``*_max`` by max)."""
    for mode, overrides in (
        ("token-mean", []),
        ("seq-mean-token-mean", ["algorithm.loss_agg_mode=seq-mean-token-mean"]),
    ):
        cfg = load(
            "algorithm.kl_coef=0.1",
            "algorithm.entropy_coef=0.03",
            "algorithm.rollout_correction=token",
            "algorithm.rollout_correction_threshold=1.3",
            *overrides,
        )
        mb, lp, ent = fake_micro_batch(11)
        total = float(mb.num_tokens)
        norm = total if mode == "token-mean" else float(B)
        whole_loss, whole_g, _, whole_stats = run_loss_fn(cfg, mb, lp, ent, normalizer=norm, total_tokens=total)
        parts, grads = [], []
        for rows in ([0, 1], [2]):
            part = SimpleNamespace(**{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in vars(mb).items()})
            part.num_tokens = int(part.response_mask.sum())
            loss, g, _, stats = run_loss_fn(cfg, part, lp[rows], ent[rows], normalizer=norm, total_tokens=total)
            parts.append((float(loss), stats))
            grads.append(g)
        assert sum(p[0] for p in parts) == pytest.approx(float(whole_loss), rel=1e-12)
        torch.testing.assert_close(torch.cat(grads), whole_g)
        summed = loop.sum_micro_batch_stats([p[1] for p in parts], sums=loop.SUMMED_STATS)
        assert set(summed) == set(whole_stats), mode
        for k, v in whole_stats.items():
            assert summed[k] == pytest.approx(v, rel=1e-10, abs=1e-14), (mode, k)


def test_every_loss_stat_survives_the_reduction():
    """A stat the loss emits but ``SUMMED_STATS`` misses would silently vanish from the metrics."""
    cfg = load("algorithm.kl_coef=0.1", "algorithm.rollout_correction=token")
    mb, lp, ent = fake_micro_batch(5)
    *_, stats = run_loss_fn(cfg, mb, lp, ent, normalizer=10.0, total_tokens=10.0)
    for mode in ("truncate", "mask"):
        cfg = load(
            "algorithm.kl_coef=0.1",
            "algorithm.rollout_correction=sequence",
            f"algorithm.rollout_correction_mode={mode}",
        )
        stats.update(run_loss_fn(cfg, mb, lp, ent, normalizer=10.0, total_tokens=10.0)[3])
    assert set(loop.sum_micro_batch_stats([stats], sums=loop.SUMMED_STATS)) == set(stats)


# -- config -> loss options: the direct call, written out with the values the config was given --------


DIRECT = {
    "gspo": dict(policy_loss="gspo", clip_eps_low=3e-2, clip_eps_high=4e-2, loss_agg_mode="seq-mean-token-mean"),
    "cispo": dict(policy_loss="cispo", clip_eps_low=1.0, clip_eps_high=0.25, kl_coef=0.1, kl_estimator="k2"),
    "dual_clip": dict(policy_loss="dual_clip", clip_ratio_c=1.3, kl_coef=0.2, kl_clamp=0.05, kl_estimator="k1"),
    "ppo_clip-kl_iw": dict(
        policy_loss="ppo_clip",
        kl_coef=0.3,
        kl_importance_weighted=True,
        clip_eps_low=0.05,
        loss_agg_mode="seq-mean-token-sum-norm",
    ),
    "cispo-correction": dict(
        policy_loss="cispo",
        rollout_correction="sequence",
        rollout_correction_mode="mask",
        rollout_correction_threshold=1.6,
        entropy_coef=0.02,
    ),
}
DEFAULTS = dict(
    policy_loss="ppo_clip",
    loss_agg_mode="token-mean",
    clip_eps_low=0.2,
    clip_eps_high=0.2,
    clip_ratio_c=3.0,
    kl_estimator="k3",
    kl_coef=0.0,
    kl_clamp=10.0,
    kl_importance_weighted=False,
    rollout_correction="none",
    rollout_correction_mode="truncate",
    rollout_correction_threshold=2.0,
    entropy_coef=0.0,
)


@pytest.mark.parametrize("case", list(DIRECT))
def test_grpo_loss_fn_equals_direct_compute_grpo_loss(case):
    """Each config field reaches its ``rl`` argument: the loss fn of a config with these values
    equals ``compute_grpo_loss`` (and ``compute_rollout_correction``) called with them by name."""
    o = {**DEFAULTS, **DIRECT[case]}
    cfg = load(*(f"algorithm.{k}={v}" for k, v in o.items()))
    mb, lp, ent = fake_micro_batch(sum(map(ord, case)))
    norm, total = 6.5, mb.num_tokens + 3.0
    loss, g_lp, g_ent, stats = run_loss_fn(cfg, mb, lp, ent, normalizer=norm, total_tokens=total)

    lp_, ent_ = leaves(lp, ent)
    weights = None
    if o["rollout_correction"] != "none":
        weights, _ = compute_rollout_correction(
            mb.old_logprobs,
            mb.sampling_logprobs,
            mb.response_mask,
            level=o["rollout_correction"],
            mode=o["rollout_correction_mode"],
            threshold=o["rollout_correction_threshold"],
        )
    out = compute_grpo_loss(
        lp_,
        mb.old_logprobs,
        mb.ref_logprobs,
        mb.advantages,
        mb.response_mask,
        policy_loss=o["policy_loss"],
        loss_agg_mode=o["loss_agg_mode"],
        clip_eps_low=o["clip_eps_low"],
        clip_eps_high=o["clip_eps_high"],
        clip_ratio_c=o["clip_ratio_c"],
        kl_estimator=o["kl_estimator"],
        kl_coef=o["kl_coef"],
        kl_clamp=o["kl_clamp"],
        kl_importance_weighted=o["kl_importance_weighted"],
        normalizer=norm,
        token_weights=weights,
        impl="torch",
        max_response_length=cfg.rollout.max_new_tokens,
    )
    m = mb.response_mask
    ent_term = (m * ent_).sum(1) / m.sum(1) if o["loss_agg_mode"] == "seq-mean-token-mean" else None
    assert o["loss_agg_mode"] in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
    if ent_term is not None:
        ent_agg = ent_term.sum() / norm
    elif o["loss_agg_mode"] == "token-mean":
        ent_agg = (m * ent_).sum() / norm
    else:
        ent_agg = (m * ent_).sum() / cfg.rollout.max_new_tokens / norm
    want = out.loss - o["entropy_coef"] * ent_agg
    want.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(g_lp, lp_.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_ent, ent_.grad if o["entropy_coef"] else torch.zeros_like(ent), rtol=0, atol=1e-15)
    assert stats["pg_loss"] == pytest.approx(float(out.metrics["pg_loss"]), rel=1e-12, abs=1e-14)
    assert stats["kl_loss"] == pytest.approx(float(out.metrics["kl_loss"]), rel=1e-12, abs=1e-14)
    assert stats["clip_frac"] == pytest.approx(float(out.metrics["clip_frac"]) * mb.num_tokens / total, rel=1e-12)
    assert ("rollout/rollout_is_mean" in stats) == (weights is not None)


def _loss_value(*overrides, mb, lp, ent):
    return float(run_loss_fn(load(*overrides), mb, lp, ent, normalizer=10.0, total_tokens=10.0)[0])


def test_clip_options_change_the_loss_where_they_bind():
    """Ratios beyond ``1 + clip_eps_high`` (A > 0): the high bound, and not the low one, moves the
    loss; ratios beyond ``clip_ratio_c`` (A < 0, dual_clip): the dual-clip constant moves it."""
    mb, lp, ent = fake_micro_batch(21, ref=False)
    mb.advantages = torch.tensor([1.0, 0.5, 2.0])
    mb.old_logprobs = (lp - 0.7).clone()  # every ratio e^0.7 ~ 2.01 > 1 + eps
    base = _loss_value("algorithm.kl_coef=0", mb=mb, lp=lp, ent=ent)
    assert _loss_value("algorithm.kl_coef=0", "algorithm.clip_eps_high=0.5", mb=mb, lp=lp, ent=ent) != pytest.approx(
        base
    )
    assert _loss_value("algorithm.kl_coef=0", "algorithm.clip_eps_low=0.5", mb=mb, lp=lp, ent=ent) == base
    m = mb.response_mask
    assert base == pytest.approx(float(-(mb.advantages.double()[:, None] * 1.2 * m).sum() / 10.0), rel=1e-12)

    mb.advantages = -mb.advantages  # A < 0 and r ~ 2.01: the dual-clip constant binds for c < 2.01

    def dual(c):
        return _loss_value(
            "algorithm.kl_coef=0",
            "algorithm.policy_loss=dual_clip",
            f"algorithm.clip_ratio_c={c}",
            mb=mb,
            lp=lp,
            ent=ent,
        )

    assert dual(1.5) == pytest.approx(float((1.5 * mb.advantages.abs().double()[:, None] * m).sum() / 10.0), rel=1e-12)
    assert dual(1.8) != pytest.approx(dual(1.5))
    assert dual(3.0) == pytest.approx(_loss_value("algorithm.kl_coef=0", mb=mb, lp=lp, ent=ent), rel=1e-12)


# -- stats reduction -----------------------------------------------------------------------------------


def test_sum_micro_batch_stats():
    stats = [
        {"loss": 0.25, "clip_frac": 0.125, "x_max": -3.0, "dropped": 7.0},
        {"loss": 0.5, "x_max": -0.5, "y_max": 2.0},
        {"loss": -0.125, "clip_frac": 0.0625, "x_max": -1.0, "ratio_mean": 0.75},
    ]
    out = loop.sum_micro_batch_stats(stats, sums=("loss", "clip_frac", "ratio_mean", "absent"))
    assert out == {"loss": 0.625, "clip_frac": 0.1875, "x_max": -0.5, "y_max": 2.0, "ratio_mean": 0.75}
    assert loop.sum_micro_batch_stats(stats, sums=()) == {"x_max": -0.5, "y_max": 2.0}
    for empty in (None, [], [{}]):
        assert loop.sum_micro_batch_stats(empty, sums=("loss",)) == {}


def test_mean_over_ranks_and_dp_mean_single_rank(world):
    assert loop.mean_over_ranks({"a": 1.5, "b": np.float32(-2.0)}) == {"a": 1.5, "b": -2.0}
    assert loop.mean_over_ranks({}) == {}
    assert loop.dp_mean(7, group=world.dp_group) == 7.0
    assert loop.dp_mean(2.5, group=world.dp_group) == 2.5


def test_mean_over_ranks_and_dp_mean_multi_rank_simulated(monkeypatch):
    """Three ranks' dicts (one empty: a non-last pipeline stage): each key's mean over the ranks that
    have it; ``dp_mean`` divides the all-reduced count by the DP group's size."""
    ranks = [{"a": 1.0, "b": 4.0}, {}, {"a": 3.0, "c_max": 5.0}]

    def gather(out, obj):
        assert obj == ranks[0]
        out[:] = ranks

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3 if group is None else 2)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    assert loop.mean_over_ranks(ranks[0]) == {"a": 2.0, "b": 4.0, "c_max": 5.0}

    def all_reduce(t, group=None):
        assert group == "dp" and t.dtype == torch.float64
        t += 5.0  # the other DP rank's count

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert loop.dp_mean(7, group="dp") == 6.0


# -- rollout: dealing calls to replicas, seeding, gathering --------------------------------------------


class FakeEngine:
    """Records its calls; row ``j`` of prompt ``p`` says ``"{p.uid}:{seed}:{j}"``, and each call
    returns its prompts' groups in reverse order (the gather must sort them)."""

    def __init__(self, *, num_replicas=1, replica_index=0, reports_samples=True):
        self.num_replicas, self.replica_index, self.reports_samples = num_replicas, replica_index, reports_samples
        self.calls: list[tuple[list[int], int]] = []

    def generate(self, prompts, sampling, *, seed):
        self.calls.append(([p.uid for p in prompts], seed))
        gids, ids, lps, texts = [], [], [], []
        for k in reversed(range(len(prompts))):
            for j in range(sampling.n):
                n = 1 + (prompts[k].uid + j) % 3
                gids.append(k)
                ids.append(torch.full((n,), prompts[k].uid))
                lps.append(-torch.rand(n))
                texts.append(f"{prompts[k].uid}:{seed}:{j}")
        return RolloutBatch(
            prompts=list(prompts),
            group_ids=torch.tensor(gids, dtype=torch.long),
            response_ids=ids,
            sampling_logprobs=lps,
            finish_reasons=["stop"] * len(gids),
            texts=texts,
        )


def ref_seed(seed, step, call):
    return int(np.random.SeedSequence([seed, step, call]).generate_state(1)[0])


PROMPTS = [SimpleNamespace(uid=100 + 7 * i) for i in range(7)]
SAMPLING = SamplingParams(n=3)
SEED, STEP, PER_CALL = 42, 5, 3  # calls: prompts [0, 1, 2], [3, 4, 5], [6]


def expected_rows(calls):
    """(group id, text) of the rows of ``calls``, in prompt order, samples in order."""
    return [
        (i, f"{PROMPTS[i].uid}:{ref_seed(SEED, STEP, c)}:{j}")
        for c in calls
        for i in range(3 * c, min(3 * c + 3, 7))
        for j in range(SAMPLING.n)
    ]


def check_batch(batch, calls):
    rows = expected_rows(calls)
    assert batch.prompts is PROMPTS
    assert batch.group_ids.tolist() == [g for g, _ in rows]
    assert batch.texts == [t for _, t in rows]
    for g, ids, lp, fr in zip(
        batch.group_ids.tolist(), batch.response_ids, batch.sampling_logprobs, batch.finish_reasons
    ):
        assert (ids == PROMPTS[g].uid).all() and lp.shape == ids.shape and fr == "stop"


def test_rollout_single_rank(world):
    engine = FakeEngine()
    batch = loop.rollout(engine, PROMPTS, SAMPLING, seed=SEED, step=STEP, prompts_per_call=PER_CALL)
    assert engine.calls == [
        ([p.uid for p in PROMPTS[s : s + 3]], ref_seed(SEED, STEP, c)) for c, s in enumerate((0, 3, 6))
    ]
    assert len({s for _, s in engine.calls}) == 3
    check_batch(batch, [0, 1, 2])
    assert len(batch) == 7 * SAMPLING.n


@pytest.mark.parametrize("replica", [0, 1])
def test_rollout_one_of_two_replicas_in_a_one_rank_world(world, replica):
    """A replica makes only its calls (round-robin); its rows keep their global group ids."""
    engine = FakeEngine(num_replicas=2, replica_index=replica)
    batch = loop.rollout(engine, PROMPTS, SAMPLING, seed=SEED, step=STEP, prompts_per_call=PER_CALL)
    mine = [0, 2] if replica == 0 else [1]
    assert [s for _, s in engine.calls] == [ref_seed(SEED, STEP, c) for c in mine]
    check_batch(batch, mine)


def simulated_rollout(monkeypatch, engines):
    """``rollout`` on each of ``len(engines)`` ranks; the all-gather hands every rank all ranks'
    objects (collected in a first pass: the fake engine is deterministic)."""
    world = len(engines)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    sent = [None] * world

    def collect(rank):
        def gather(out, obj):
            sent[rank] = obj
            out[:] = [obj if r == rank else [] for r in range(world)]

        return gather

    for rank, e in enumerate(engines):
        monkeypatch.setattr(dist, "all_gather_object", collect(rank))
        loop.rollout(e, PROMPTS, SAMPLING, seed=SEED, step=STEP, prompts_per_call=PER_CALL)

    def gather_all(out, obj):
        out[:] = sent

    monkeypatch.setattr(dist, "all_gather_object", gather_all)
    for e in engines:
        e.calls.clear()
    return [loop.rollout(e, PROMPTS, SAMPLING, seed=SEED, step=STEP, prompts_per_call=PER_CALL) for e in engines]


def test_rollout_two_replicas_deal_disjoint_calls_and_gather_all(monkeypatch):
    """Two ranks, one replica each: the calls are dealt round-robin, disjoint and complete, and both
    ranks get the whole batch in prompt order (rank 1's groups sorted in between rank 0's)."""
    engines = [FakeEngine(num_replicas=2, replica_index=r) for r in range(2)]
    batches = simulated_rollout(monkeypatch, engines)
    seeds = [{s for _, s in e.calls} for e in engines]
    assert seeds[0] == {ref_seed(SEED, STEP, 0), ref_seed(SEED, STEP, 2)}
    assert seeds[1] == {ref_seed(SEED, STEP, 1)}
    uids = [u for e in engines for us, _ in e.calls for u in us]
    assert sorted(uids) == [p.uid for p in PROMPTS]  # every prompt once
    for batch in batches:
        check_batch(batch, [0, 1, 2])
    # the same samples as one replica generating everything
    single = simulated_rollout(monkeypatch, [FakeEngine()])[0]
    assert single.texts == batches[0].texts and torch.equal(single.group_ids, batches[0].group_ids)


def test_rollout_one_replica_over_two_ranks_reports_once(monkeypatch):
    """A replica spanning two ranks (engine TP 2): both ranks make every call with the same seeds,
    only the reporting rank's rows are gathered (no duplicates)."""
    engines = [FakeEngine(reports_samples=r == 0) for r in range(2)]
    batches = simulated_rollout(monkeypatch, engines)
    assert engines[0].calls == engines[1].calls and len(engines[0].calls) == 3
    for batch in batches:
        check_batch(batch, [0, 1, 2])


# -- DP sharding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dp_size", [1, 2, 3, 6])
def test_dp_rows_cover_every_row_once_with_contiguous_groups(dp_size):
    num_groups, G = 6, 4
    perm = torch.randperm(num_groups * G, generator=torch.Generator().manual_seed(dp_size))
    group_ids = torch.arange(num_groups).repeat_interleave(G)[perm]
    per_rank = num_groups // dp_size
    seen = []
    for rank in range(dp_size):
        rows = loop.dp_rows(group_ids, num_groups, dp_rank=rank, dp_size=dp_size)
        assert rows == sorted(rows)
        assert rows == [i for i in range(len(group_ids)) if int(group_ids[i]) // per_rank == rank]
        assert {int(group_ids[i]) for i in rows} == set(range(rank * per_rank, (rank + 1) * per_rank))
        assert len(rows) == per_rank * G
        seen += rows
    assert sorted(seen) == list(range(num_groups * G))


def test_dp_shard():
    for n, size in ((8, 1), (8, 2), (8, 4), (9, 3), (0, 2)):
        shards = [dp_shard(n, dp_rank=r, dp_size=size) for r in range(size)]
        assert [x for s in shards for x in range(n)[s]] == list(range(n))
        assert {s.stop - s.start for s in shards} == {n // size}
    for n, size in ((7, 2), (8, 3), (1, 2)):
        with pytest.raises(ValueError):
            dp_shard(n, dp_rank=0, dp_size=size)
        with pytest.raises(ValueError):
            loop.dp_rows(torch.arange(n), n, dp_rank=0, dp_size=size)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_prompt_batcher_ranks_take_their_shard_of_the_global_batch(dp_size):
    """Over an epoch boundary: rank r's indices are ``dp_shard`` r of what one rank would take."""
    kw = dict(num_records=37, global_batch_size=8, seed=3)
    whole = PromptBatcher(dp_rank=0, dp_size=1, **kw)
    ranks = [PromptBatcher(dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]
    epochs = set()
    for _ in range(2 * whole.steps_per_epoch + 1):
        batch = whole.next_indices()
        parts = [b.next_indices() for b in ranks]
        assert len(set(batch.tolist())) == 8
        for r, part in enumerate(parts):
            np.testing.assert_array_equal(part, batch[dp_shard(8, dp_rank=r, dp_size=dp_size)])
        np.testing.assert_array_equal(np.concatenate(parts), batch)
        epochs.add(whole.epoch)
    assert epochs == {0, 1, 2}


# -- rewards stage ----------------------------------------------------------------------------------------


def fmt(answer):
    return f"<think>look</think> <answer>{answer}</answer>"


GROUP_IDS = [0, 1, 0, 2, 1, 0, 2, 1, 2]
TEXTS = [
    fmt("red"),  # g0 red:   format, correct
    fmt("red"),  # g1 blue:  format, wrong
    "red",  # g0 red:   malformed (no tags), right word
    fmt("Green"),  # g2 green: format, correct (case-folded)
    "<think>x</think> <answer>blue",  # g1 blue:  malformed (unclosed answer), right word
    fmt("blue"),  # g0 red:   format, wrong
    fmt("green"),  # g2
    fmt("blue"),  # g1 blue:  format, correct
    fmt("green"),  # g2 (all of g2 equal: zero advantages)
]
LABELS = ["red", "blue", "green"]


def scored(cfg):
    n = len(TEXTS)
    batch = RolloutBatch(
        prompts=[SimpleNamespace(uid=i) for i in range(3)],
        group_ids=torch.tensor(GROUP_IDS),
        response_ids=[torch.arange(i + 1) for i in range(n)],
        sampling_logprobs=[-torch.rand(i + 1) for i in range(n)],
        finish_reasons=["stop"] * n,
        texts=TEXTS,
    )
    terms, options = builders.reward_terms(cfg.reward)
    return score_rollout(
        batch,
        [GroundTruth(label=x) for x in LABELS],
        terms=terms,
        options=options,
        advantage_estimator=cfg.algorithm.advantage_estimator,
    )


def grpo_by_hand(rewards, eps=1e-6):
    out = [0.0] * len(rewards)
    for g in set(GROUP_IDS):
        rows = [i for i, x in enumerate(GROUP_IDS) if x == g]
        vals = [rewards[i] for i in rows]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
        for i in rows:
            out[i] = 0.0 if std == 0 else (rewards[i] - mean) / (std + eps)
    return out


def test_score_rollout_default_rewards_and_grpo_advantages():
    s = scored(load())
    fmt_col = [1, 1, 0, 1, 0, 1, 1, 1, 1]
    acc_col = [1, 0, 0, 1, 0, 0, 1, 1, 1]
    assert s.reward_columns["format"].tolist() == fmt_col
    assert s.reward_columns["accuracy"].tolist() == acc_col
    total = [2.0, 1.0, 0.0, 2.0, 0.0, 1.0, 2.0, 2.0, 2.0]
    assert s.rewards.tolist() == total
    # g0 (rows 0, 2, 5): 2, 0, 1 -> mean 1, std 1; g1 (rows 1, 4, 7): 1, 0, 2 -> same; g2: all 2 -> 0
    e = 1 / (1 + 1e-6)
    hand = [e, 0.0, -e, 0.0, -e, 0.0, 0.0, e, 0.0]
    assert grpo_by_hand(total) == pytest.approx(hand, abs=1e-12)
    assert s.advantages.dtype == torch.float32
    assert s.advantages.tolist() == pytest.approx(hand, abs=1e-6)
    assert s.parse_failures["format"] == {"bad_format": 2}
    assert s.parse_failures["accuracy"].get("no_answer_tag") == 1
    assert s.parse_failures["accuracy"].get("unclosed_answer_tag") == 1


def test_score_rollout_config_weights_mode_and_estimator_reach_the_rewards():
    """reward.terms weights, reward.classification_mode (the published substring rule scores the
    malformed right words) and algorithm.advantage_estimator (drgrpo: r - group mean)."""
    cfg = load(
        "reward.terms=[{name: format, weight: 0.5}, {name: accuracy, weight: 2.0}]",
        "reward.classification_mode=visual_rft_compat",
        "algorithm.advantage_estimator=drgrpo",
    )
    s = scored(cfg)
    acc_col = [1, 0, 1, 1, 1, 0, 1, 1, 1]
    assert s.reward_columns["accuracy"].tolist() == acc_col
    total = [2.5, 0.5, 2.0, 2.5, 2.0, 0.5, 2.5, 2.5, 2.5]
    assert s.rewards.tolist() == total
    # g0: 2.5, 2.0, 0.5 -> mean 5/3; g1: 0.5, 2.0, 2.5 -> mean 5/3; g2: all 2.5
    hand = [2.5 - 5 / 3, 0.5 - 5 / 3, 2.0 - 5 / 3, 0.0, 2.0 - 5 / 3, 0.5 - 5 / 3, 0.0, 2.5 - 5 / 3, 0.0]
    assert s.advantages.tolist() == pytest.approx(hand, abs=1e-6)
    s_grpo = scored(
        load(
            "reward.terms=[{name: format, weight: 0.5}, {name: accuracy, weight: 2.0}]",
            "reward.classification_mode=visual_rft_compat",
        )
    )
    assert s_grpo.advantages.tolist() == pytest.approx(grpo_by_hand(total), abs=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_grpo_loss_fn_is_invariant_to_micro_batch_padding(mode):
    """A micro-batch is right-padded to its widest row (prompt + response): masked columns added by
    a wider neighbour must change neither the loss, nor the gradient, nor a stat, in every mode."""
    cfg = load(f"algorithm.loss_agg_mode={mode}", "algorithm.kl_coef=0.1", "algorithm.entropy_coef=0.02")
    mb, lp, ent = fake_micro_batch(31)
    pad = lambda t, v=0.0: torch.cat([t, torch.full((B, 4), v, dtype=t.dtype)], dim=1)  # noqa: E731
    wide = SimpleNamespace(**vars(mb))
    for k in ("response_mask", "old_logprobs", "ref_logprobs", "sampling_logprobs"):
        setattr(wide, k, pad(getattr(mb, k)))
    norm = float(mb.num_tokens) if mode == "token-mean" else float(B)
    narrow_out = run_loss_fn(cfg, mb, lp, ent, normalizer=norm, total_tokens=mb.num_tokens)
    wide_out = run_loss_fn(cfg, wide, pad(lp, -0.3), pad(ent, 0.7), normalizer=norm, total_tokens=mb.num_tokens)
    assert float(wide_out[0]) == pytest.approx(float(narrow_out[0]), rel=1e-12)
    torch.testing.assert_close(wide_out[1][:, :T], narrow_out[1])
    assert (wide_out[1][:, T:] == 0).all()
    assert_stats(wide_out[3], narrow_out[3])
