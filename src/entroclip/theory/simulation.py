"""Monte-Carlo experiments over many seeds at once: one inner step, one update, a trajectory.

Every function takes initial logits ``[K, n]`` shared by all seeds (see ``theory.policies``), a
:class:`~entroclip.theory.updates.LabConfig` and a torch Generator, and reports entropies in nats (the
entropy of a seed is the mean over its K contexts). ``progress`` callbacks receive the number of units
of work just finished.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from entroclip.theory.softmax import SoftmaxState
from entroclip.theory.theorems import (
    Counterexample,
    FirstOrderChange,
    PathTheory,
    SignConditions,
    closed_form_step,
    geometry_of,
)
from entroclip.theory.updates import (
    NO_CLIP,
    Batch,
    ClipBounds,
    ClipFractions,
    LabConfig,
    StepObserver,
    lab_update,
    make_optimiser,
    sample_batch,
)

Progress = Callable[[int], None]

#: Two-sided 95% quantile of the standard normal distribution.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """Monte-Carlo mean over seeds with its standard error."""

    mean: float
    stderr: float

    @classmethod
    def from_samples(cls, samples: Tensor) -> Estimate:
        """From per-seed values ``[S]`` (S >= 2)."""
        if samples.numel() < 2:
            raise ValueError("a standard error needs at least 2 seeds")
        return cls(samples.mean().item(), samples.std().item() / math.sqrt(samples.numel()))


def broadcast_policy(logits: Tensor, seeds: int) -> SoftmaxState:
    """The same initial policy ``[K, n]`` for every seed, as a state ``[seeds, K, n]``."""
    if logits.dim() != 2:
        raise ValueError(f"initial logits must be [contexts, actions], got shape {tuple(logits.shape)}")
    if seeds < 2:
        raise ValueError(f"need at least 2 seeds for a standard error, got {seeds}")
    return SoftmaxState.from_logits(logits.expand(seeds, *logits.shape))


@dataclass(frozen=True)
class StepCheck:
    """One inner step from pi_k on a fresh minibatch from pi_old, over independent replicates.

    ``closed_form`` (``_low``, ``_high``): the theorem's expected first-order change of the mean entropy
    (and its clip-low and clip-high parts). Monte Carlo: ``first_order`` = <dH/dtheta, step taken>;
    ``effect_low`` / ``effect_high`` = first-order change minus that of the same step (same samples)
    without clip-low / clip-high, paired and so far less noisy; ``realised`` = actual entropy change.
    """

    closed_form: float
    closed_form_low: float
    closed_form_high: float
    first_order: Estimate
    effect_low: Estimate
    effect_high: Estimate
    realised: Estimate


def check_step(
    old_logits: Tensor, logits: Tensor, config: LabConfig, replicates: int, generator: torch.Generator
) -> StepCheck:
    """Theorem 1 / 2 against Monte Carlo for the iterate ``logits`` of the update started at ``old_logits``.

    Each replicate draws one minibatch (``prompts / minibatches`` groups) from pi_old and takes one step
    of ``config.optimiser`` (pg or npg) from pi_k.
    """
    if config.optimiser == "adam":
        raise ValueError("the closed form covers pg and npg; Adam's step is not linear in the gradient")
    old = broadcast_policy(old_logits, replicates)
    current = broadcast_policy(logits, replicates)
    one_step = replace(config, prompts=config.prompts // config.minibatches, minibatches=1, passes=1)
    batch = sample_batch(old, one_step, generator)
    form = closed_form_step(
        SoftmaxState.from_logits(old_logits[None]),
        SoftmaxState.from_logits(logits[None]),
        config.clip,
        geometry=geometry_of(config),
        lr=config.lr,
        positive_part=config.reward.positive_part_mean(config.group_size),
    )
    before = current.entropy().mean(-1)

    def step(clip: ClipBounds) -> tuple[Tensor, Tensor]:
        moved = current.clone()
        first_order = FirstOrderChange(replicates, moved.logits.dtype)
        lab_update(moved, batch, one_step.with_clip(clip), observer=first_order)
        return first_order.first_order, moved.entropy().mean(-1) - before

    first_order, realised = step(config.clip)
    return StepCheck(
        closed_form=form.total.mean().item(),
        closed_form_low=form.effect_low.mean().item(),
        closed_form_high=form.effect_high.mean().item(),
        first_order=Estimate.from_samples(first_order),
        effect_low=Estimate.from_samples(first_order - step(config.clip.without_low())[0]),
        effect_high=Estimate.from_samples(first_order - step(config.clip.without_high())[0]),
        realised=Estimate.from_samples(realised),
    )


@dataclass(frozen=True)
class DriftEstimate:
    """Expected entropy change of one update from a given policy, and what clipping contributes to it.

    All values are nats per update, averaged over seeds (each seed: its own batch, the same start).

    - ``drift``: entropy after the update minus before, as configured.
    - ``effect_low`` / ``effect_high``: entropy after the update minus entropy after the same update
      (same samples) without clip-low / clip-high: the realised effect of each clip.
    - ``unclipped``: the drift of the same update with no clipping at all (second-order noise drift).
    - ``first_order``: sum over inner steps of <dH/dtheta, step>, the first-order part of ``drift``.
    - ``closed_form`` (+ ``_low``, ``_high``, ``_dual``): Theorem 1 / 2 summed along the inner iterates;
      None where the theorem does not apply (Adam, or more than one pass). It has the expectation of
      ``first_order`` when it applies.
    - ``sign_conditions``: Ineq. 7 at the iterates visited.
    """

    entropy_before: float
    drift: Estimate
    effect_low: Estimate
    effect_high: Estimate
    unclipped: Estimate
    first_order: Estimate
    closed_form: Estimate | None
    closed_form_low: float | None
    closed_form_high: float | None
    closed_form_dual: float | None
    clip_fractions: ClipFractions
    sign_conditions: SignConditions
    seeds: int

    def to_dict(self) -> dict[str, float | int | None]:
        """Flat JSON-ready dict: ``drift``, ``stderr``, ``effect_low``, ``effect_low_stderr``, ..."""
        flat: dict[str, float | int | None] = {
            "drift": self.drift.mean,
            "stderr": self.drift.stderr,
            "effect_low": self.effect_low.mean,
            "effect_low_stderr": self.effect_low.stderr,
            "effect_high": self.effect_high.mean,
            "effect_high_stderr": self.effect_high.stderr,
            "drift_unclipped": self.unclipped.mean,
            "drift_unclipped_stderr": self.unclipped.stderr,
            "first_order": self.first_order.mean,
            "first_order_stderr": self.first_order.stderr,
            "closed_form": None if self.closed_form is None else self.closed_form.mean,
            "closed_form_stderr": None if self.closed_form is None else self.closed_form.stderr,
            "closed_form_low": self.closed_form_low,
            "closed_form_high": self.closed_form_high,
            "closed_form_dual": self.closed_form_dual,
            "sign_condition_low": self.sign_conditions.low.fraction,
            "sign_condition_high": self.sign_conditions.high.fraction,
            "entropy_before": self.entropy_before,
            "seeds": self.seeds,
        }
        flat.update({f"clip_ratio_{side}": value for side, value in asdict(self.clip_fractions).items()})
        return flat


def update_drift(
    start: SoftmaxState,
    batch: Batch,
    config: LabConfig,
    observer: StepObserver | None = None,
    progress: Progress | None = None,
) -> tuple[Tensor, ClipFractions]:
    """Entropy change ``[S]`` of one update of a copy of ``start`` on ``batch``, with its clip fractions;
    the update is one ``progress`` unit."""
    policy = start.clone()
    fractions = lab_update(policy, batch, config, make_optimiser(policy, config), observer)
    drift = policy.entropy().mean(-1) - start.entropy().mean(-1)
    if progress is not None:
        progress(1)
    return drift, fractions


def counterfactuals(clip: ClipBounds) -> dict[str, ClipBounds]:
    """The settings :func:`estimate_drift` compares ``clip`` with (those that differ from it):
    ``without_low``, ``without_high`` and ``unclipped``."""
    candidates = {
        "without_low": clip.without_low(),
        "without_high": clip.without_high(),
        "unclipped": NO_CLIP,
    }
    return {name: other for name, other in candidates.items() if other != clip}


def estimate_drift(
    logits: Tensor,
    config: LabConfig,
    seeds: int,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> DriftEstimate:
    """Run one update on ``seeds`` independent batches, as configured and as each of its counterfactuals.

    One progress unit per update run: 1 + len(counterfactuals(config.clip)). All runs use the same
    batches, so the effects are paired differences, free of the sampling noise they share.
    """
    start = broadcast_policy(logits, seeds)
    batch = sample_batch(start, config, generator)
    theory = PathTheory(start, config)
    drift, fractions = update_drift(start, batch, config, theory, progress)
    drifts = {}
    for name, clip in counterfactuals(config.clip).items():
        drifts[name], _ = update_drift(start, batch, config.with_clip(clip), progress=progress)
    predicted = theory.predicted if config.theorem_applies else None
    low, high, dual = (None, None, None) if predicted is None else predicted.mean(0).tolist()
    return DriftEstimate(
        entropy_before=start.entropy().mean().item(),
        drift=Estimate.from_samples(drift),
        effect_low=Estimate.from_samples(drift - drifts.get("without_low", drift)),
        effect_high=Estimate.from_samples(drift - drifts.get("without_high", drift)),
        unclipped=Estimate.from_samples(drifts.get("unclipped", drift)),
        first_order=Estimate.from_samples(theory.first_order),
        closed_form=None if predicted is None else Estimate.from_samples(predicted.sum(-1)),
        closed_form_low=low,
        closed_form_high=high,
        closed_form_dual=dual,
        clip_fractions=fractions,
        sign_conditions=theory.signs,
        seeds=seeds,
    )


@dataclass(frozen=True)
class Trajectory:
    """Entropy over T updates across S seeds.

    ``entropy_mean``, ``entropy_ci`` (95% confidence interval of the mean, ``[T+1, 2]``) and
    ``entropy_band`` (2.5% and 97.5% quantiles of the seeds, ``[T+1, 2]``), index 0 = before any update;
    ``clip_fractions`` ``[T, 3]`` (low, high, dual); ``final_entropy`` ``[S]``. With ``track_theory``:
    ``first_order`` (mean over all seeds) and ``closed_form`` (mean over the tracked seeds, only where the
    theorem applies) of the per-update sums ``[T]``, ``sign_conditions`` and the first
    ``counterexample`` found.
    """

    entropy_mean: Tensor
    entropy_ci: Tensor
    entropy_band: Tensor
    clip_fractions: Tensor
    final_entropy: Tensor
    first_order: Tensor | None = None
    closed_form: Tensor | None = None
    sign_conditions: SignConditions | None = None
    counterexample: Counterexample | None = None

    @property
    def updates(self) -> int:
        """T, the number of updates run."""
        return self.clip_fractions.shape[0]


def simulate_trajectory(
    logits: Tensor,
    config: LabConfig,
    updates: int,
    seeds: int,
    generator: torch.Generator,
    *,
    track_theory: bool = False,
    theory_seeds: int | None = None,
    progress: Progress | None = None,
) -> Trajectory:
    """Run ``updates`` consecutive updates on ``seeds`` independent runs (one progress unit per update).

    ``track_theory`` evaluates the closed form and the sign conditions at every inner step, on the first
    ``theory_seeds`` seeds (all by default): several extra passes over their logits per step.
    """
    policy = broadcast_policy(logits, seeds)
    adam = make_optimiser(policy, config)
    quantiles = torch.tensor([0.025, 0.975], dtype=policy.logits.dtype)
    means, cis, bands, fractions, first_order, closed_form = [], [], [], [], [], []
    signs = SignConditions() if track_theory else None
    counterexample = None

    def record() -> Tensor:
        entropy = policy.entropy().mean(-1)
        mean, half_width = entropy.mean(), Z95 * entropy.std() / math.sqrt(seeds)
        means.append(mean)
        cis.append(torch.stack([mean - half_width, mean + half_width]))
        bands.append(torch.quantile(entropy, quantiles))
        return entropy

    entropy = record()
    for _ in range(updates):
        batch = sample_batch(policy, config, generator)
        theory = PathTheory(policy, config, signs, theory_seeds) if track_theory else None
        clipped = lab_update(policy, batch, config, adam, theory)
        fractions.append(torch.tensor([clipped.low, clipped.high, clipped.dual]))
        if theory is not None:
            first_order.append(theory.first_order.mean())
            closed_form.append(theory.predicted.sum(-1).mean())
            if counterexample is None:
                counterexample = theory.counterexample
        entropy = record()
        if progress is not None:
            progress(1)
    tracked = track_theory and updates > 0
    return Trajectory(
        entropy_mean=torch.stack(means),
        entropy_ci=torch.stack(cis),
        entropy_band=torch.stack(bands),
        clip_fractions=torch.stack(fractions) if fractions else torch.zeros(0, 3),
        final_entropy=entropy,
        first_order=torch.stack(first_order) if tracked else None,
        closed_form=torch.stack(closed_form) if tracked and config.theorem_applies else None,
        sign_conditions=signs,
        counterexample=counterexample,
    )
