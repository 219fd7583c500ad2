"""Entropy control: per-step controllers (the clip-low controller, an adaptive entropy bonus).

Controllers act once per RL step: they read the rollout entropy of the pre-update policy (nats) and
return the clip bounds and entropy coefficient for that step's update. Clip-Cov and KL-Cov, which act
inside every minibatch step, are in :mod:`entroclip.covariance`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

from entroclip.config import ControlConfig, LossConfig


@dataclass(frozen=True)
class ControlAction:
    """What the update of one step uses."""

    eps_low: float | None
    eps_high: float | None
    entropy_coef: float

    def metrics(self) -> dict[str, float]:
        """``control/eps_low``, ``control/eps_high`` (each when on) and ``control/entropy_coef``."""
        out = {"control/eps_low": self.eps_low, "control/eps_high": self.eps_high}
        return {k: v for k, v in out.items() if v is not None} | {"control/entropy_coef": self.entropy_coef}


class EntropyTarget:
    """The entropy to hold (nats): absolute, or a fraction of the first entropy observed; held until
    ``release_step`` (None: always). Measurements are smoothed with an EMA (``smoothing`` = weight on the
    past)."""

    def __init__(self, target: float | None, ratio: float | None, release_step: int | None, smoothing: float):
        self.value = target
        self.ratio = ratio
        self.release_step = release_step
        self.smoothing = smoothing
        self.smoothed: float | None = None

    def observe(self, entropy: float) -> float:
        """Record a measurement; returns the smoothed entropy. The first one fixes a ratio target."""
        if self.value is None:
            assert self.ratio is not None
            self.value = self.ratio * entropy
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
        return {"value": self.value, "smoothed": self.smoothed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.smoothed = state["value"], state["smoothed"]


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
        self.target.observe(entropy)
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


class ClipController(Controller):
    """A PI controller whose one output u in [-1, 1] moves eps_low and eps_high together along one schedule
    (clipping first: it adds no gradient term).

    With e = (target - H) / target and the integral I of past e, u = clamp(kp e + ki I, -1, 1): too little
    entropy gives u > 0. The schedule is piecewise linear through three points:
    - u = -1: the loosest clip-low (``eps_low_max``) and the tightest clip-high (``eps_high_min``), which
      lower entropy;
    - u = 0: the config's bounds (``loss.eps_low``, ``loss.eps_high``);
    - u = +1: the tightest clip-low (``eps_low_min``) and clip-high off, which raise entropy; just below
      +1, eps_high is ``eps_high_max``.
    Anti-windup by clamping the integral: it stops where the output reaches the bound the error pushes
    towards, so that the output saturates exactly and leaves the bound as soon as the error turns.
    """

    def __init__(self, control: ControlConfig, loss: LossConfig) -> None:
        super().__init__(loss)
        self.target = _target(control)
        self.kp, self.ki = control.kp, control.ki
        self.low_range = (
            control.eps_low_min,
            loss.eps_low if loss.eps_low is not None else 0.2,
            control.eps_low_max,
        )
        self.high_range = (
            control.eps_high_min,
            loss.eps_high if loss.eps_high is not None else 0.2,
            control.eps_high_max,
        )
        self.integral = 0.0
        self.output = 0.0

    def bounds(self, u: float) -> tuple[float, float | None]:
        """(eps_low, eps_high) at output ``u`` in [-1, 1] (eps_high None: clip-high off, at u = 1)."""
        low_min, low_ref, low_max = self.low_range
        high_min, high_ref, high_max = self.high_range
        if u >= 1.0:
            return low_min, None
        if u >= 0.0:
            return low_ref + u * (low_min - low_ref), high_ref + u * (high_max - high_ref)
        return low_ref - u * (low_max - low_ref), high_ref - u * (high_min - high_ref)

    def act(self, step: int, entropy: float) -> ControlAction:
        self.target.observe(entropy)
        if not self.target.held(step):
            self.output = 0.0
            return self.static
        error = self.target.relative_error()
        self.integral = self._integrate(error)
        self.output = min(max(self.kp * error + self.ki * self.integral, -1.0), 1.0)
        eps_low, eps_high = self.bounds(self.output)
        return replace(self.static, eps_low=eps_low, eps_high=eps_high)

    def _integrate(self, error: float) -> float:
        """The integral after adding ``error``, stopped where the output reaches the bound it is pushed
        towards (it is never pulled back for the proportional term alone): the output saturates
        exactly and leaves the bound as soon as the error turns."""
        pushed = self.integral + error
        if self.ki == 0.0:
            return pushed
        if error > 0:
            return min(pushed, max(self.integral, (1.0 - self.kp * error) / self.ki))
        return max(pushed, min(self.integral, (-1.0 - self.kp * error) / self.ki))

    def metrics(self) -> dict[str, float]:
        return {
            "control/target": float(self.target.value or 0.0),
            "control/integral": self.integral,
            "control/output": self.output,
            "control/saturated": float(abs(self.output) >= 1.0),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict(), "integral": self.integral, "output": self.output}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
        self.integral, self.output = state["integral"], state["output"]


class EntropyBonusController(Controller):
    """An entropy bonus whose coefficient adapts to hold the rollout entropy at a target.

    The SAC temperature rule in log space: log c <- log c + lr * (target - H) / target, kept within
    [log coef_min, log coef_max]. Too little entropy raises the bonus, too much lowers it; the bounds stop
    windup, e.g. while the entropy is still above the target early in a run.
    """

    def __init__(self, control: ControlConfig, loss: LossConfig) -> None:
        super().__init__(loss)
        self.target = _target(control)
        self.lr = control.coef_lr
        self.log_bounds = (math.log(control.coef_min), math.log(control.coef_max))
        self.log_coef = math.log(control.coef_init)

    @property
    def coef(self) -> float:
        return math.exp(self.log_coef)

    def act(self, step: int, entropy: float) -> ControlAction:
        self.target.observe(entropy)
        if not self.target.held(step):
            return self.static_action()
        low, high = self.log_bounds
        self.log_coef = min(max(self.log_coef + self.lr * self.target.relative_error(), low), high)
        return replace(self.static, entropy_coef=self.coef)

    def metrics(self) -> dict[str, float]:
        return {"control/target": float(self.target.value or 0.0), "control/coef": self.coef}

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict(), "log_coef": self.log_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
        self.log_coef = state["log_coef"]


class KLCovController(StaticController):
    """KL-Cov's update has no ratio clipping: the covariance penalty takes its place."""

    def act(self, step: int, entropy: float) -> ControlAction:
        return replace(self.static, eps_low=None, eps_high=None)


def _target(control: ControlConfig) -> EntropyTarget:
    return EntropyTarget(control.target, control.target_ratio, control.release_step, control.smoothing)


def make_controller(control: ControlConfig, loss: LossConfig) -> Controller:
    """The controller of ``control.kind`` (Clip-Cov acts per minibatch and keeps the static bounds)."""
    if control.kind == "clip_low":
        return ClipLowController(control, loss)
    if control.kind == "clip":
        return ClipController(control, loss)
    if control.kind == "entropy_bonus":
        return EntropyBonusController(control, loss)
    if control.kind == "kl_cov":
        return KLCovController(loss)
    return StaticController(loss)
