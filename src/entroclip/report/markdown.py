"""The report.md writers: ``write_report`` (one run or several overlaid: a table with a column per run)
and ``write_study_report`` (settings x seeds: ``summary.json``, mean ± 95% interval tables, p-values).

Both draw their figures under ``out_dir/plots/`` and embed them with their captions; every file is
written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from entroclip.report.panels import RUN_PANELS, STUDY_PANELS, Panel
from entroclip.report.plots import plot_panels
from entroclip.report.quantities import HOLD_AFTER, HOLD_TOLERANCE, MEAN_METRICS, run_stats
from entroclip.report.summary import load_groups, summarize
from entroclip.runio import Run, atomic_write_text, config_value, load_runs

#: Folder of the PNGs, relative to the report's ``out_dir``.
PLOTS_DIR = "plots"


def _fmt(x: float | None) -> str:
    """Four significant digits, ``n/a`` for a missing number."""
    return "n/a" if x is None else f"{x:.4g}"


def _pm(mean: float | None, half: float | None) -> str:
    """``mean ± half`` (two digits of the half-width), the mean alone where there is no interval."""
    return _fmt(mean) if half is None or mean is None else f"{mean:.4g} ± {half:.2g}"


def _cell(text: str) -> str:
    """Escape ``|``, which would end a markdown table cell."""
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a markdown table."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


_ABSENT = object()  # tells a key missing from the config from one set to null (no clipping)


def _bound(config: Mapping[str, Any], key: str) -> str | None:
    """A clip bound's cell: ``off`` where it is null, None where the config lacks it."""
    value = config_value(config, key, _ABSENT)
    return None if value is _ABSENT else "off" if value is None else _fmt(value)


def _run_cells(run: Run, out_dir: Path) -> dict[str, str | None]:
    """Display cells of one run's column in the runs table, keyed by row name; None where missing."""
    st = run_stats(run.rows)
    seed, planned = config_value(run.config, "run.seed"), config_value(run.config, "run.steps")

    def num(x: float | None) -> str | None:
        return None if x is None else _fmt(x)

    def span(a: float | None, b: float | None) -> str | None:
        return None if a is None and b is None else f"{_fmt(a)} → {_fmt(b)}"

    best = st["passk_best"]
    return {
        "folder": f"`{os.path.relpath(run.path, out_dir)}`",
        "eps_low": _bound(run.config, "loss.eps_low"),
        "eps_high": _bound(run.config, "loss.eps_high"),
        "seed": None if seed is None else str(seed),
        "steps logged / configured": f"{_fmt(st['steps_logged'])} / {_fmt(planned)}",
        "rollout entropy, first → last step (nats)": span(st["rollout_start"], st["rollout_end"]),
        "probe entropy, start → end (nats)": span(st["entropy_start"], st["entropy_end"]),
        "probe entropy change (nats)": num(st["entropy_change"]),
        **{f"mean {key}": num(st[key]) for key in MEAN_METRICS},
        "final reward/mean": num(st["reward_final"]),
        "best pass@k": None
        if best is None
        else f"{_fmt(best)} (step {_fmt(st['passk_best_step'])}, k={_fmt(st['passk_k'])})",
    }


def _figures_md(drawn: Sequence[tuple[Panel, Path]], out_dir: Path, temperature: str) -> list[str]:
    """The Figures section: each drawn panel embedded by its path relative to ``out_dir``, captioned."""
    lines = ["## Figures", ""]
    for panel, path in drawn:
        rel = path.relative_to(out_dir).as_posix()
        lines += [
            f"### {panel.title}",
            "",
            f"![{panel.title}]({rel})",
            "",
            panel.caption.format(temperature=temperature),
            "",
        ]
    return lines


def _temperatures(runs: Sequence[Run]) -> str:
    """The sampling temperatures of ``runs`` for the captions, e.g. ``T = 0.7, 1``."""
    temps = sorted(
        {float(t) for r in runs if (t := config_value(r.config, "rollout.temperature")) is not None}
    )
    return "T = " + ", ".join(f"{t:g}" for t in temps) if temps else "T not recorded"


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    smooth: float = 0.0,
) -> Path:
    """Write ``out_dir/report.md`` and ``out_dir/plots/*.png`` for one run or several runs overlaid.

    The table has one column per run (clip bounds, seed, steps, entropy at the start and end, mean clip
    fractions and attribution terms, final reward, best pass@k); a row no run has data for is left out.
    """
    out_dir = Path(out_dir)
    runs = load_runs(run_dirs, labels)
    drawn = plot_panels(RUN_PANELS, {r.label: [r] for r in runs}, out_dir / PLOTS_DIR, smooth)
    cells = [_run_cells(run, out_dir) for run in runs]
    keys = [k for k in cells[0] if any(c[k] is not None for c in cells)] if cells else []
    lines = [f"# {title or 'entroclip report'}", "", "## Runs", ""]
    lines += _table(["", *(r.label for r in runs)], [[k, *(c[k] or "n/a" for c in cells)] for k in keys])
    lines += ["", *_figures_md(drawn, out_dir, _temperatures(runs))]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines))


