"""The controllers beyond the clip bounds: EntroPIC's token weights, the cascade (clip, then token weights,
then the bonus), the PI rule of the entropy bonus, and TRL 1.16's adaptive entropy rule against TRL's code."""

import pytest
import torch
from peers import TRLStandIn, trl_loss

from entroclip.config import TARGET_KINDS, ControlConfig, LossConfig
from entroclip.control import (
    AdaptiveEntropyController,
    CascadeController,
    EntropyBonusController,
    PIOutput,
    TokenWeightController,
    make_controller,
)

LOSS = LossConfig(eps_low=0.2, eps_high=0.2)


def control(kind, **kw):
    return make_controller(ControlConfig(kind=kind, **kw), LOSS)


def test_pi_output_saturates_exactly_and_leaves_at_once():
    pi = PIOutput(kp=1.0, ki=0.5, low=-2.0, high=3.0)
    for _ in range(50):
        pi.step(0.5)
    assert pi.output == 3.0 and pi.saturated
    held = pi.integral
    pi.step(0.5)
    assert pi.integral == held  # no windup while saturated in the error's direction
    pi.step(-0.1)
    assert pi.output < 3.0  # the first error of the other sign brings it off the bound


def test_token_weight_sign_and_bounds():
    too_low = control("token_weight", target=1.0, weight_max=0.5)
    assert too_low.act(1, 0.8).token_weight < 0  # too little entropy: hold the likely tokens back
    too_high = control("token_weight", target=1.0, weight_max=0.5)
    action = too_high.act(1, 1.3)
    assert action.token_weight > 0 and (action.eps_low, action.eps_high) == (0.2, 0.2)  # clip untouched
    for step in range(2, 40):
        action = too_low.act(step, 0.1)
    assert action.token_weight == -0.5 and too_low.metrics()["control/saturated"] == 1.0
    held = too_low.pi.integral
    too_low.act(40, 0.1)
    assert too_low.pi.integral == held
    assert too_low.act(41, 1.5).token_weight > -0.5


def scripted_cascade(**kw):
    """A cascade driven by far too little entropy for 40 steps, then far too much for 60."""
    ctl = control(
        "cascade",
        target=1.0,
        kp=0.5,
        ki=0.2,
        weight_max=0.8,
        coef_min=1e-4,
        coef_max=1e-2,
        eps_high_down=0.05,
        eps_high_up="off",
        **kw,
    )
    trace = []
    for step in range(1, 101):
        action = ctl.act(step, 0.5 if step <= 40 else 1.5)
        trace.append((ctl.pi.output, ctl.metrics()["control/active"], action))
    return trace


def test_cascade_hands_over_in_order_and_back():
    trace = scripted_cascade(sharpen=True)
    actives = [active for _, active, _ in trace]
    rising, falling = actives[:40], actives[40:]
    assert rising == sorted(rising) and set(rising) == {0.0, 1.0, 2.0}  # clip, then weights, then bonus
    runs = [a for i, a in enumerate(falling) if i == 0 or a != falling[i - 1]]
    # back in reverse order (bonus, weights, clip), then on to the weights' entropy-lowering side
    assert runs == [2.0, 1.0, 0.0, 1.0]
    for u, active, action in trace:
        if active == 0.0:  # the clip alone
            assert action.token_weight == 0.0 and action.entropy_coef == 0.0
        if u > 1.0:  # the clip saturated at its entropy-raising end while the next actuators act
            assert (action.eps_low, action.eps_high) == (0.02, None)
        if active == 1.0 and u > 1.0:
            assert -0.8 <= action.token_weight < 0.0 and action.entropy_coef == 0.0
        if active == 2.0:
            assert action.token_weight == -0.8 and 1e-4 <= action.entropy_coef <= 1e-2
    assert trace[39][0] == 3.0 and trace[39][2].entropy_coef == pytest.approx(1e-2)  # saturated at the top
    lowest = trace[-1][2]
    assert trace[-1][0] < -1.0 and lowest.token_weight > 0.0  # too much entropy: the weights sharpen
    assert lowest.eps_low == 0.4 and lowest.eps_high == pytest.approx(0.05)  # with the clip at its other end


def test_cascade_without_sharpen_stops_at_the_clips_low_end():
    trace = scripted_cascade()
    assert min(u for u, _, _ in trace) == -1.0
    lowest = trace[-1][2]
    assert lowest.token_weight == 0.0 and lowest.eps_low == 0.4  # the clip alone at its entropy-lowering end


def test_cascade_without_bonus_stops_at_the_token_weights():
    trace = scripted_cascade(bonus=False)
    assert max(u for u, _, _ in trace) == 2.0
    assert all(action.entropy_coef == 0.0 for _, _, action in trace)


def test_pi_bonus_sign_cap_and_anti_windup():
    ctl = control("entropy_bonus", target=1.0, coef_rule="pi", kp=1.0, ki=0.1, coef_max=0.05)
    assert ctl.act(1, 0.8).entropy_coef > 0
    high = control("entropy_bonus", target=1.0, coef_rule="pi")
    assert high.act(1, 1.2).entropy_coef == 0.0  # the bonus cannot go below 0
    for step in range(2, 80):
        coef = ctl.act(step, 0.1).entropy_coef
    assert coef == pytest.approx(0.05)
    held = ctl.pi.integral
    ctl.act(80, 0.1)
    assert ctl.pi.integral == held
    assert ctl.act(81, 1.5).entropy_coef < 0.05


