"""Per-run quantities from a run's metric rows: the probe-entropy curve, start/end values, means over
steps, the final evaluation and a controller's hold error (see :func:`run_stats`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from entroclip import metrics as names
from entroclip.runio import metric_series

#: Metric rows of one run, sorted by step (``entroclip.runio.read_metrics``).
Rows = Sequence[Mapping[str, Any]]


def probe_entropy_curve(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Probe entropy over steps: the probe after update s at step s, and before the first update at s-1."""
    steps, after = metric_series(rows, "entropy/probe_after")
    first_steps, before = metric_series(rows, "entropy/probe_before")
    if len(steps) and len(before) and first_steps[0] - 1 < steps[0]:
        return np.concatenate([[first_steps[0] - 1], steps]), np.concatenate([[before[0]], after])
    return steps, after


#: ``run_stats`` keys averaged over steps -> the metric they average.
MEAN_METRICS = {
    "clip_low": names.CLIP_LOW,
    "clip_high": names.CLIP_HIGH,
    "clip_dual": names.CLIP_DUAL,
    "effect_low": "entropy/effect_low",
    "effect_high": "entropy/effect_high",
    "effect_dual": "entropy/effect_dual",
    "effect_pos": "entropy/effect_pos",
    "effect_neg": "entropy/effect_neg",
}


#: Steps a controller gets to reach its target before ``hold_error`` counts (the study's warm-up).
HOLD_AFTER = 20
#: Relative distance from the target within which a run counts as holding it.
HOLD_TOLERANCE = 0.1


def hold_error(rows: Rows, after: int = HOLD_AFTER) -> float | None:
    """Largest relative distance ``|H - target| / target`` of the rollout entropy H from the controller's
    ``control/target`` over the steps after ``after``; None for a run without a target (or no such steps)."""
    target_steps, target = metric_series(rows, "control/target")
    entropy_steps, entropy = metric_series(rows, "entropy/rollout")
    keep = (target_steps > after) & (target > 0) & np.isin(target_steps, entropy_steps)
    if not keep.any():
        return None
    h = entropy[np.isin(entropy_steps, target_steps[keep])]
    return float(np.max(np.abs(h - target[keep]) / target[keep]))


def run_stats(rows: Rows, hold_after: int = HOLD_AFTER) -> dict[str, float | None]:
    """Summary numbers of one run (None where its metrics are missing).

    ``entropy_start``/``entropy_end``: probe entropy before the first and after the last update;
    ``rollout_start``/``rollout_end``: rollout entropy at the first and last step; ``clip_*``/``effect_*``:
    means over steps; ``reward_final``: the last ``reward/mean``; ``pass1_final``/``passk_final``: the last
    evaluation; ``passk_best`` and its step; ``hold_error``: see :func:`hold_error`.
    """

    def pick(name: str, how: Callable[[np.ndarray, np.ndarray], float]) -> float | None:
        steps, values = metric_series(rows, name)
        return float(how(steps, values)) if len(values) else None

    first, last = (lambda s, v: v[0]), (lambda s, v: v[-1])
    start, end = pick("entropy/probe_before", first), pick("entropy/probe_after", last)
    return {
        "steps_logged": float(rows[-1]["step"]) if rows else None,
        "entropy_start": start,
        "entropy_end": end,
        "entropy_change": end - start if start is not None and end is not None else None,
        "rollout_start": pick("entropy/rollout", first),
        "rollout_end": pick("entropy/rollout", last),
        **{key: pick(name, lambda s, v: v.mean()) for key, name in MEAN_METRICS.items()},
        "reward_final": pick("reward/mean", last),
        "pass1_final": pick("eval/pass@1", last),
        "passk_final": pick("eval/pass@k", last),
        "hold_error": hold_error(rows, hold_after),
        "passk_best": pick("eval/pass@k", lambda s, v: v.max()),
        "passk_best_step": pick("eval/pass@k", lambda s, v: s[v.argmax()]),
        "passk_k": pick("eval/k", last),
    }
