"""Entropy controllers on synthetic plants, and the Clip-Cov / KL-Cov selection rules on hand-made batches."""

import math
from itertools import pairwise

import pytest
import torch

from entroclip.config import ControlConfig, LossConfig, parse_config
from entroclip.control import (
    ClipLowController,
    EntropyBonusController,
    make_controller,
)
from entroclip.covariance import centred_covariance, clip_cov_select, kl_cov_select

LOSS = LossConfig(eps_low=0.2, eps_high=0.2)


def clip_low(**kw) -> ClipLowController:
    return ClipLowController(ControlConfig(kind="clip_low", **kw), LOSS)


def run_plant(controller, steps=300, h0=1.0, balance=0.2, gain=0.5, noise=0.01, seed=0):
    """A first-order plant: entropy rises when eps_low is below its balance point, falls above it."""
    gen = torch.Generator().manual_seed(seed)
    h, history, actions = h0, [], []
    for step in range(1, steps + 1):
        action = controller.act(step, h)
        h += gain * (balance - action.eps_low) + noise * torch.randn((), generator=gen).item()
        history.append(h)
        actions.append(action)
    return history, actions


def test_clip_low_holds_the_target_on_a_plant():
    ctl = clip_low(target=0.8, kp=0.5, ki=0.05)
    history, actions = run_plant(ctl, balance=0.25)  # the static eps_low=0.2 would let entropy rise
    tail = history[-100:]
    assert abs(sum(tail) / len(tail) - 0.8) < 0.02
    assert max(abs(h - 0.8) for h in tail) < 0.08
    # in steady state eps_low sits at the plant's balance point, found by the integral term
    assert sum(a.eps_low for a in actions[-100:]) / 100 == pytest.approx(0.25, abs=0.01)
    assert all(a.eps_high == 0.2 for a in actions)


def test_clip_low_lowers_eps_low_when_entropy_is_too_low():
    ctl = clip_low(target=1.0)
    assert ctl.act(1, 0.5).eps_low < 0.2
    ctl = clip_low(target=1.0)
    assert ctl.act(1, 1.5).eps_low > 0.2


def test_bounds_and_anti_windup():
    ctl = clip_low(target=1.0, eps_low_min=0.05, eps_low_max=0.3, kp=1.0, ki=0.5)
    for step in range(1, 101):  # entropy far too low for a long time: saturated at the lower bound
        assert 0.05 <= ctl.act(step, 0.1).eps_low <= 0.3
    assert ctl.current == 0.05
    assert abs(ctl.integral) < 2.0  # not 100 * 0.9: the integral stopped while saturated
    # when the error changes sign the output leaves the bound at once
    assert ctl.act(101, 1.5).eps_low > 0.05


def test_without_anti_windup_recovery_would_be_slow():
    """The conditional integration matters: the same PI law with free integration stays saturated."""
    ctl = clip_low(target=1.0, eps_low_min=0.05, eps_low_max=0.3, kp=1.0, ki=0.5)
    for step in range(1, 101):
        ctl.act(step, 0.1)
    windup = 100 * 0.9  # what a free integrator would have accumulated
    free_output = 0.2 - 1.0 * (-0.5) - 0.5 * (windup - 0.5)
    assert free_output < 0.05  # clamped at the bound: no recovery on the first step


def test_target_ratio_release_and_state_round_trip():
    ctl = clip_low(target_ratio=0.5, release_step=3, smoothing=0.5)
    ctl.act(1, 2.0)
    assert ctl.target.value == 1.0  # half the first entropy
    ctl.act(2, 0.6)
    state = ctl.state_dict()
    twin = clip_low(target_ratio=0.5, release_step=3, smoothing=0.5)
    twin.load_state_dict(state)
    for step, h in [(3, 0.7), (4, 0.4), (5, 0.9)]:
        assert twin.act(step, h) == ctl.act(step, h)
    assert ctl.act(4, 0.1).eps_low == 0.2  # released: back to the reference bound


def test_entropy_bonus_adapts_and_is_capped():
    cfg = ControlConfig(kind="entropy_bonus", target=1.0, coef_init=1e-3, coef_max=0.01, coef_lr=0.5)
    ctl = EntropyBonusController(cfg, LOSS)
    coefs = [ctl.act(step, 0.5).entropy_coef for step in range(1, 30)]
    assert coefs[0] > 1e-3 and all(b >= a for a, b in pairwise(coefs))
    assert max(coefs) == pytest.approx(0.01)
    down = [ctl.act(step, 2.0).entropy_coef for step in range(30, 40)]
    assert down[-1] < down[0] < 0.01  # no windup above the cap: it falls at once
    assert ctl.act(41, 1.0).eps_low == 0.2


