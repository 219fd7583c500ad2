"""Advantage estimators against plain float64 references written with Python loops."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entroclip.advantages import ADVANTAGE_KINDS, gae, group_advantages, masked_whiten


def reference_group(rewards: list[float], group_size: int, kind: str, eps: float) -> list[float]:
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        for i, r in enumerate(group):
            if kind == "grpo":
                out.append((r - mean) / (statistics.stdev(group) + eps))
            elif kind == "drgrpo":
                out.append(r - mean)
            else:
                others = group[:i] + group[i + 1 :]
                out.append(r - sum(others) / len(others))
    return out


def reference_gae(rewards, values, mask, gamma, lam):
    """Per row, backwards over valid tokens only; masked positions get 0."""
    adv = [[0.0] * len(row) for row in rewards]
    ret = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        next_value, last = 0.0, 0.0
        for t in reversed(range(len(rewards[b]))):
            if not mask[b][t]:
                continue
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last = delta + gamma * lam * last
            next_value = values[b][t]
            adv[b][t] = last
            ret[b][t] = last + values[b][t]
    return adv, ret


@pytest.mark.parametrize("kind", ADVANTAGE_KINDS)
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_group_advantages_match_reference(kind, group_size, gen):
    prompts = 5
    continuous = torch.randn(prompts * group_size, generator=gen, dtype=torch.float64)
    binary = (torch.rand(prompts * group_size, generator=gen) < 0.5).double()
    for rewards in (continuous, binary):
        got = group_advantages(rewards, group_size, kind)
        assert got.dtype == torch.float32 and got.shape == rewards.shape
        want = reference_group(rewards.tolist(), group_size, kind, 1e-6)
        assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_group_advantages_constant_group_is_zero_and_drgrpo_allows_size_one():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    for kind in ADVANTAGE_KINDS:
        assert group_advantages(rewards, 3, kind).tolist() == [0.0] * 6
    assert group_advantages(torch.tensor([0.3, 1.0]), 1, "drgrpo").tolist() == [0.0, 0.0]


@given(
    rewards=st.lists(st.floats(-10, 10, allow_nan=False), min_size=4, max_size=4),
    shift=st.floats(-5, 5, allow_nan=False),
)
@settings(max_examples=50, deadline=None)
def test_group_advantages_invariants(rewards, shift):
    r = torch.tensor(rewards, dtype=torch.float64)
    dr = group_advantages(r, 4, "drgrpo")
    # RLOO is Dr.GRPO scaled by G / (G - 1); every estimator is invariant to a shift of the rewards.
    assert group_advantages(r, 4, "rloo").tolist() == pytest.approx((dr * 4 / 3).tolist(), abs=1e-4)
    for kind in ADVANTAGE_KINDS:
        a, b = group_advantages(r, 4, kind), group_advantages(r + shift, 4, kind)
        assert a.tolist() == pytest.approx(b.tolist(), abs=1e-3)
        assert abs(float(a.double().sum())) < 1e-3


@pytest.mark.parametrize(
    ("rewards", "group_size", "kind", "message"),
    [
        (torch.zeros(7), 2, "grpo", "not a multiple of group_size=2"),
        (torch.zeros(4), 1, "grpo", "group_size must be an int >= 2"),
        (torch.zeros(4), 1, "rloo", "group_size must be an int >= 2"),
        (torch.zeros(4), 0, "drgrpo", "group_size must be an int >= 1"),
        (torch.zeros(4), 2, "ppo", "kind must be one of"),
        (torch.zeros(2, 2), 2, "grpo", "must be 1-D"),
    ],
)
def test_group_advantages_errors(rewards, group_size, kind, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, group_size, kind)


def random_padded_batch(gen, batch=6, length=9):
    """Right padding of random length plus interior holes; one row fully masked."""
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) < 0.8
    for b in range(batch):
        mask[b, torch.randint(1, length + 1, (1,), generator=gen).item() :] = False
    mask[0] = False
    values[~mask] = float("nan")  # garbage on padding must not leak into valid tokens
    return rewards, values, mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_reference_with_padding(gamma, lam, gen):
    rewards, values, mask = random_padded_batch(gen)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = reference_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert adv.tolist() == [pytest.approx(row, abs=1e-10) for row in want_adv]
    assert ret.tolist() == [pytest.approx(row, abs=1e-10) for row in want_ret]


def test_gae_float32_and_terminal_reward(gen):
    rewards, values, mask = random_padded_batch(gen)
    adv32, ret32 = gae(rewards.float(), values.float(), mask.int(), 0.99, 0.95)
    adv64, _ = gae(rewards, values, mask, 0.99, 0.95)
    assert adv32.dtype == ret32.dtype == torch.float32
    assert torch.allclose(adv32.double(), adv64, atol=1e-5)
    # gamma = lam = 1, zero values, reward only at the last valid token: every valid token gets it.
    mask = torch.tensor([[1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 0.0]])
    adv, ret = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    assert adv.tolist() == [[2.0, 2.0, 0.0, 2.0, 0.0, 0.0]] == ret.tolist()


def test_gae_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="share one"):
        gae(x, torch.zeros(2, 4), x.bool(), 1.0, 1.0)
    with pytest.raises(ValueError, match="lam must be in"):
        gae(x, x, x.bool(), 1.0, 1.5)


def test_masked_whiten_matches_reference(gen):
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64) * 3 + 1
    mask = torch.rand(4, 7, generator=gen) < 0.6
    got = masked_whiten(x, mask)
    valid = [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]
    mean, std = statistics.fmean(valid), statistics.stdev(valid)
    for g, v, m in zip(got.flatten().tolist(), x.flatten().tolist(), mask.flatten().tolist(), strict=True):
        want = (v - mean) / math.sqrt(std**2 + 1e-8) if m else 0.0
        assert g == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2 valid"):
        masked_whiten(x, torch.zeros_like(mask))
