"""Entropy control: per-step controllers on the clip bounds, EntroPIC's token weights and the entropy
bonus, alone or in a cascade, and TRL's adaptive entropy rule as a baseline.

Controllers act once per RL step: they read the rollout entropy of the pre-update policy (nats) and
return the clip bounds, entropy coefficient and token weight for that step's update. Clip-Cov and KL-Cov,
which act inside every minibatch step, are in :mod:`entroclip.covariance`; the token-weight and
high-entropy-mask terms of the loss in :mod:`entroclip.levers`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from entroclip.config import ControlConfig, LossConfig


@dataclass(frozen=True)
class ControlAction:
    """What the update of one step uses. ``token_weight``: EntroPIC's alpha (see
    :func:`entroclip.levers.token_weight_term`; > 0 lowers entropy, < 0 raises it, 0 off)."""

    eps_low: float | None
    eps_high: float | None
    entropy_coef: float
    token_weight: float = 0.0

    def metrics(self) -> dict[str, float]:
        """``control/eps_low``, ``control/eps_high`` (each when on) and ``control/entropy_coef``."""
        out = {"control/eps_low": self.eps_low, "control/eps_high": self.eps_high}
        return {k: v for k, v in out.items() if v is not None} | {"control/entropy_coef": self.entropy_coef}


class EntropyTarget:
    """The entropy to hold (nats): absolute, or a fraction of the first entropy observed; held until
    ``release_step`` (None: always). ``retarget`` maps steps to later targets in the same unit: after
    step k the target is ``retarget[k]`` (a tracking test). Measurements are smoothed with an EMA
    (``smoothing`` = weight on the past)."""

    def __init__(
        self,
        target: float | None,
        ratio: float | None,
        release_step: int | None,
        smoothing: float,
        retarget: Mapping[int, float] | None = None,
    ):
        self.absolute = target is not None
        self.schedule = [(0, target if target is not None else ratio), *sorted((retarget or {}).items())]
        self.value: float | None = target
        self.first: float | None = None
        self.release_step = release_step
        self.smoothing = smoothing
        self.smoothed: float | None = None

    def observe(self, entropy: float, step: int = 1) -> float:
        """Record the measurement of ``step``; returns the smoothed entropy. The first one fixes a ratio
        target's reference."""
        if self.first is None:
            self.first = entropy
        level = next(value for after, value in reversed(self.schedule) if step > after)
        assert level is not None
        self.value = level if self.absolute else level * self.first
        if self.smoothed is None:
            self.smoothed = entropy
        else:
            self.smoothed = self.smoothing * self.smoothed + (1 - self.smoothing) * entropy
        return self.smoothed

    def held(self, step: int) -> bool:
        return self.release_step is None or step <= self.release_step

    def relative_error(self) -> float:
        """(target - entropy) / target: positive when entropy is too low."""
        assert self.value is not None and self.smoothed is not None
        return (self.value - self.smoothed) / max(self.value, 1e-8)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "smoothed": self.smoothed, "first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.smoothed = state["value"], state["smoothed"]
        # a ratio target's reference; checkpoints without it have no retarget to apply
        self.first = state.get("first", self.value if self.absolute else None)
        if self.first is None and self.value is not None:
            ratio = self.schedule[0][1]
            assert ratio is not None
            self.first = self.value / ratio


class PIOutput:
    """A PI law with a bounded output: u = clamp(kp e + ki I, low, high), I the sum of past errors.

    Anti-windup by clamping the integral: it stops where the output reaches the bound the error pushes
    towards (it is never pulled back for the proportional term alone), so that the output saturates
    exactly and leaves the bound as soon as the error turns.
    """

    def __init__(self, kp: float, ki: float, low: float, high: float) -> None:
        self.kp, self.ki, self.low, self.high = kp, ki, low, high
        self.integral = 0.0
        self.output = 0.0

    def step(self, error: float) -> float:
        """Integrate ``error`` and return the new output."""
        self.integral = self._integrate(error)
        self.output = min(max(self.kp * error + self.ki * self.integral, self.low), self.high)
        return self.output

    def _integrate(self, error: float) -> float:
        pushed = self.integral + error
        if self.ki == 0.0:
            return pushed
        if error > 0:
            return min(pushed, max(self.integral, (self.high - self.kp * error) / self.ki))
        return max(pushed, min(self.integral, (self.low - self.kp * error) / self.ki))

    @property
    def saturated(self) -> bool:
        return self.output <= self.low or self.output >= self.high

    def state_dict(self) -> dict[str, float]:
        return {"integral": self.integral, "output": self.output}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.integral, self.output = state["integral"], state["output"]


