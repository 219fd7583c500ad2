"""CSV tables and PNG figures of the lab's results, each written atomically (temporary file, rename).

Figures use matplotlib's object API (``Figure``, rendered by Agg), so no global backend is touched.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from entroclip.runio import atomic_write_bytes, atomic_write_text
from entroclip.theory.phase import Balance, PhaseDiagram
from entroclip.theory.simulation import DriftEstimate, Trajectory


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """One CSV file with a header row; None is written as an empty field."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if value is None else value for value in row] for row in rows)
    return atomic_write_text(path, buffer.getvalue())


def save_png(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def drift_figure(estimate: DriftEstimate, title: str) -> Figure:
    """Bars: drift, its unclipped part and the two clip effects (95% intervals), with the closed form."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    bars = {
        "drift": estimate.drift,
        "unclipped": estimate.unclipped,
        "clip-low effect": estimate.effect_low,
        "clip-high effect": estimate.effect_high,
    }
    axes.bar(
        list(bars),
        [e.mean for e in bars.values()],
        yerr=[1.96 * e.stderr for e in bars.values()],
        color=["tab:gray", "tab:olive", "tab:blue", "tab:red"],
        capsize=4,
    )
    if estimate.closed_form is not None:
        marks = [estimate.closed_form.mean, None, estimate.closed_form_low, estimate.closed_form_high]
        axes.scatter(
            [i for i, mark in enumerate(marks) if mark is not None],
            [mark for mark in marks if mark is not None],
            marker="D",
            color="black",
            zorder=3,
            label="closed form (first order)",
        )
        axes.legend()
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_ylabel("entropy change per update (nats)")
    axes.set_title(title)
    return figure


def trajectory_figure(trajectory: Trajectory, title: str) -> Figure:
    """Mean entropy with its 95% confidence band and the 2.5-97.5% band of the seeds."""
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    steps = range(trajectory.entropy_mean.numel())
    axes.fill_between(steps, *trajectory.entropy_band.T.tolist(), alpha=0.2, label="seeds, 2.5-97.5%")
    axes.fill_between(steps, *trajectory.entropy_ci.T.tolist(), alpha=0.5, label="mean, 95% CI")
    axes.plot(steps, trajectory.entropy_mean.tolist(), color="black", linewidth=1.2, label="mean")
    axes.set_xlabel("update")
    axes.set_ylabel("entropy (nats, mean over contexts)")
    axes.set_title(title)
    axes.legend()
    return figure


def phase_figure(diagram: PhaseDiagram, title: str) -> Figure:
    """Heat map of the drift over (eps_high, eps_low): its zero contour (entropy held) and the contour
    where clip-low and clip-high cancel (drift equal to the unclipped drift)."""
    figure = Figure(figsize=(6.5, 5))
    axes = figure.subplots()
    x, y = diagram.eps_high.numpy(), diagram.eps_low.numpy()
    drift = diagram.drift.numpy()
    limit = float(abs(drift).max()) or 1.0
    mesh = axes.pcolormesh(x, y, drift, cmap="coolwarm", vmin=-limit, vmax=limit, shading="nearest")
    figure.colorbar(mesh, ax=axes, label="entropy change per update (nats)")
    if len(x) > 1 and len(y) > 1:
        handles = []
        contours: tuple[tuple[np.ndarray, Literal["-", "--"], str], ...] = (
            (drift, "-", "drift = 0"),
            (diagram.clip_effect.numpy(), "--", "clips cancel"),
        )
        for field, style, label in contours:
            if field.min() < 0 < field.max():
                axes.contour(x, y, field, levels=[0.0], colors="black", linestyles=style)
                handles.append(Line2D([], [], color="black", linestyle=style, label=label))
        if handles:
            axes.legend(handles=handles, loc="upper left")
    axes.set_xlabel("eps_high")
    axes.set_ylabel("eps_low")
    axes.set_title(title)
    return figure


def balance_figure(balances: Sequence[Balance], title: str) -> Figure:
    """Drift against eps_low for each eps_high, with the balance point (95% interval) and its independent
    check (95% interval)."""
    figure = Figure(figsize=(6.5, 4))
    axes = figure.subplots()
    for balance in balances:
        eps_lows, drifts = zip(*balance.evaluations, strict=True)
        line = axes.plot(eps_lows, drifts, marker=".", label=f"eps_high = {balance.eps_high}")[0]
        axes.errorbar(
            [balance.eps_low],
            [balance.check.mean],
            xerr=[1.96 * balance.eps_low_stderr],
            yerr=[1.96 * balance.check.stderr],
            marker="o",
            color=line.get_color(),
            capsize=4,
        )
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("eps_low")
    axes.set_ylabel("entropy change per update (nats)")
    axes.set_title(title)
    axes.legend()
    return figure