def integrating_plant(controller, steps=150, h0=1.0, drift=0.02, gain=2.0):
    """Entropy falls by ``drift`` per step and the bonus raises it at ``gain`` per unit coefficient, so
    holding needs c = drift / gain = 0.01: the plant integrates the coefficient."""
    h, history = h0, []
    for step in range(1, steps + 1):
        c = controller.act(step, h).entropy_coef
        h += gain * c - drift
        history.append(h)
    return history


def test_pi_bonus_holds_an_integrating_plant_with_less_overshoot_than_the_sac_rule():
    target = 0.8
    pi = integrating_plant(
        control("entropy_bonus", target=target, coef_rule="pi", kp=2.0, ki=0.1, coef_max=0.1)
    )
    sac = integrating_plant(control("entropy_bonus", target=target, coef_min=1e-5, coef_max=0.1))
    pi_error = max(abs(h - target) / target for h in pi[100:])
    assert pi_error < 0.02
    overshoot = lambda history: max(history[20:]) - target  # noqa: E731  (above the target after falling to it)
    assert overshoot(pi) < 0.5 * overshoot(sac)


@pytest.mark.parametrize("target", [0.2, 0.5])
def test_adaptive_entropy_equals_trls_rule(target):
    """The applied coefficient and the coefficient's state over a scripted entropy sequence equal TRL's
    ``_compute_loss`` (one optimizer step per rollout), including the first step's gate and the bounds."""
    pytest.importorskip("trl.trainer.grpo_trainer")
    entropies = [0.6, 0.4, 0.3, 0.1, 0.1, 0.15, 0.45, 0.7, 0.9, 0.25, 0.1, 0.05, 0.6, 0.6, 0.6]
    settings = {"entropy_target": target, "entropy_coef_delta": 0.02, "entropy_coef_min": 0.0}
    settings |= {"entropy_coef_max": 0.05, "entropy_coef": 0.01}
    gen = torch.Generator().manual_seed(3)
    rows, length = 4, 5
    mask = torch.ones(rows, length, dtype=torch.bool)
    logp = (-torch.rand(rows, length, generator=gen)).requires_grad_()
    adv = torch.randn(rows, generator=gen)
    stand_in = TRLStandIn("dapo", "token", logp, adaptive=dict(settings))
    ours = AdaptiveEntropyController(
        ControlConfig(
            kind="adaptive_entropy",
            target=target,
            coef_delta=0.02,
            coef_min=0.0,
            coef_max=0.05,
            coef_init=0.01,
        ),
        LOSS,
    )
    applied = []
    for step, entropy in enumerate(entropies, start=1):
        stand_in._entropies = torch.full((rows, length), entropy)
        loss = trl_loss(stand_in, logp.detach(), adv, mask)
        policy_loss = stand_in._metrics["train"]["policy_loss"][-1]
        theirs = (policy_loss - loss.item()) / entropy
        applied.append(theirs)
        assert ours.act(step, entropy).entropy_coef == pytest.approx(theirs, abs=1e-6), step
        assert ours.coef == pytest.approx(stand_in.entropy_coef, abs=1e-12), step
    assert applied[0] == pytest.approx(0.0) and max(applied) > 0  # no bonus until a measurement


def drive(controller, entropies):
    return [controller.act(step, h) for step, h in enumerate(entropies, start=1)]


#: every kind with a target, the bonus under both rules
STATEFUL = [(kind, {"coef_rule": "sac"} if kind == "entropy_bonus" else {}) for kind in TARGET_KINDS]
STATEFUL += [("entropy_bonus", {"coef_rule": "pi"}), ("cascade", {"kp": 2.0, "ki": 0.5})]


@pytest.mark.parametrize(("kind", "settings"), STATEFUL)
def test_every_controller_state_round_trips(kind, settings):
    a, b = (control(kind, target_ratio=0.8, smoothing=0.3, **settings) for _ in range(2))
    drive(a, [1.0, 0.6, 0.5, 0.4, 0.9, 0.3])
    b.load_state_dict(a.state_dict())
    later = [0.7, 0.2, 1.3, 0.8]
    assert drive(a, later) == drive(b, later)
    assert a.metrics() == b.metrics()


def test_kinds_are_the_documented_classes():
    assert isinstance(control("token_weight", target=1.0), TokenWeightController)
    assert isinstance(control("cascade", target=1.0), CascadeController)
    assert isinstance(control("entropy_bonus", target=1.0, coef_rule="pi"), EntropyBonusController)
    with pytest.raises(ValueError, match="control.coef_min must be > 0"):
        ControlConfig(kind="cascade", target=1.0, coef_min=0.0)


def test_retarget_moves_a_ratio_target_after_its_step():
    from entroclip.config import parse_config

    config = parse_config({"control": {"kind": "cascade", "target_ratio": 0.8, "retarget": {5: 0.6}}})
    ctl = make_controller(config.control, config.loss)
    targets = []
    for step, h in enumerate([1.0, 0.9, 0.8, 0.8, 0.8, 0.7, 0.6], start=1):
        ctl.act(step, h)
        targets.append(ctl.metrics()["control/target"])
    assert targets == pytest.approx([0.8] * 5 + [0.6] * 2)  # the first entropy stays the reference
    resumed = make_controller(config.control, config.loss)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.act(8, 0.6) == ctl.act(8, 0.6)
    with pytest.raises(ValueError, match="control.retarget"):
        ControlConfig(kind="clip", target=1.0, retarget={0: 0.5})