class Controller(ABC):
    """Chooses the clip bounds and entropy coefficient of each step's update."""

    def __init__(self, loss: LossConfig) -> None:
        self.static = ControlAction(loss.eps_low, loss.eps_high, loss.entropy_coef)

    @abstractmethod
    def act(self, step: int, entropy: float) -> ControlAction:
        """The action for ``step``, given the rollout entropy (nats) of the pre-update policy."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def static_action(self) -> ControlAction:
        """The config's own bounds and coefficient (``loss.eps_low``, ``loss.eps_high``,
        ``loss.entropy_coef``); a controller's action changes some of them."""
        return self.static


class StaticController(Controller):
    """Fixed bounds (``loss.eps_low``, ``loss.eps_high``), e.g. DAPO's clip-higher (0.2, 0.28)."""

    def act(self, step: int, entropy: float) -> ControlAction:
        return self.static_action()


class ClipLowController(Controller):
    """A PI controller on eps_low that holds the rollout entropy at a target.

    With e = (target - H) / target (relative error, positive when entropy is too low) and the integral
    I = sum of past e, eps_low = clamp(eps_ref - kp e - ki I, eps_low_min, eps_low_max): too little
    entropy lowers eps_low, so clip-low fires more often and removes more of the entropy-lowering push-down
    of rare tokens. Anti-windup by conditional integration: the error is not integrated while the output
    is saturated in the direction the error pushes.
    """

    def __init__(self, control: ControlConfig, loss: LossConfig) -> None:
        super().__init__(loss)
        self.target = _target(control)
        self.eps_ref = control.eps_low_ref if control.eps_low_ref is not None else (loss.eps_low or 0.2)
        self.bounds = (control.eps_low_min, control.eps_low_max)
        self.kp, self.ki = control.kp, control.ki
        self.integral = 0.0
        self.current = self.eps_ref

    def act(self, step: int, entropy: float) -> ControlAction:
        self.target.observe(entropy, step)
        if not self.target.held(step):
            self.current = self.eps_ref
            return replace(self.static, eps_low=self.eps_ref)
        error = self.target.relative_error()
        low, high = self.bounds
        proposed = self.eps_ref - self.kp * error - self.ki * (self.integral + error)
        pushing_below = proposed < low and error > 0
        pushing_above = proposed > high and error < 0
        if not (pushing_below or pushing_above):
            self.integral += error
        self.current = min(max(self.eps_ref - self.kp * error - self.ki * self.integral, low), high)
        return replace(self.static, eps_low=self.current)

    def metrics(self) -> dict[str, float]:
        return {"control/target": float(self.target.value or 0.0), "control/integral": self.integral}

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict(), "integral": self.integral, "current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
        self.integral, self.current = state["integral"], state["current"]


#: eps_high on the way to "clip-high off": the schedule approaches off through this bound (a ratio cap
#: at 2, which an update rarely reaches), then switches clip-high off at the end of the range
OFF_APPROACH = 1.0