def test_entropy_bonus_has_a_floor_without_windup():
    cfg = ControlConfig(kind="entropy_bonus", target=1.0, coef_init=1e-3, coef_min=1e-3, coef_lr=0.5)
    ctl = EntropyBonusController(cfg, LOSS)
    assert [ctl.act(step, 2.0).entropy_coef for step in range(1, 20)] == [pytest.approx(1e-3)] * 19
    # the first step below the target raises the coefficient at once, from the floor
    assert ctl.act(20, 0.5).entropy_coef == pytest.approx(1e-3 * math.exp(0.5 * 0.5))
    with pytest.raises(ValueError, match=r"coef_init \(0.001\) must be in \[control.coef_min"):
        ControlConfig(kind="entropy_bonus", target=1.0, coef_init=1e-3, coef_min=1e-2)


def test_entropy_bonus_on_a_plant():
    """A self-regulating plant: entropy relaxes towards 0.5 + 10 * coef (0.8 at coef = 0.03)."""
    cfg = ControlConfig(kind="entropy_bonus", target=0.8, coef_init=1e-3, coef_max=1.0, coef_lr=0.3)
    ctl = EntropyBonusController(cfg, LOSS)
    gen = torch.Generator().manual_seed(0)
    h, tail = 1.0, []
    for step in range(1, 400):
        coef = ctl.act(step, h).entropy_coef
        h += 0.2 * (0.5 + 10 * coef - h) + 0.005 * torch.randn((), generator=gen).item()
        if step > 300:
            tail.append(h)
    assert abs(sum(tail) / len(tail) - 0.8) < 0.02
    assert ctl.coef == pytest.approx(0.03, rel=0.2)


def test_config_rules():
    with pytest.raises(ValueError, match="exactly one of control.target"):
        ControlConfig(kind="clip_low")
    with pytest.raises(ValueError, match="exactly one of control.target"):
        ControlConfig(kind="entropy_bonus", target=1.0, target_ratio=0.5)
    with pytest.raises(ValueError, match="eps_low_min"):
        ControlConfig(kind="clip_low", target=1.0, eps_low_min=0.5, eps_low_max=0.1)
    with pytest.raises(ValueError, match="optim.minibatches"):
        parse_config({"control": {"kind": "kl_cov"}, "optim": {"epochs": 1, "minibatches": 1}})
    assert make_controller(ControlConfig(kind="kl_cov"), LOSS).act(1, 1.0).eps_low is None
    assert make_controller(ControlConfig(), LOSS).act(1, 1.0).eps_low == 0.2


