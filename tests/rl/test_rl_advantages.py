"""Advantage estimators vs. a float64 per-group loop reference (statistics module, not torch)."""

import math
import statistics

import pytest
import torch

from megatron_vrft.rl import compute_advantages, get_advantage_estimator
from megatron_vrft.rl.advantages import ADVANTAGE_ESTIMATORS

EPS = 1e-6


def _random_groups(gen: torch.Generator, num_groups: int, max_size: int = 6):
    """Shuffled, non-contiguous integer labels with random group sizes (1 .. max_size)."""
    sizes = torch.randint(1, max_size + 1, (num_groups,), generator=gen).tolist()
    labels = torch.randperm(1000, generator=gen)[:num_groups].tolist()
    ids = [label for label, size in zip(labels, sizes) for _ in range(size)]
    perm = torch.randperm(len(ids), generator=gen).tolist()
    return torch.tensor([ids[i] for i in perm], dtype=torch.long)


def _reference(name: str, rewards: list[float], ids: list[int]) -> list[float]:
    groups: dict[int, list[float]] = {}
    for r, g in zip(rewards, ids):
        groups.setdefault(g, []).append(r)
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out = []
    for r, g in zip(rewards, ids):
        members = groups[g]
        if len(set(members)) == 1:
            out.append(0.0)
            continue
        mean = math.fsum(members) / len(members)
        if name == "grpo":
            out.append((r - mean) / (statistics.stdev(members) + EPS))
        elif name == "drgrpo":
            out.append(r - mean)
        elif name == "grpo_batch_std":
            out.append((r - mean) / (batch_std + EPS))
        else:
            raise AssertionError(name)
    return out


NAMES = ["grpo", "drgrpo", "grpo_batch_std"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(4))
def test_flat_group_ids_match_loop_reference(name, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = _random_groups(gen, num_groups=7)
    rewards = torch.randn(len(ids), generator=gen, dtype=torch.float64)
    # Make some groups identical (and some rewards binary) to exercise the zero-spread path.
    first = ids[0].item()
    rewards[ids == first] = 0.1
    got = compute_advantages(name, rewards, ids, eps=EPS)
    want = torch.tensor(_reference(name, rewards.tolist(), ids.tolist()), dtype=torch.float64)
    assert got.shape == rewards.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert torch.all(got[ids == first] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_grouped_2d_input_equals_flat_input(name):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (5, 4), generator=gen).to(torch.float64) * 0.5
    rewards[1] += torch.randn(4, generator=gen, dtype=torch.float64)
    ids = torch.arange(5).repeat_interleave(4)
    got = get_advantage_estimator(name)(rewards, eps=EPS)
    want = torch.tensor(_reference(name, rewards.reshape(-1).tolist(), ids.tolist()), dtype=torch.float64)
    assert got.shape == (5, 4)
    torch.testing.assert_close(got.reshape(-1), want.to(got.dtype), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [0.1, 1.0, -3.7, 1e6])
def test_identical_rewards_give_exact_zero(name, value):
    rewards = torch.full((4, 3), value, dtype=torch.float64)
    adv = compute_advantages(name, rewards)
    assert torch.all(adv == 0) and not torch.isnan(adv).any()


@pytest.mark.parametrize("name", NAMES)
def test_singleton_groups_are_zero_without_nan(name):
    rewards = torch.tensor([0.3, -1.2, 5.0], dtype=torch.float64, requires_grad=True)
    adv = compute_advantages(name, rewards, torch.tensor([4, 9, 2]))
    assert torch.all(adv == 0)
    adv.sum().backward()
    assert torch.isfinite(rewards.grad).all()
    adv2 = compute_advantages(name, torch.randn(6, 1, dtype=torch.float64))  # G = 1, 2-D form
    assert torch.all(adv2 == 0)


def test_unbiased_std_is_used():
    # Two rewards 0 and 1: unbiased std = sqrt(0.5), biased std = 0.5.
    adv = compute_advantages("grpo", torch.tensor([[0.0, 1.0]], dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[-0.5, 0.5]], dtype=torch.float64) / math.sqrt(0.5))


def test_float32_and_integer_rewards():
    rewards = torch.tensor([[1, 0, 0, 1]])
    adv = compute_advantages("grpo", rewards)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0, -1.0, 1.0]]) * 0.5 / (math.sqrt(1 / 3) + 1e-6))


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    gen = torch.Generator().manual_seed(11)
    ids = _random_groups(gen, num_groups=5)
    rewards = torch.randn(len(ids), generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: compute_advantages(name, r, ids), (rewards,))
    r2 = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: compute_advantages(name, r), (r2,))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_groups, G"):
        compute_advantages("grpo", torch.randn(6))
    with pytest.raises(ValueError, match="integer"):
        compute_advantages("grpo", torch.randn(4), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        compute_advantages("grpo", torch.randn(4), torch.tensor([0, 0, 1]))
    with pytest.raises(KeyError, match="registered"):
        compute_advantages("nope", torch.randn(2, 2))
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGE_ESTIMATORS.register("grpo")(lambda r, g=None, *, eps=0: r)
