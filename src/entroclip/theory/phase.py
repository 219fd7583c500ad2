"""Entropy drift over a grid of clip bounds, and the eps_low that holds entropy steady.

Both use common random numbers: every clip setting is applied to the same batches from the same start,
so the differences between settings carry no sampling noise of their own and the bisection on eps_low
searches one fixed function of eps_low.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
        drift, _ = update_drift(start, batch, config.with_clip(clip))
        if progress is not None:
            progress(1)
        return drift

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

    ``evaluations``: (eps_low, mean drift) pairs of the scan, the bisection and the root, sorted by
    eps_low, all on one set of batches; ``check``: the drift at ``eps_low`` on fresh, independent batches
    (its mean should be zero within its standard error, plus the search's own error).

    ``eps_low_stderr``: standard error of ``eps_low`` from the sampling noise of the search batches (delta
    method): the standard error of the mean drift at ``eps_low`` over the drift's slope there, taken as
    the secant over the scan interval that brackets the root. The bisection's tolerance adds at most half
    of itself.
    """

    eps_high: float | None
    eps_low: float
    eps_low_stderr: float
    evaluations: list[tuple[float, float]]
    check: Estimate


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
    """The largest eps_low in ``bracket`` where the drift crosses zero, with its standard error (one
    progress unit per update run).

    The drift is scanned at ``scan_points`` values from the top of the bracket down (eps_low = 1 never
    clips: ratios stay > 0; lowering it clips more negative-advantage samples), and the first sign change
    met is refined by bisection to ``tolerance``. The drift need not be monotone over the whole bracket:
    at eps_low near 0 clip-low also stops the push-down of frequent actions, which lowers entropy.
    ValueError when no sign change is found.
    """
    low, high = bracket
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"bracket must satisfy 0 <= low < high <= 1, got {bracket}")
    if scan_points < 2:
        raise ValueError(f"scan_points must be >= 2, got {scan_points}")
    start = broadcast_policy(logits, seeds)
    search = sample_batch(start, config, generator)
    evaluations: list[tuple[float, float]] = []

    def drift_at(eps_low: float, batch: Batch) -> Tensor:
        clip = ClipBounds(eps_low, eps_high, config.clip.dual_clip)
        drift, _ = update_drift(start, batch, config.with_clip(clip))
        if progress is not None:
            progress(1)
        return drift

    def search_drift(eps_low: float) -> float:
        mean = drift_at(eps_low, search).mean().item()
        evaluations.append((eps_low, mean))
        return mean

    scan = [
        (eps_low, search_drift(eps_low))
        for eps_low in torch.linspace(high, low, scan_points, dtype=torch.float64).tolist()
    ]
    crossings = [(a, b) for a, b in pairwise(scan) if (a[1] > 0) != (b[1] > 0)]
    if not crossings:
        top_low, top = max(scan, key=lambda point: point[1])
        raise ValueError(
            f"the drift does not change sign for eps_low in [{low}, {high}] at eps_high={eps_high}: "
            f"from {scan[0][1]:+.3g} to {scan[-1][1]:+.3g} nats per update over {scan_points} points, "
            f"highest {top:+.3g} at eps_low={top_low:.3g} (a narrow stretch of positive drift may show with "
            "more scan points or seeds)"
        )
    (upper, at_upper), (lower, at_lower) = crossings[0]
    slope = (at_upper - at_lower) / (upper - lower)
    for _ in range(bisection_steps((lower, upper), tolerance)):
        middle = (lower + upper) / 2
        at_middle = search_drift(middle)
        if (at_middle > 0) == (at_upper > 0):
            upper, at_upper = middle, at_middle
        else:
            lower = middle
    root = (lower + upper) / 2
    at_root = drift_at(root, search)
    evaluations.append((root, at_root.mean().item()))
    root_stderr = Estimate.from_samples(at_root).stderr / abs(slope)
    check = drift_at(root, sample_batch(start, config, generator))
    return Balance(eps_high, root, root_stderr, sorted(evaluations), Estimate.from_samples(check))


def bisection_steps(bracket: tuple[float, float], tolerance: float) -> int:
    """Number of halvings that shrink ``bracket`` below ``tolerance``."""
    return max(0, math.ceil(math.log2((bracket[1] - bracket[0]) / tolerance)))