def write_study_report(
    groups: Mapping[str, Sequence[str | Path]],
    out_dir: str | Path,
    title: str | None = None,
    baseline: str | None = None,
    smooth: float = 0.0,
    hold_after: int = HOLD_AFTER,
) -> Path:
    """Write ``summary.json`` (``summarize_study``), ``plots/*.png`` and ``report.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    loaded = load_groups(groups)
    summary = summarize(loaded, baseline, hold_after)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    drawn = plot_panels(STUDY_PANELS, loaded, out_dir / PLOTS_DIR, smooth)

    def eps(value: float | None) -> str:
        return "off" if value is None else _fmt(value)

    def p_cell(entry: dict[str, Any], key: str) -> list[str]:
        if baseline is None:
            return []
        p = entry[f"{key}_p"]
        if entry["label"] == baseline:
            return ["baseline"]
        return ["n/a" if p is None else "< 0.001" if p < 1e-3 else f"{p:.3f}"]

    def cells(entry: dict[str, Any], keys: Sequence[str]) -> list[str]:
        return [_pm(entry[k], entry[f"{k}_ci95"]) for k in keys]

    p_head = [f"p vs {baseline}"] if baseline is not None else []
    entropy_head = ["setting", "control", "eps_low", "eps_high", "seeds"]
    entropy_head += ["entropy start", "entropy end", "entropy change", *p_head]
    entropy_head += ["clip-low", "clip-high", "effect_low", "effect_high"]
    entropy_rows = [
        [
            e["label"],
            str(e["control"] or "n/a"),
            eps(e["eps_low"]),
            eps(e["eps_high"]),
            str(e["n_seeds"]),
            *cells(e, ("entropy_start", "entropy_end", "entropy_change")),
            *p_cell(e, "entropy_change"),
            *cells(e, ("clip_low", "clip_high", "effect_low", "effect_high")),
        ]
        for e in summary
    ]

    def hold_cell(entry: dict[str, Any]) -> str:
        if entry["hold_within"] is None:
            return "n/a"
        error = _pm(entry["hold_error"], entry["hold_error_ci95"])
        return f"{error} ({entry['hold_within']}/{entry['n_seeds']})"

    outcome_head = ["setting", "rollout entropy end", "final reward", "pass@1 final", *p_head, "pass@k final"]
    outcome_head += [f"hold error after step {hold_after} (seeds within {HOLD_TOLERANCE:.0%})"]
    outcome_rows = [
        [
            e["label"],
            *cells(e, ("rollout_end", "reward_final", "pass1_final")),
            *p_cell(e, "pass1_final"),
            *cells(e, ("passk_final",)),
            hold_cell(e),
        ]
        for e in summary
    ]
    all_runs = [r for runs in loaded.values() for r in runs]
    lines = [f"# {title or 'entroclip study'}", "", "## Entropy", "", *_table(entropy_head, entropy_rows), ""]
    lines += [
        "Each cell: mean over seeds ± the half-width of a 95% Student-t interval (n - 1 degrees of freedom); "
        "standard deviations are in `summary.json`. Entropy: probe entropy in nats, start = before the first "
        "update, end = after the last update, change = end - start per seed. Clip fractions and effect_* "
        "(first-order entropy attribution per unit lr): per-run means over steps."
        + (f" p: two-sided Welch t-test of the per-seed values against `{baseline}`." if baseline else ""),
        "",
        "## Outcome",
        "",
        *_table(outcome_head, outcome_rows),
        "",
        "Rollout entropy at the last step (nats); final reward: the last step's mean reward; pass@1 and "
        "pass@k: the last held-out evaluation. Hold error (controllers with a target): per seed, the largest "
        f"|H - target| / target of the rollout entropy H over the steps after step {hold_after}; in brackets "
        f"the seeds that stayed within {HOLD_TOLERANCE:.0%} of the target.",
        "",
        *_figures_md(drawn, out_dir, _temperatures(all_runs)),
        "## Runs",
        "",
        *(
            f"- {label}: " + ", ".join(f"`{os.path.relpath(r.path, out_dir)}`" for r in runs)
            for label, runs in loaded.items()
        ),
        "",
    ]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines))
