"""Least-squares slope of the per-seed probe-entropy change against one clip bound, the other held fixed.

    python scripts/study_trend.py runs/study/random

reads the sweep's summary.json and run folders and prints, for eps_low at eps_high = 0.2 and 0.28 and for
eps_high at eps_low = 0.2, the slope (nats per unit of eps), its 95% interval and the two-sided p-value
of a zero slope (Student t, n - 2 degrees of freedom).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from entroclip.report import run_stats, t_cdf, t_quantile
from entroclip.runio import read_metrics

AXES = (("eps_low", "eps_high", 0.2), ("eps_low", "eps_high", 0.28), ("eps_high", "eps_low", 0.2))


def slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, 95% half-width, p-value) of the least-squares line through (x, y)."""
    design = np.stack([np.ones_like(x), x], 1)
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    dof = len(x) - 2
    se = math.sqrt(((y - design @ beta) ** 2).sum() / dof / ((x - x.mean()) ** 2).sum())
    return float(beta[1]), t_quantile(0.975, dof) * se, 2.0 * (1.0 - t_cdf(abs(beta[1] / se), dof))


def main(sweep: Path) -> None:
    summary = json.loads((sweep / "summary.json").read_text())
    for varied, fixed, value in AXES:
        points = [
            (entry[varied], run_stats(read_metrics(Path(run)))["entropy_change"])
            for entry in summary
            if entry[fixed] == value and entry[varied] is not None
            for run in entry["runs"]
        ]
        if len({x for x, _ in points}) < 2:  # a sweep that does not vary this bound
            continue
        x, y = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        b, half, p = slope(x, y)
        print(f"{varied} at {fixed} = {value}: slope {b:+.3f} ± {half:.3f} nats per unit, ", end="")
        print(f"n = {len(x)}, p = {p:.2g}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