class ClipController(Controller):
    """A PI controller whose one output u in [-1, 1] moves eps_low and eps_high together along one schedule
    (clipping first: it adds no gradient term).

    With e = (target - H) / target, u = :class:`PIOutput` (kp, ki) of e: too little entropy gives u > 0.
    The schedule is piecewise linear through three points:
    - u = -1: the loosest clip-low (``eps_low_max``) and ``eps_high_down``, which lower entropy;
    - u = 0: the config's bounds (``loss.eps_low``, ``loss.eps_high``);
    - u = +1: the tightest clip-low (``eps_low_min``) and ``eps_high_up``, which raise entropy.
    ``eps_high_down`` / ``eps_high_up`` None keep ``loss.eps_high``; ``"off"`` approaches clip-high off
    through ``OFF_APPROACH`` and switches it off at the end. The paper's direction is eps_high_down 0.05,
    eps_high_up off. Under verifiable rewards the first-order ``effect_high`` is positive, while the
    counterfactual probe and a one-seed pilot with eps_high_down 0.05 show the paper's sign (docs/results.md
    1d); the default leaves clip-high alone until a 5-seed study settles it.
    """

    low_output, high_output = -1.0, 1.0

    def __init__(self, control: ControlConfig, loss: LossConfig) -> None:
        super().__init__(loss)
        self.target = _target(control)
        self.low_range = (
            control.eps_low_min,
            loss.eps_low if loss.eps_low is not None else 0.2,
            control.eps_low_max,
        )
        self.high_ref = loss.eps_high
        self.high_ends = (control.eps_high_down, control.eps_high_up)
        self.pi = PIOutput(control.kp, control.ki, self.low_output, self.high_output)

    def bounds(self, u: float) -> tuple[float, float | None]:
        """(eps_low, eps_high) at output ``u``; beyond [-1, 1] the ends' bounds (eps_high None: off)."""
        low_min, low_ref, low_max = self.low_range
        u = min(max(u, -1.0), 1.0)
        if abs(u) >= 1.0:  # the ends exactly
            return (low_min if u > 0 else low_max), self._eps_high(u)
        eps_low = low_ref + u * (low_min - low_ref) if u >= 0.0 else low_ref - u * (low_max - low_ref)
        return eps_low, self._eps_high(u)

    def _eps_high(self, u: float) -> float | None:
        end = self.high_ends[0] if u < 0.0 else self.high_ends[1]
        if end is None or u == 0.0:
            return self.high_ref
        if end == "off":
            if abs(u) >= 1.0:
                return None
            end = OFF_APPROACH
        if abs(u) >= 1.0:
            return end
        start = self.high_ref if self.high_ref is not None else OFF_APPROACH
        return start + abs(u) * (end - start)

    def act(self, step: int, entropy: float) -> ControlAction:
        self.target.observe(entropy, step)
        if not self.target.held(step):
            self.pi.output = 0.0
            return self.static
        return self.action(self.pi.step(self.target.relative_error()))

    def action(self, u: float) -> ControlAction:
        """The step's action at output ``u``."""
        eps_low, eps_high = self.bounds(u)
        return replace(self.static, eps_low=eps_low, eps_high=eps_high)

    def metrics(self) -> dict[str, float]:
        return {
            "control/target": float(self.target.value or 0.0),
            "control/integral": self.pi.integral,
            "control/output": self.pi.output,
            "control/saturated": float(self.pi.saturated),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict(), **self.pi.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
        self.pi.load_state_dict(state)


class TokenWeightController(Controller):
    """EntroPIC's lever under a PI law: alpha = -``weight_max`` u, u = :class:`PIOutput` (kp, ki) of the
    relative error in [-1, 1] (too little entropy: u > 0, alpha < 0, the likely tokens' push-up weakened
    and their push-down strengthened). The clip bounds stay the config's.

    EntroPIC's own code updates alpha at every micro-batch from the training entropy's absolute error,
    without anti-windup; here it acts once per step on the rollout entropy's relative error, as every
    controller of this module does.
    """

    def __init__(self, control: ControlConfig, loss: LossConfig) -> None:
        super().__init__(loss)
        self.target = _target(control)
        self.weight_max = control.weight_max
        self.pi = PIOutput(control.kp, control.ki, -1.0, 1.0)

    def act(self, step: int, entropy: float) -> ControlAction:
        self.target.observe(entropy, step)
        if not self.target.held(step):
            self.pi.output = 0.0
            return self.static
        u = self.pi.step(self.target.relative_error())
        return replace(self.static, token_weight=-self.weight_max * u)

    def metrics(self) -> dict[str, float]:
        return {
            "control/target": float(self.target.value or 0.0),
            "control/integral": self.pi.integral,
            "control/output": self.pi.output,
            "control/saturated": float(self.pi.saturated),
            "control/token_weight": -self.weight_max * self.pi.output,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict(), **self.pi.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
        self.pi.load_state_dict(state)


class CascadeController(ClipController):
    """Clipping first, then the token weights, then the entropy bonus: one PI output u in [-1, 3] (or [-2, 3])
    over the actuators in sequence (split-range control).

    - u in [-1, 1]: the clip schedule of :class:`ClipController`, nothing else;
    - u in (1, 2]: the clip at its entropy-raising end (``eps_low_min``, ``eps_high_up``) and
      alpha = -(u - 1) ``weight_max``;
    - u in (2, 3]: both at that end and the bonus ``coef_min (coef_max / coef_min) ** (u - 2)``
      (``bonus: false`` stops the output at 2);
    - u in [-2, -1) (``sharpen: true`` only): the clip at its entropy-lowering end and
      alpha = (-1 - u) ``weight_max``. Off by default: under verifiable rewards the reward itself lowers
      entropy, and a deeper low end is integral the loop must unwind when the entropy reaches the target.
    A saturated actuator hands over to the next as the integral keeps moving, and takes over again as the
    output comes back into its range. ``control/active``: 0 clip, 1 token weights, 2 bonus.
    """

    def __init__(self, control: ControlConfig, loss: LossConfig) -> None:
        self.low_output = -2.0 if control.sharpen else -1.0
        self.high_output = 3.0 if control.bonus else 2.0
        super().__init__(control, loss)
        self.weight_max = control.weight_max
        self.coef_range = (control.coef_min, control.coef_max)

    def action(self, u: float) -> ControlAction:
        eps_low, eps_high = self.bounds(u)
        weight = -self.weight_max * (min(u, 2.0) - 1.0) if u > 1.0 else 0.0
        if u < -1.0:
            weight = self.weight_max * (-1.0 - u)
        coef = self.static.entropy_coef
        if u > 2.0:
            low, high = self.coef_range
            coef = low * (high / low) ** (u - 2.0)
        return ControlAction(eps_low, eps_high, coef, weight)

    def metrics(self) -> dict[str, float]:
        u = self.pi.output
        action = self.action(u)
        active = 2.0 if u > 2.0 else 1.0 if abs(u) > 1.0 else 0.0
        return super().metrics() | {
            "control/active": active,
            "control/token_weight": action.token_weight,
            "control/coef": action.entropy_coef,
        }


class EntropyBonusController(Controller):
    """An entropy bonus whose coefficient adapts to hold the rollout entropy at a target.

    ``coef_rule: sac``: the SAC temperature rule in log space, log c <- log c + coef_lr e (e the relative
    error), kept within [log coef_min, log coef_max]. Too little entropy raises the bonus, too much lowers
    it; the bounds stop windup.

    ``coef_rule: pi``: c = coef_max u, u = :class:`PIOutput` (kp, ki) of e in [0, 1]. Entropy responds to
    the coefficient at a rate, so a pure integral on log c (the SAC rule) is an integral on an
    integrating plant whose gain grows with c: it overshoots. The linear PI's proportional term damps
    the loop, and a linear output is the log-space rule with its gain scheduled by 1 / c.
    """

    def __init__(self, control: ControlConfig, loss: LossConfig) -> None:
        super().__init__(loss)
        self.target = _target(control)
        self.rule = control.coef_rule
        self.lr = control.coef_lr
        self.coef_max = control.coef_max
        sac = self.rule == "sac"  # the config ensures 0 < coef_min <= coef_init for it
        self.log_bounds = (math.log(control.coef_min), math.log(control.coef_max)) if sac else (0.0, 0.0)
        self.log_coef = math.log(control.coef_init) if sac else 0.0
        self.pi = PIOutput(control.kp, control.ki, 0.0, 1.0)

    @property
    def coef(self) -> float:
        return self.coef_max * self.pi.output if self.rule == "pi" else math.exp(self.log_coef)

    def act(self, step: int, entropy: float) -> ControlAction:
        self.target.observe(entropy, step)
        if not self.target.held(step):
            return self.static_action()
        error = self.target.relative_error()
        if self.rule == "pi":
            self.pi.step(error)
        else:
            low, high = self.log_bounds
            self.log_coef = min(max(self.log_coef + self.lr * error, low), high)
        return replace(self.static, entropy_coef=self.coef)

    def metrics(self) -> dict[str, float]:
        return {"control/target": float(self.target.value or 0.0), "control/coef": self.coef}

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict(), "log_coef": self.log_coef, **self.pi.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
        self.log_coef = state["log_coef"]
        self.pi.load_state_dict(state)


class AdaptiveEntropyController(Controller):
    """TRL's adaptive entropy rule (``GRPOConfig.use_adaptive_entropy``, after Skywork-OR1), once per RL step.

    The coefficient moves by ``coef_delta`` up when the entropy is at or below the target and down
    otherwise, within [coef_min, coef_max]; the bonus applied at a step is the coefficient before this
    step's move, and only when the previous step's entropy was at or below the target (none at the first
    step). TRL applies the same rule at every optimizer step to the training batch's entropy; with one
    optimizer step per rollout the two are the same sequence.
    """

    def __init__(self, control: ControlConfig, loss: LossConfig) -> None:
        super().__init__(loss)
        self.target = _target(control)
        self.delta = control.coef_delta
        self.bounds = (control.coef_min, control.coef_max)
        self.coef = control.coef_init
        self.last_entropy = math.inf
        self.applied = 0.0

    def act(self, step: int, entropy: float) -> ControlAction:
        smoothed = self.target.observe(entropy, step)
        if not self.target.held(step):
            return self.static_action()
        assert self.target.value is not None
        self.applied = self.coef if self.last_entropy <= self.target.value else 0.0
        low, high = self.bounds
        if smoothed <= self.target.value:
            self.coef = min(self.coef + self.delta, high)
        else:
            self.coef = max(self.coef - self.delta, low)
        self.last_entropy = smoothed
        return replace(self.static, entropy_coef=self.applied)

    def metrics(self) -> dict[str, float]:
        return {"control/target": float(self.target.value or 0.0), "control/coef": self.applied}

    def state_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.state_dict(),
            "coef": self.coef,
            "last_entropy": self.last_entropy,
            "applied": self.applied,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
        self.coef, self.last_entropy, self.applied = state["coef"], state["last_entropy"], state["applied"]


class KLCovController(StaticController):
    """KL-Cov's update has no ratio clipping: the covariance penalty takes its place."""

    def act(self, step: int, entropy: float) -> ControlAction:
        return replace(self.static, eps_low=None, eps_high=None)


def _target(control: ControlConfig) -> EntropyTarget:
    return EntropyTarget(
        control.target, control.target_ratio, control.release_step, control.smoothing, control.retarget
    )


def make_controller(control: ControlConfig, loss: LossConfig) -> Controller:
    """The controller of ``control.kind`` (Clip-Cov acts per minibatch and keeps the static bounds)."""
    if control.kind == "clip_low":
        return ClipLowController(control, loss)
    if control.kind == "clip":
        return ClipController(control, loss)
    if control.kind == "token_weight":
        return TokenWeightController(control, loss)
    if control.kind == "cascade":
        return CascadeController(control, loss)
    if control.kind == "entropy_bonus":
        return EntropyBonusController(control, loss)
    if control.kind == "adaptive_entropy":
        return AdaptiveEntropyController(control, loss)
    if control.kind == "kl_cov":
        return KLCovController(loss)
    return StaticController(loss)
