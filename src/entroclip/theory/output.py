"""What the ``entroclip theory`` commands show and write: progress and errors on stderr, one JSON object
or a text report on stdout, CSV tables and PNG figures (``theory.plots``) under ``--out``.

Each command's result is a :class:`Report`, which has all three forms; ``emit`` picks them.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from entroclip.consoles import unwrapped_console
from entroclip.theory import plots
from entroclip.theory.options import LabOptions
from entroclip.theory.phase import Balance, PhaseDiagram
from entroclip.theory.simulation import DriftEstimate, Estimate, Trajectory
from entroclip.theory.theorems import ConditionTally
from entroclip.theory.updates import LabConfig

stdout = unwrapped_console(stderr=False)
stderr = unwrapped_console()

BALANCE_COLUMNS = ("eps_high", "eps_low", "eps_low_stderr", "check_drift", "check_stderr")


def say(text: str) -> None:
    """Plain text on stdout (no rich markup: the lab's formulas contain brackets)."""
    stdout.print(text, markup=False, highlight=False)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (silent when stderr is not a terminal); yields ``advance(units)``."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda units: progress.advance(task, units)


@contextmanager
def lab_errors() -> Iterator[None]:
    """Report a diverged run or an impossible search as one line on stderr, exit code 1."""
    try:
        yield
    except (FloatingPointError, ValueError) as error:
        stderr.print(f"error: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from None


def print_json(payload: dict[str, Any]) -> None:
    typer.echo(json.dumps(_finite(payload), allow_nan=False))


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _estimate(estimate: Estimate | None) -> str:
    return "n/a" if estimate is None else f"{estimate.mean:+.4g} ± {1.96 * estimate.stderr:.2g}"


def _tally(tally: ConditionTally, cases: str) -> str:
    if not tally.total:
        return f"no {cases} cases"
    return f"held in {tally.fraction:.3f} of {tally.total} {cases} cases"


@dataclass(frozen=True)
class Report(ABC):
    """One command's result, for the experiment that ``options`` and ``config`` define."""

    options: LabOptions
    config: LabConfig

    def emit(self, as_json: bool) -> None:
        """The files first (under ``--out``, where given), then the JSON object or the text on stdout."""
        if self.options.out is not None:
            self.write(self.options.out, self.options.title(self.config))
        if as_json:
            print_json(self.summary())
        else:
            self.show()

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """The JSON object, with the settings that define the result."""

    @abstractmethod
    def write(self, out: Path, title: str) -> None:
        """The CSV tables, and the figure with this title, under ``out``."""

    @abstractmethod
    def show(self) -> None:
        """The text report on stdout."""


@dataclass(frozen=True)
class DriftReport(Report):
    """``entroclip theory drift``: the drift of one update, its parts and the closed form."""

    estimate: DriftEstimate

    def summary(self) -> dict[str, Any]:
        return {**self.estimate.to_dict(), "settings": self.options.settings(self.config)}

    def write(self, out: Path, title: str) -> None:
        """``drift.csv`` (one row: the estimate and its settings) and ``drift.png``."""
        row = {**self.estimate.to_dict(), **self.options.settings(self.config)}
        plots.write_csv(out / "drift.csv", list(row), [list(row.values())])
        plots.save_png(plots.drift_figure(self.estimate, title), out / "drift.png")

    def show(self) -> None:
        """A table of the drift, its parts and the closed form."""
        estimate = self.estimate
        table = Table(title=f"nats per update, mean ± 95% CI, {self.options.seeds} seeds")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        rows = {
            "entropy before": f"{estimate.entropy_before:.4f}",
            "drift": _estimate(estimate.drift),
            "  without any clipping": _estimate(estimate.unclipped),
            "  effect of clip-low": _estimate(estimate.effect_low),
            "  effect of clip-high": _estimate(estimate.effect_high),
            "first-order part": _estimate(estimate.first_order),
            "closed form (Theorem 1/2)": _estimate(estimate.closed_form),
            "clip fraction low / high": (
                f"{estimate.clip_fractions.low:.4f} / {estimate.clip_fractions.high:.4f}"
            ),
            "Ineq. 7 holds (low / high)": (
                f"{estimate.sign_conditions.low.fraction:.3f} / {estimate.sign_conditions.high.fraction:.3f}"
            ),
        }
        for name, value in rows.items():
            table.add_row(name, value)
        stdout.print(table)


@dataclass(frozen=True)
class TrajectoryReport(Report):
    """``entroclip theory trajectory``: entropy over the updates, Ineq. 7 on the first ``theory_seeds``."""

    result: Trajectory
    theory_seeds: int

    def summary(self) -> dict[str, Any]:
        """Entropy at the start and the end, clip ratios, Ineq. 7 and the counterexample, if any."""
        result, signs, example = self.result, self.result.sign_conditions, self.result.counterexample
        settings = self.options.settings(self.config)
        return {
            "entropy_start": result.entropy_mean[0].item(),
            "entropy_end": result.entropy_mean[-1].item(),
            "entropy_end_ci": result.entropy_ci[-1].tolist(),
            "mean_drift_per_update": (result.entropy_mean[-1] - result.entropy_mean[0]).item()
            / result.updates,
            "clip_ratio_low": result.clip_fractions[:, 0].mean().item(),
            "clip_ratio_high": result.clip_fractions[:, 1].mean().item(),
            "sign_condition_low": None if signs is None else signs.low.fraction,
            "sign_condition_high": None if signs is None else signs.high.fraction,
            "sign_condition_cases": None if signs is None else [signs.low.total, signs.high.total],
            "counterexample": (
                None
                if example is None
                else {
                    "side": example.side,
                    "event_probability": example.event_probability,
                    "gap": example.gap,
                }
            ),
            "settings": {**settings, "updates": result.updates, "theory_seeds": self.theory_seeds},
        }

    def write(self, out: Path, title: str) -> None:
        """``trajectory.csv`` (one row per update), ``counterexample.csv`` where one was found, and
        ``trajectory.png``."""
        result = self.result
        tracked = {"first_order": result.first_order, "closed_form": result.closed_form}
        rows = []
        for t in range(result.updates + 1):
            row = [
                t,
                result.entropy_mean[t].item(),
                *result.entropy_ci[t].tolist(),
                *result.entropy_band[t].tolist(),
            ]
            row += result.clip_fractions[t - 1].tolist() if t > 0 else [None, None, None]
            row += [None if series is None or t == 0 else series[t - 1].item() for series in tracked.values()]
            rows.append(row)
        header = ["update", "entropy_mean", "ci_low", "ci_high", "band_low", "band_high"]
        header += ["clip_ratio_low", "clip_ratio_high", "clip_ratio_dual", *tracked]
        plots.write_csv(out / "trajectory.csv", header, rows)
        example = result.counterexample
        if example is not None:
            log_ratio = example.log_probs - example.log_probs_old
            plots.write_csv(
                out / "counterexample.csv",
                ["action", "log_prob_old", "log_prob", "ratio", "side", "gap"],
                (
                    [a, old, new, math.exp(ratio), example.side, example.gap]
                    for a, (old, new, ratio) in enumerate(
                        zip(
                            example.log_probs_old.tolist(),
                            example.log_probs.tolist(),
                            log_ratio.tolist(),
                            strict=True,
                        )
                    )
                ),
            )
        plots.save_png(plots.trajectory_figure(result, title), out / "trajectory.png")

    def show(self) -> None:
        """Entropy at the start and the end, clip fractions, Ineq. 7 and the counterexample, if any."""
        result, summary, seeds, out = self.result, self.summary(), self.options.seeds, self.options.out
        say(
            f"entropy {summary['entropy_start']:.4f} -> {summary['entropy_end']:.4f} nats "
            f"in {result.updates} updates "
            f"(95% CI {result.entropy_ci[-1, 0]:.4f}..{result.entropy_ci[-1, 1]:.4f}, {seeds} seeds); "
            f"clip fractions low {summary['clip_ratio_low']:.4f}, high {summary['clip_ratio_high']:.4f}"
        )
        signs = result.sign_conditions
        if signs is not None:
            say(
                f"Ineq. 7: {_tally(signs.low, 'clip-low')}; {_tally(signs.high, 'clip-high')} "
                f"(inner steps x contexts of the first {min(self.theory_seeds, seeds)} seeds)"
            )
        example = result.counterexample
        if example is not None:
            say(
                f"counterexample ({example.side} side): P(event) = {example.event_probability:.4g}, "
                f"E[s] - E[s | event] = {example.gap:.4g} < 0"
                + (f"; written to {out / 'counterexample.csv'}" if out is not None else "")
            )


@dataclass(frozen=True)
class PhaseReport(Report):
    """``entroclip theory phase``: the drift over a grid of (eps_low, eps_high)."""

    diagram: PhaseDiagram

    def summary(self) -> dict[str, Any]:
        diagram = self.diagram
        return {
            "eps_low": diagram.eps_low.tolist(),
            "eps_high": diagram.eps_high.tolist(),
            "drift": diagram.drift.tolist(),
            "stderr": diagram.stderr.tolist(),
            "drift_unclipped": diagram.unclipped.mean,
            "drift_unclipped_stderr": diagram.unclipped.stderr,
            "settings": self.options.settings(self.config),
        }

    def write(self, out: Path, title: str) -> None:
        """``phase.csv`` (one row per grid cell) and ``phase.png``."""
        diagram = self.diagram
        rows = [
            [
                low,
                high,
                diagram.drift[i, j].item(),
                diagram.stderr[i, j].item(),
                diagram.clip_effect[i, j].item(),
            ]
            for i, low in enumerate(diagram.eps_low.tolist())
            for j, high in enumerate(diagram.eps_high.tolist())
        ]
        plots.write_csv(out / "phase.csv", ["eps_low", "eps_high", "drift", "stderr", "clip_effect"], rows)
        plots.save_png(plots.phase_figure(diagram, title), out / "phase.png")

    def show(self) -> None:
        """The drift as a table over the grid, in 1e-3 nats, and the unclipped drift."""
        diagram = self.diagram
        table = Table(title="drift per update (1e-3 nats); rows eps_low, columns eps_high")
        table.add_column("low \\ high")
        for high in diagram.eps_high.tolist():
            table.add_column(f"{high:.3g}", justify="right")
        for i, low in enumerate(diagram.eps_low.tolist()):
            table.add_row(f"{low:.3g}", *(f"{1e3 * value:+.2f}" for value in diagram.drift[i].tolist()))
        stdout.print(table)
        say(f"without clipping: {_estimate(diagram.unclipped)} nats per update")


@dataclass(frozen=True)
class BalanceReport(Report):
    """``entroclip theory balance``: the eps_low that holds entropy steady, one per eps_high."""

    results: Sequence[Balance]

    def rows(self) -> list[list[float | None]]:
        """One row of :data:`BALANCE_COLUMNS` per eps_high."""
        return [[b.eps_high, b.eps_low, b.eps_low_stderr, b.check.mean, b.check.stderr] for b in self.results]

    def summary(self) -> dict[str, Any]:
        return {
            "balance": [dict(zip(BALANCE_COLUMNS, row, strict=True)) for row in self.rows()],
            "settings": self.options.settings(self.config),
        }

    def write(self, out: Path, title: str) -> None:
        """``balance.csv`` (one row per eps_high), ``balance_search.csv`` (every drift the searches
        evaluated) and ``balance.png``."""
        plots.write_csv(out / "balance.csv", BALANCE_COLUMNS, self.rows())
        plots.write_csv(
            out / "balance_search.csv",
            ["eps_high", "eps_low", "drift"],
            ([b.eps_high, low, value] for b in self.results for low, value in b.evaluations),
        )
        plots.save_png(plots.balance_figure(self.results, title), out / "balance.png")

    def show(self) -> None:
        """One line per eps_high: the balance point and the drift there on fresh seeds."""
        for b in self.results:
            say(
                f"eps_high={b.eps_high}: eps_low={b.eps_low:.4f} ± {1.96 * b.eps_low_stderr:.2g} (95%) "
                f"holds entropy; drift there on fresh seeds {_estimate(b.check)} nats per update"
            )
