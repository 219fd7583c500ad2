"""The figures: each ``Panel`` drawn as one PNG (matplotlib, no pyplot state) with a line per run or per
setting, a setting's line being the mean over its seeds with a band of one standard deviation."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from entroclip.report.panels import RUN_PANELS, STUDY_PANELS, Curve, Panel
from entroclip.report.summary import load_groups
from entroclip.runio import Run, atomic_write_bytes, load_runs

#: Line styles told apart in greyscale too; cycled over a panel's curves when several groups share it.
_LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))


@dataclass(frozen=True)
class Series:
    """One line: mean over a group's runs at the steps they all have, and its spread (None for one run)."""

    label: str
    steps: np.ndarray
    values: np.ndarray
    spread: np.ndarray | None
    color: str
    linestyle: Any


def ema(values: np.ndarray, alpha: float) -> np.ndarray:
    """Bias-corrected exponential moving average, weight ``alpha`` on the past (0: none); NaN skipped."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {alpha}")
    out = np.full(len(values), np.nan)
    acc = weight = 0.0
    for i, v in enumerate(values):
        if math.isfinite(v):
            acc, weight = alpha * acc + (1.0 - alpha) * v, alpha * weight + (1.0 - alpha)
        if weight > 0.0:
            out[i] = acc / weight
    return out


def _group_series(label: str, runs: Sequence[Run], curve: Curve, color: str, linestyle: Any) -> Series | None:
    """Mean over ``runs`` of ``curve`` at the steps all have (None if none); std (ddof 1) if several."""
    curves = [curve(run.rows) for run in runs]
    steps = reduce(np.intersect1d, [s for s, _ in curves])
    if not len(steps):
        return None
    stacked = np.stack([v[np.isin(s, steps)] for s, v in curves])
    spread = stacked.std(axis=0, ddof=1) if len(runs) > 1 else None
    return Series(label, steps, stacked.mean(axis=0), spread, color, linestyle)


def _panel_series(panel: Panel, groups: Mapping[str, Sequence[Run]]) -> list[Series]:
    """Colour by group when there are several (line style by curve), else by curve."""
    several = len(groups) > 1
    series = []
    for i, (group, runs) in enumerate(groups.items()):
        for j, (name, curve) in enumerate(panel.curves):
            label = group if len(panel.curves) == 1 else f"{group}: {name}" if several else name
            color = f"C{(i if several else j) % 10}"
            style = _LINESTYLES[j % len(_LINESTYLES)] if several else "-"
            found = _group_series(label, runs, curve, color, style)
            if found is not None:
                series.append(found)
    return series


def _draw(panel: Panel, series: Sequence[Series], path: Path, smooth: float) -> Path:
    """Write one PNG (8 x 4.5 in at 110 dpi) of ``series``, EMA-smoothed with weight ``smooth`` if > 0."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for s in series:
        shown = ema(s.values, smooth) if smooth else s.values
        marker = "o" if len(s.steps) <= 30 else None
        if smooth:
            ax.plot(s.steps, s.values, color=s.color, linestyle=s.linestyle, alpha=0.25, linewidth=0.8)
        ax.plot(
            s.steps, shown, color=s.color, linestyle=s.linestyle, marker=marker, markersize=3, label=s.label
        )
        if s.spread is not None:
            half = ema(s.spread, smooth) if smooth else s.spread
            ax.fill_between(s.steps, shown - half, shown + half, color=s.color, alpha=0.18, linewidth=0)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=1 if len(series) <= 8 else 2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


def plot_panels(
    panels: Sequence[Panel], groups: Mapping[str, Sequence[Run]], out_dir: Path, smooth: float
) -> list[tuple[Panel, Path]]:
    """Draw every panel that has data in some group; skip the rest."""
    drawn = []
    for panel in panels:
        series = _panel_series(panel, groups)
        if series:
            drawn.append((panel, _draw(panel, series, out_dir / f"{panel.name}.png", smooth)))
    return drawn


def plot_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    smooth: float = 0.0,
) -> list[Path]:
    """One PNG per panel (entropy, clip fractions, attribution, reward, pass@k, ratio), runs overlaid.

    ``smooth`` in [0, 1) is the EMA weight on the past; when > 0 the raw curves are drawn faintly behind.
    A panel none of the runs has metrics for is skipped.
    """
    runs = load_runs(run_dirs, labels)
    return [path for _, path in plot_panels(RUN_PANELS, {r.label: [r] for r in runs}, Path(out_dir), smooth)]


def plot_study(
    groups: Mapping[str, Sequence[str | Path]], out_dir: str | Path, smooth: float = 0.0
) -> list[Path]:
    """Probe entropy and clip fractions over steps per setting: mean over seeds, band of one std."""
    return [path for _, path in plot_panels(STUDY_PANELS, load_groups(groups), Path(out_dir), smooth)]
