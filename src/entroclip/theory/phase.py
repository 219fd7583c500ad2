"""Entropy drift over a grid of clip bounds, and the eps_low that holds entropy steady.

Both use common random numbers: every clip setting is applied to the same batches from the same start,
so the differences between settings carry no sampling noise of their own and the bisection on eps_low
searches one fixed function of eps_low.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from entroclip.theory.simulation import Estimate, Progress, broadcast_policy, update_drift
from entroclip.theory.updates import NO_CLIP, Batch, ClipBounds, LabConfig, sample_batch


@dataclass(frozen=True)
class PhaseDiagram:
    """Mean entropy change per update over ``eps_low`` ``[L]`` x ``eps_high`` ``[M]`` (nats).

    ``drift`` and ``stderr`` are ``[L, M]``; ``unclipped`` is the drift of the same update without any
    clipping. ``clip_effect = drift - unclipped``: where it is zero, clip-low and clip-high cancel.
    """

    eps_low: Tensor
    eps_high: Tensor
    drift: Tensor
    stderr: Tensor
    unclipped: Estimate

    @property
    def clip_effect(self) -> Tensor:
        return self.drift - self.unclipped.mean


def phase_diagram(
    logits: Tensor,
    config: LabConfig,
    eps_lows: Sequence[float],
    eps_highs: Sequence[float],
    seeds: int,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> PhaseDiagram:
    """Drift of one update from ``logits`` ``[K, n]`` at every (eps_low, eps_high) (one progress unit each,
    plus one for the unclipped update). ``config.clip.dual_clip`` is kept throughout."""
    start = broadcast_policy(logits, seeds)
    batch = sample_batch(start, config, generator)

    def drift_at(clip: ClipBounds) -> Tensor:
        return update_drift(start, batch, config.with_clip(clip), progress=progress)[0]

    unclipped = Estimate.from_samples(drift_at(NO_CLIP))
    means = torch.empty(len(eps_lows), len(eps_highs), dtype=torch.float64)
    stderrs = torch.empty_like(means)
    for i, eps_low in enumerate(eps_lows):
        for j, eps_high in enumerate(eps_highs):
            estimate = Estimate.from_samples(drift_at(ClipBounds(eps_low, eps_high, config.clip.dual_clip)))
            means[i, j], stderrs[i, j] = estimate.mean, estimate.stderr
    return PhaseDiagram(
        torch.tensor(eps_lows, dtype=torch.float64),
        torch.tensor(eps_highs, dtype=torch.float64),
        means,
        stderrs,
        unclipped,
    )


@dataclass(frozen=True)
class Balance:
    """The eps_low at which one update leaves the expected entropy unchanged, for a given eps_high.

    ``evaluations``: (eps_low, mean drift) pairs of the search and of the root, sorted by eps_low, all on
    one set of batches; ``check``: the drift at ``eps_low`` on fresh, independent batches (its mean should
    be zero within its standard error, plus the search's own error).

    ``eps_low_stderr``: standard error of ``eps_low`` from the sampling noise of the search batches (delta
    method): the standard error of the mean drift at ``eps_low`` over the drift's slope there, taken as
    the secant over the interval that first bracketed the root. The bisection's tolerance adds at most
    half of itself.
    """

    eps_high: float | None
    eps_low: float
    eps_low_stderr: float
    evaluations: list[tuple[float, float]]
    check: Estimate


#: Evaluations of the golden-section search for a drift maximum between scan points.
PEAK_STEPS = 8


@dataclass(frozen=True)
class Crossing:
    """A zero of the drift found by :func:`largest_crossing`: ``root`` and the secant ``slope`` (nats per
    update per unit of eps_low) over the interval that first bracketed it."""

    root: float
    slope: float


def largest_crossing(
    drift: Callable[[float], float],
    bracket: tuple[float, float] = (0.0, 1.0),
    scan_points: int = 11,
    tolerance: float = 1e-3,
) -> Crossing:
    """The largest eps_low in ``bracket`` where ``drift(eps_low)`` crosses zero.

    The drift is scanned at ``scan_points`` values from the top of the bracket down, and the first sign
    change met is refined by bisection to ``tolerance``. Where every scanned value is negative, a
    positive stretch narrower than the scan's spacing is looked for: a golden-section search
    (``PEAK_STEPS`` evaluations) for the maximum between the neighbours of the highest scanned value; a
    positive maximum brackets the crossing with the scan point above it. ValueError when no sign change
    is found. At most ``search_runs(scan_points, tolerance)`` calls of ``drift``.
    """
    low, high = bracket
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"bracket must satisfy 0 <= low < high <= 1, got {bracket}")
    if scan_points < 2:
        raise ValueError(f"scan_points must be >= 2, got {scan_points}")
    scan = [
        (eps_low, drift(eps_low))
        for eps_low in torch.linspace(high, low, scan_points, dtype=torch.float64).tolist()
    ]
    crossings = [(a, b) for a, b in pairwise(scan) if (a[1] > 0) != (b[1] > 0)]
    top = max(range(scan_points), key=lambda i: scan[i][1])
    highest = scan[top]
    if not crossings and highest[1] <= 0:
        between = (scan[min(top + 1, scan_points - 1)][0], scan[max(top - 1, 0)][0])
        highest = max(highest, _golden_section_maximum(drift, between, PEAK_STEPS), key=lambda p: p[1])
        if highest[1] > 0:
            above = min((point for point in scan if point[0] > highest[0]), key=lambda point: point[0])
            crossings = [(above, highest)]
    if not crossings:
        raise ValueError(
            f"the drift does not change sign for eps_low in [{low}, {high}]: from {scan[0][1]:+.3g} to "
            f"{scan[-1][1]:+.3g} nats per update over {scan_points} points, highest "
            f"{highest[1]:+.3g} at eps_low={highest[0]:.3g}"
        )
    (upper, at_upper), (lower, at_lower) = crossings[0]
    slope = (at_upper - at_lower) / (upper - lower)
    for _ in range(bisection_steps((lower, upper), tolerance)):
        middle = (lower + upper) / 2
        at_middle = drift(middle)
        if (at_middle > 0) == (at_upper > 0):
            upper, at_upper = middle, at_middle
        else:
            lower = middle
    return Crossing((lower + upper) / 2, slope)


def _golden_section_maximum(
    function: Callable[[float], float], interval: tuple[float, float], evaluations: int
) -> tuple[float, float]:
    """(x, function(x)) of the highest point a golden-section search for a maximum in ``interval``
    evaluates, after ``evaluations`` (>= 2) calls."""
    a, b = interval
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    at_c, at_d = function(c), function(d)
    evaluated = [(c, at_c), (d, at_d)]
    for _ in range(evaluations - 2):
        if at_c < at_d:  # the maximum is in [c, b]
            a, c, at_c = c, d, at_d
            d = a + ratio * (b - a)
            at_d = function(d)
            evaluated.append((d, at_d))
        else:  # in [a, d]
            b, d, at_d = d, c, at_c
            c = b - ratio * (b - a)
            at_c = function(c)
            evaluated.append((c, at_c))
    return max(evaluated, key=lambda point: point[1])


def search_runs(scan_points: int, tolerance: float, bracket: tuple[float, float] = (0.0, 1.0)) -> int:
    """Upper bound on the calls of the drift by :func:`largest_crossing`."""
    spacing = (bracket[1] - bracket[0]) / (scan_points - 1)
    return scan_points + PEAK_STEPS + bisection_steps((0.0, spacing), tolerance)


def balance_runs(scan_points: int, tolerance: float, bracket: tuple[float, float] = (0.0, 1.0)) -> int:
    """Update runs (progress units) of :func:`balance_eps_low`: the search's, the root's on the search
    batches and the check on fresh ones."""
    return search_runs(scan_points, tolerance, bracket) + 2


def balance_eps_low(
    logits: Tensor,
    config: LabConfig,
    eps_high: float | None,
    seeds: int,
    generator: torch.Generator,
    *,
    bracket: tuple[float, float] = (0.0, 1.0),
    scan_points: int = 11,
    tolerance: float = 1e-3,
    progress: Progress | None = None,
) -> Balance:
    """The largest eps_low in ``bracket`` where the drift of one update from ``logits`` crosses zero
    (:func:`largest_crossing` on one set of batches), with its standard error, and a check on fresh
    batches. One progress unit per update run, :func:`balance_runs` in all.

    The drift need not be monotone in eps_low: eps_low = 1 never clips (ratios stay > 0) and lowering it
    clips more negative-advantage samples, but near 0 clip-low also stops the push-down of frequent
    actions, which lowers entropy.
    """
    start = broadcast_policy(logits, seeds)
    search = sample_batch(start, config, generator)
    evaluations: list[tuple[float, float]] = []

    def drift_at(eps_low: float, batch: Batch) -> Tensor:
        clip = ClipBounds(eps_low, eps_high, config.clip.dual_clip)
        return update_drift(start, batch, config.with_clip(clip), progress=progress)[0]

    def search_drift(eps_low: float) -> float:
        mean = drift_at(eps_low, search).mean().item()
        evaluations.append((eps_low, mean))
        return mean

    try:
        crossing = largest_crossing(search_drift, bracket, scan_points, tolerance)
    except ValueError as error:
        raise ValueError(f"at eps_high={eps_high}: {error}") from None
    if progress is not None:  # the runs that this search did not need
        progress(search_runs(scan_points, tolerance, bracket) - len(evaluations))
    at_root = drift_at(crossing.root, search)
    evaluations.append((crossing.root, at_root.mean().item()))
    root_stderr = Estimate.from_samples(at_root).stderr / abs(crossing.slope)
    check = drift_at(crossing.root, sample_batch(start, config, generator))
    return Balance(eps_high, crossing.root, root_stderr, sorted(evaluations), Estimate.from_samples(check))


def bisection_steps(bracket: tuple[float, float], tolerance: float) -> int:
    """Number of halvings that shrink ``bracket`` below ``tolerance``."""
    return max(0, math.ceil(math.log2((bracket[1] - bracket[0]) / tolerance)))
