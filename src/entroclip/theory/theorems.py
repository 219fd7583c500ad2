"""Closed forms of the paper's Theorems 1 (PG) and 2 (NPG) and the checks that put them to the test.

Setting of one inner step: current iterate pi_k, sampling policy pi_old, advantages independent of the
action with E[A] = 0 and E[max(A, 0)] = mu * nu. Averaging the step over the advantage leaves only the
gradients that clipping removed, E_A[A 1{not clipped}] = E[A+] (1_X + 1_D - 1_Y), so with a ~ pi_k and the
score s(a) = Q(a) = pi_k(a) (log pi_k(a) + H) for PG, or s(a) = log pi_k(a) for NPG,

    E[Delta H] = lr E[A+] d [ p (E[s] - E[s | X]) + p_D (E[s] - E[s | D]) - q (E[s] - E[s | Y]) ] + O(lr^2)

with X / Y / D the clip-low / clip-high / dual-clip events, p, q, p_D their probabilities under pi_k, and
d = 1/K (the context's share of the batch) for PG, d = 1 for NPG (the Fisher weight cancels it). The
dual-clip term extends the paper's statement in the obvious way (it removes push-downs, like clip-low).
The events are the masks of :func:`entroclip.objectives.clipped_surrogate` evaluated on every action.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from entroclip.objectives import clipped_surrogate
from entroclip.theory.softmax import SoftmaxState
from entroclip.theory.updates import ClipBounds, LabConfig, ascend

Geometry = Literal["pg", "npg"]
Side = Literal["low", "high"]


def geometry_of(config: LabConfig) -> Geometry:
    """The theorem whose score fits the optimiser: Theorem 2 for npg, Theorem 1 (Ineq. 7) otherwise."""
    return "npg" if config.optimiser == "npg" else "pg"


def clip_events(old: SoftmaxState, current: SoftmaxState, clip: ClipBounds) -> tuple[Tensor, Tensor, Tensor]:
    """Clip events of every action at the current iterate, bool ``[S, K, n]`` each: (X, Y, D).

    X: a negative-advantage sample of the action would be clip-low; Y: a positive-advantage sample would
    be clip-high; D: a negative-advantage sample would be dual-clipped. Evaluated by the core on all
    actions with advantage -1 and +1.
    """
    seeds, contexts, n = current.shape
    logp_new = current.log_probs().view(seeds * contexts, n)
    logp_old = old.log_probs().view(seeds * contexts, n)
    every_action = torch.ones_like(logp_new, dtype=torch.bool)
    ones = torch.ones_like(logp_new)
    bounds = (clip.eps_low, clip.eps_high, clip.dual_clip)
    negative = clipped_surrogate(logp_new, logp_old, -ones, every_action, *bounds)
    positive = clipped_surrogate(logp_new, logp_old, ones, every_action, *bounds)
    shape = current.shape
    return negative.clip_low.view(shape), positive.clip_high.view(shape), negative.dual.view(shape)


@dataclass(frozen=True)
class ClosedForm:
    """The theorem at one inner step, per seed and context, each ``[S, K]``.

    ``p_low``, ``p_high``, ``p_dual``: probabilities of the clip events under pi_k (the paper's p_k, q_k).
    ``gap_*``: E[s] - E[s | event] (0 where the event is empty); Ineq. 7 is gap_low >= 0, gap_high >= 0.
    ``effect_*``: the expected first-order entropy change (nats) of the context caused by each clip;
    ``effect_low = lr E[A+] d p_low gap_low``, ``effect_high = -lr E[A+] d p_high gap_high``.
    """

    p_low: Tensor
    p_high: Tensor
    p_dual: Tensor
    gap_low: Tensor
    gap_high: Tensor
    gap_dual: Tensor
    effect_low: Tensor
    effect_high: Tensor
    effect_dual: Tensor

    @property
    def total(self) -> Tensor:
        """Expected first-order entropy change of the step, ``[S, K]``."""
        return self.effect_low + self.effect_high + self.effect_dual


def closed_form_step(
    old: SoftmaxState,
    current: SoftmaxState,
    clip: ClipBounds,
    *,
    geometry: Geometry,
    lr: float,
    positive_part: float,
) -> ClosedForm:
    """Evaluate Theorem 1 (``geometry="pg"``) or 2 (``"npg"``) exactly, as sums over the actions.

    ``positive_part`` is E[max(A, 0)]; ``lr`` the step size of the inner step.
    """
    clip_low, clip_high, dual = clip_events(old, current, clip)
    probs = current.probs
    score = -current.entropy_gradient() if geometry == "pg" else current.log_probs()
    below_mean = (probs * score).sum(-1, keepdim=True) - score
    scale = lr * positive_part / (current.shape[1] if geometry == "pg" else 1)

    def mass_gap_excess(event: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mass = (probs * event).sum(-1)
        excess = (probs * event * below_mean).sum(-1)  # = mass * (E[s] - E[s | event])
        return mass, torch.where(mass > 0, excess / mass.clamp_min(torch.finfo(mass.dtype).tiny), 0.0), excess

    p_low, gap_low, excess_low = mass_gap_excess(clip_low)
    p_high, gap_high, excess_high = mass_gap_excess(clip_high)
    p_dual, gap_dual, excess_dual = mass_gap_excess(dual)
    return ClosedForm(
        p_low,
        p_high,
        p_dual,
        gap_low,
        gap_high,
        gap_dual,
        scale * excess_low,
        -scale * excess_high,
        scale * excess_dual,
    )


def expected_ascent_weights(
    old: SoftmaxState, current: SoftmaxState, clip: ClipBounds, positive_part: float
) -> Tensor:
    """dJ/dlog pi_k(c, a) of the expected clipped objective, ``[S, K, n]``.

    J = (1/K) sum_c E_{a ~ pi_old(c)} E_A[min(r A, clip(r) A)] with A independent of a; as the surrogate
    is linear in A on each sign, E_A splits into an A = +E[A+] and an A = -E[A+] term, each weighted by
    pi_old(a). Both are evaluated by the core on every action, and differentiated by autograd.
    """
    seeds, contexts, n = current.shape
    logp_new = current.log_probs().view(seeds * contexts, n).detach().requires_grad_(True)
    logp_old = old.log_probs().view(seeds * contexts, n)
    weighted = positive_part * old.probs.view(seeds * contexts, n)
    every_action = torch.ones_like(logp_new, dtype=torch.bool)
    positive, negative = (
        clipped_surrogate(
            logp_new,
            logp_old,
            sign * weighted,
            every_action,
            clip.eps_low,
            clip.eps_high,
            clip.dual_clip,
            agg="seq-mean-token-sum",
        )
        for sign in (1.0, -1.0)
    )
    (grad,) = torch.autograd.grad(positive.loss + negative.loss, logp_new)
    # the loss is -(1/S) sum over seeds of J: rows are averaged, each row's K contexts carry J's 1/K
    return (-grad * seeds).view(seeds, contexts, n).to(current.logits.dtype)


def entropy_directional_derivative(
    old: SoftmaxState, current: SoftmaxState, config: LabConfig, step: float = 1e-4
) -> Tensor:
    """d/deta of the mean entropy over contexts along the expected inner step of ``config`` at lr = 1.

    Central finite difference [H(theta + step * dir) - H(theta - step * dir)] / (2 step), ``[S]``, with the
    direction the pg or npg step of :func:`~entroclip.theory.updates.ascend` on the exact expected
    gradient of :func:`expected_ascent_weights`: the quantity the closed form gives at lr = 1.
    """
    if config.optimiser == "adam":
        raise ValueError("Adam has no closed form: its step is not linear in the gradient")
    seeds, contexts, n = current.shape
    weights = expected_ascent_weights(
        old, current, config.clip, config.reward.positive_part_mean(config.group_size)
    )
    every_context = torch.arange(contexts).repeat_interleave(n).expand(seeds, -1)
    every_action = torch.arange(contexts * n).expand(seeds, -1)
    entropies = []
    for signed_step in (step, -step):
        moved = current.clone()
        ascend(moved, every_context, every_action, weights.view(seeds, -1), config, lr=signed_step)
        entropies.append(moved.entropy().mean(-1))
    return (entropies[0] - entropies[1]) / (2 * step)


@dataclass
class ConditionTally:
    """How often one sign condition held, over the cases where its clip event was not empty."""

    holds: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return self.holds / self.total if self.total else float("nan")


@dataclass
class SignConditions:
    """Ineq. 7 over (seed, context, inner step): ``low`` is E[s] - E[s | X] >= 0, ``high`` is
    E[s] - E[s | Y] >= 0 (s = Q for PG and Adam, log pi for NPG)."""

    low: ConditionTally = field(default_factory=ConditionTally)
    high: ConditionTally = field(default_factory=ConditionTally)


@dataclass(frozen=True)
class Counterexample:
    """One context's (pi_old, pi_k) where a sign condition fails: log-probabilities ``[n]`` each."""

    log_probs_old: Tensor
    log_probs: Tensor
    side: Side
    event_probability: float
    gap: float


class FirstOrderChange:
    """Observer of :func:`~entroclip.theory.updates.lab_update`: per seed ``[S]``, the sum over inner
    steps of <dH/dtheta, step actually taken>, H the mean entropy over contexts (the first-order part of
    the update's entropy change)."""

    def __init__(self, seeds: int, dtype: torch.dtype) -> None:
        self.first_order = torch.zeros(seeds, dtype=dtype)
        self._gradient: Tensor | None = None
        self._logits: Tensor | None = None

    def before_step(self, policy: SoftmaxState) -> None:
        self._gradient = policy.entropy_gradient()
        self._logits = policy.logits.clone()

    def after_step(self, policy: SoftmaxState) -> None:
        assert self._gradient is not None and self._logits is not None, "after_step without before_step"
        self.first_order += (self._gradient * (policy.logits - self._logits)).sum(-1).mean(-1)
        self._gradient = self._logits = None


class PathTheory(FirstOrderChange):
    """:class:`FirstOrderChange` plus the theorem at every inner iterate of an update.

    ``predicted`` ``[T, 3]``: the sum of the closed form's clip-low, clip-high and dual-clip effects at the
    iterates visited (mean entropy over contexts), for the first T = ``theory_seeds`` seeds (all by
    default); when ``config.theorem_applies`` it has the expectation of ``first_order``. ``signs``
    tallies Ineq. 7 at every iterate of those seeds (pass one to accumulate over updates);
    ``counterexample`` keeps the first failure seen.
    """

    def __init__(
        self,
        old: SoftmaxState,
        config: LabConfig,
        signs: SignConditions | None = None,
        theory_seeds: int | None = None,
    ) -> None:
        super().__init__(old.shape[0], old.logits.dtype)
        self.theory_seeds = old.shape[0] if theory_seeds is None else min(theory_seeds, old.shape[0])
        self.old = old.head(self.theory_seeds).clone()
        self.config = config
        self.positive_part = config.reward.positive_part_mean(config.group_size)
        self.predicted = old.logits.new_zeros(self.theory_seeds, 3)
        self.signs = SignConditions() if signs is None else signs
        self.counterexample: Counterexample | None = None

    def before_step(self, policy: SoftmaxState) -> None:
        super().before_step(policy)
        current = policy.head(self.theory_seeds)
        form = closed_form_step(
            self.old,
            current,
            self.config.clip,
            geometry=geometry_of(self.config),
            lr=self.config.lr,
            positive_part=self.positive_part,
        )
        self.predicted += torch.stack([form.effect_low, form.effect_high, form.effect_dual], -1).mean(1)
        self._tally(form, current)

    def _tally(self, form: ClosedForm, policy: SoftmaxState) -> None:
        sides: tuple[tuple[Side, Tensor, Tensor, ConditionTally], ...] = (
            ("low", form.p_low, form.gap_low, self.signs.low),
            ("high", form.p_high, form.gap_high, self.signs.high),
        )
        for side, mass, gap, tally in sides:
            present = mass > 0
            fails = present & (gap < 0)
            failures = int(fails.sum())
            tally.total += int(present.sum())
            tally.holds += int(present.sum()) - failures
            if failures and self.counterexample is None:
                seed, context = (int(i) for i in fails.nonzero()[0])
                self.counterexample = Counterexample(
                    self.old.log_probs()[seed, context].clone(),
                    policy.log_probs()[seed, context].clone(),
                    side,
                    float(mass[seed, context]),
                    float(gap[seed, context]),
                )