def hand_batch():
    adv = torch.tensor([[2.0, 2.0, -1.0, 0.0], [1.0, -2.0, -2.0, 3.0]])
    logp = torch.tensor([[-0.1, -3.0, -0.5, -1.0], [-2.0, -0.2, -4.0, -0.3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    return adv, logp, mask


def reference_covariance(adv, logp, mask):
    a = [x for x, m in zip(adv.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]
    lp = [x for x, m in zip(logp.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]
    ma, ml = sum(a) / len(a), sum(lp) / len(lp)
    return [(x - ma) * (y - ml) for x, y in zip(a, lp, strict=True)]


def test_centred_covariance_by_hand():
    adv, logp, mask = hand_batch()
    cov = centred_covariance(adv, logp, mask)
    assert cov[mask].tolist() == pytest.approx(reference_covariance(adv, logp, mask))
    assert math.isinf(cov[0, 3]) and cov[0, 3] < 0


def test_kl_cov_picks_the_top_covariance_tokens():
    adv, logp, mask = hand_batch()
    ref = reference_covariance(adv, logp, mask)
    positions = mask.flatten().nonzero().squeeze(-1).tolist()
    ranked = [positions[i] for i in sorted(range(len(ref)), key=lambda i: -ref[i])]
    for fraction, k in [(1e-6, 1), (0.3, 2), (0.5, 3)]:  # max(1, floor(fraction * 7 valid tokens))
        chosen = kl_cov_select(adv, logp, mask, fraction)
        assert sorted(chosen.flatten().nonzero().squeeze(-1).tolist()) == sorted(ranked[:k])


def test_clip_cov_draws_only_eligible_unclipped_tokens():
    adv, logp, mask = hand_batch()
    cov = reference_covariance(adv, logp, mask)
    positions = mask.flatten().nonzero().squeeze(-1).tolist()
    in_band = {p for p, c in zip(positions, cov, strict=True) if 0.5 < c < 7.0}
    clipped = torch.zeros_like(mask)
    first = sorted(in_band)[0]
    clipped.view(-1)[first] = True
    eligible = in_band - {first}
    assert len(eligible) >= 2
    seen = set()
    for seed in range(20):
        chosen = clip_cov_select(
            adv, logp, mask, clipped, 1e-6, 0.5, 7.0, torch.Generator().manual_seed(seed)
        )
        picked = chosen.flatten().nonzero().squeeze(-1).tolist()
        assert len(picked) == 1 and picked[0] in eligible
        seen.add(picked[0])
    assert seen == eligible  # a random draw among all eligible tokens
    everything = clip_cov_select(adv, logp, mask, clipped, 1.0, 0.5, 7.0, torch.Generator().manual_seed(0))
    assert set(everything.flatten().nonzero().squeeze(-1).tolist()) == eligible
    none = clip_cov_select(adv, logp, mask, clipped, 1.0, 100.0, 200.0, torch.Generator().manual_seed(0))
    assert not none.any()


def clip_controller(**kw):
    """The clip controller with the paper's clip-high direction (tight to lower entropy, off to raise it)."""
    from entroclip.control import ClipController

    kw = {"eps_high_down": 0.05, "eps_high_up": "off"} | kw
    return ClipController(ControlConfig(kind="clip", **kw), LOSS)


def test_clip_controller_schedule_runs_through_its_three_points():
    ctl = clip_controller(target=1.0, eps_low_min=0.05, eps_low_max=0.4)
    assert ctl.bounds(-1.0) == pytest.approx((0.4, 0.05))  # loose clip-low, tight clip-high: entropy down
    assert ctl.bounds(0.0) == pytest.approx((0.2, 0.2))  # the config's bounds
    assert ctl.bounds(0.5) == pytest.approx((0.125, 0.6))
    assert ctl.bounds(1.0) == (0.05, None)  # tightest clip-low, clip-high off: entropy up
    lows, highs = zip(*(ctl.bounds(u) for u in (-1.0, -0.5, 0.0, 0.5, 0.99)), strict=True)
    assert list(lows) == sorted(lows, reverse=True) and list(highs) == sorted(highs)  # monotone in u


def test_clip_controller_sign_and_anti_windup():
    """Too little entropy moves the output up (tighter clip-low, looser clip-high); while the output is
    saturated in the error's direction the integral does not grow, so it comes off the bound at once."""
    ctl = clip_controller(target=1.0, kp=1.0, ki=0.5)
    action = ctl.act(1, 0.8)  # 20% too low
    assert ctl.pi.output > 0 and action.eps_low < 0.2 and action.eps_high > 0.2
    for step in range(2, 30):
        ctl.act(step, 0.2)  # far too low: saturates at +1
    assert ctl.pi.output == 1.0 and ctl.metrics()["control/saturated"] == 1.0
    held = ctl.pi.integral
    ctl.act(30, 0.2)
    assert ctl.pi.integral == held  # no windup while saturated
    action = ctl.act(31, 1.5)  # far too high: leaves the bound at once
    assert ctl.pi.output < 1.0 and action.eps_high is not None
    too_high = clip_controller(target=1.0)
    action = too_high.act(1, 1.3)
    assert too_high.pi.output < 0 and action.eps_low > 0.2 and action.eps_high < 0.2


def test_clip_controller_leaves_clip_high_alone_by_default():
    """The default schedule moves eps_low only; a numeric end moves eps_high linearly towards it."""
    ctl = clip_controller(target=1.0, eps_high_down=None, eps_high_up=None)
    assert [ctl.bounds(u)[1] for u in (-1.0, -0.3, 0.0, 0.7, 1.0)] == [0.2] * 5
    ctl = clip_controller(target=1.0, eps_high_down=0.3, eps_high_up=0.1)
    assert ctl.bounds(-1.0)[1] == pytest.approx(0.3) and ctl.bounds(0.5)[1] == pytest.approx(0.15)
    assert ctl.bounds(2.5) == ctl.bounds(1.0)  # beyond the range: the end's bounds


def test_clip_controller_state_round_trips():
    a, b = clip_controller(target_ratio=0.8, smoothing=0.5), clip_controller(target_ratio=0.8, smoothing=0.5)
    for step, h in enumerate([1.0, 0.9, 0.7, 0.75], start=1):
        a.act(step, h)
    b.load_state_dict(a.state_dict())
    assert a.act(5, 0.6) == b.act(5, 0.6) and a.metrics() == b.metrics()
