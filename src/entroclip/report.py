"""PNG plots and markdown reports of run folders: one run, several runs overlaid, or a study.

A study is settings x seeds, e.g. ``{"clip-high only": [seed0, seed1, seed2], "0.2/0.28": [...]}``.
Its numbers are per-seed quantities (probe entropy at the start and the end, mean clip fractions, mean
attribution terms) averaged over seeds, with their standard deviation and a 95% Student-t interval;
its plots show the mean over seeds with a band of one standard deviation.

Every figure, table and JSON file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial, reduce
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from entroclip.runio import (
    Run,
    atomic_write_bytes,
    atomic_write_text,
    config_value,
    load_runs,
    metric_series,
)

Rows = Sequence[Mapping[str, Any]]
Curve = Callable[[Rows], tuple[np.ndarray, np.ndarray]]
PLOTS_DIR = "plots"

# ---------------------------------------------------------------------------------------------------------
# Statistics (no scipy): Student t via the regularized incomplete beta function, Welch's test.


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` > 0 degrees of freedom (not necessarily integer)."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t: the ``t`` with ``t_cdf(t, df) == p`` (``t_quantile(0.975, 2)`` = 4.303)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def describe(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """``(mean, std, ci95)`` of the finite values: sample std (n-1) and the 95% t-interval half-width.

    ``None`` where undefined (no values; std and interval need two).
    """
    xs = [float(v) for v in values if math.isfinite(v)]
    if not xs:
        return None, None, None
    if len(xs) < 2:
        return xs[0], None, None
    std = statistics.stdev(xs)
    return statistics.fmean(xs), std, t_quantile(0.975, len(xs) - 1) * std / math.sqrt(len(xs))


@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of ``mean(a) - mean(b)``; ``t``/``df``/``p`` None where undefined."""

    diff: float
    t: float | None
    df: float | None
    p: float | None


def welch_test(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """Two-sided Welch t-test; needs two values per side and a non-zero standard error."""
    if len(a) < 2 or len(b) < 2:
        diff = statistics.fmean(a) - statistics.fmean(b) if a and b else math.nan
        return WelchResult(diff, None, None, None)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0.0:
        return WelchResult(diff, None, None, None)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return WelchResult(diff, t, df, _betainc(df / 2.0, 0.5, df / (df + t * t)))


# ---------------------------------------------------------------------------------------------------------
# Per-run quantities.


def probe_entropy_curve(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Probe entropy over steps: the probe after update s at step s, and before the first update at s-1."""
    steps, after = metric_series(rows, "entropy/probe_after")
    first_steps, before = metric_series(rows, "entropy/probe_before")
    if len(steps) and len(before) and first_steps[0] - 1 < steps[0]:
        return np.concatenate([[first_steps[0] - 1], steps]), np.concatenate([[before[0]], after])
    return steps, after


_MEANS = {
    "clip_low": "clip_ratio/low_mean",
    "clip_high": "clip_ratio/high_mean",
    "clip_dual": "clip_ratio/dual_mean",
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
        **{key: pick(name, lambda s, v: v.mean()) for key, name in _MEANS.items()},
        "reward_final": pick("reward/mean", last),
        "pass1_final": pick("eval/pass@1", last),
        "passk_final": pick("eval/pass@k", last),
        "hold_error": hold_error(rows, hold_after),
        "passk_best": pick("eval/pass@k", lambda s, v: v.max()),
        "passk_best_step": pick("eval/pass@k", lambda s, v: s[v.argmax()]),
        "passk_k": pick("eval/k", last),
    }


# ---------------------------------------------------------------------------------------------------------
# Figures: one helper draws every panel, for runs (groups of one) and for settings (groups of seeds).


def _metric(name: str) -> Curve:
    return partial(metric_series, name=name)


@dataclass(frozen=True)
class Panel:
    """One PNG: the curves it overlays for every run or setting, and the caption under it in reports."""

    name: str
    title: str
    ylabel: str
    curves: tuple[tuple[str, Curve], ...]
    caption: str


RUN_PANELS = (
    Panel(
        "entropy",
        "Policy entropy",
        "entropy (nats)",
        (
            ("rollout", _metric("entropy/rollout")),
            ("probe before update", _metric("entropy/probe_before")),
            ("probe after update", _metric("entropy/probe_after")),
        ),
        "Rollout entropy: the pre-update (sampling) policy, exact over the full vocabulary at the sampling "
        "temperature ({temperature}), averaged over the sampled response positions. Probe entropy: exact, "
        "full vocabulary, on the same fixed probe prompts and continuations at every step, measured with the "
        "policy just before and just after each update.",
    ),
    Panel(
        "clip_fractions",
        "Clip fractions",
        "fraction of response tokens",
        (
            ("clip-low", _metric("clip_ratio/low_mean")),
            ("clip-high", _metric("clip_ratio/high_mean")),
            ("dual-clip", _metric("clip_ratio/dual_mean")),
        ),
        "Sign-gated clip fractions over the update's response tokens: clip-low (A < 0, r < 1 - eps_low), "
        "clip-high (A > 0, r > 1 + eps_high), dual-clip (A < 0, r > c).",
    ),
    Panel(
        "attribution",
        "Entropy attribution (first order, per unit lr)",
        "entropy change per unit lr",
        (
            ("effect_low", _metric("entropy/effect_low")),
            ("effect_high", _metric("entropy/effect_high")),
            ("effect_dual", _metric("entropy/effect_dual")),
            ("effect_pos", _metric("entropy/effect_pos")),
            ("effect_neg", _metric("entropy/effect_neg")),
        ),
        "First-order entropy change per unit learning rate at the updated response tokens, each token "
        "treated as having its own logits (a per-token proxy): effect_low/high/dual is the change caused "
        "by clipping those tokens (theory: effect_low >= 0, effect_high <= 0 in expectation), "
        "effect_pos/neg the change from the unclipped A > 0 / A < 0 tokens.",
    ),
    Panel(
        "reward",
        "Reward",
        "mean reward",
        (("reward/mean", _metric("reward/mean")),),
        "Mean reward of the rollout batch sampled by the pre-update policy.",
    ),
    Panel(
        "pass_at_k",
        "Held-out pass@k",
        "pass rate",
        (("pass@1", _metric("eval/pass@1")), ("pass@k", _metric("eval/pass@k"))),
        "pass@1 and unbiased pass@k on held-out prompts at the evaluation steps (k: see the runs table).",
    ),
    Panel(
        "ratio",
        "Importance ratio r = pi_new / pi_old",
        "ratio",
        (
            ("mean", _metric("ratio/mean")),
            ("min", _metric("ratio/min")),
            ("max", _metric("ratio/max")),
        ),
        "Importance ratios over the update's response tokens (mean, min and max over all minibatches).",
    ),
)

STUDY_PANELS = (
    Panel(
        "probe_entropy",
        "Probe entropy per setting",
        "entropy (nats)",
        (("probe entropy", probe_entropy_curve),),
        "Probe entropy (exact, full vocabulary, the same fixed probe prompts and continuations throughout): "
        "mean over seeds (line) and one standard deviation across seeds (band); step 0 is the policy before "
        "the first update, step s the policy after update s.",
    ),
    Panel(
        "rollout_entropy",
        "Rollout entropy per setting",
        "entropy (nats)",
        (("rollout entropy", _metric("entropy/rollout")), ("target", _metric("control/target"))),
        "Rollout entropy (exact, full vocabulary, at the sampling temperature, {temperature}) of the policy "
        "that sampled each step's batch, over its response tokens; the quantity the controllers hold (their "
        "target dashed). Mean over seeds (line), one standard deviation across seeds (band).",
    ),
    Panel(
        "clip_fractions",
        "Clip fractions per setting",
        "fraction of response tokens",
        (("clip-low", _metric("clip_ratio/low_mean")), ("clip-high", _metric("clip_ratio/high_mean"))),
        "Sign-gated clip-low and clip-high fractions of the update's response tokens: mean over seeds (line) "
        "and one standard deviation across seeds (band).",
    ),
    Panel(
        "reward",
        "Reward per setting",
        "mean reward",
        (("reward", _metric("reward/mean")),),
        "Mean reward of each step's rollout batch: mean over seeds (line), one standard deviation (band).",
    ),
    Panel(
        "pass_at_1",
        "Held-out pass@1 per setting",
        "pass@1",
        (("pass@1", _metric("eval/pass@1")),),
        "pass@1 on held-out prompts at the evaluation steps: mean over seeds, one standard deviation (band).",
    ),
    Panel(
        "pass_at_k",
        "Held-out pass@k per setting",
        "pass@k",
        (("pass@k", _metric("eval/pass@k")),),
        "Unbiased pass@k on held-out prompts at the evaluation steps: mean over seeds, one standard "
        "deviation across seeds (band).",
    ),
    Panel(
        "eps_low",
        "eps_low per setting",
        "eps_low",
        (("eps_low", _metric("control/eps_low")),),
        "The clip-low bound each step's update used (moved by the clip_low controller, fixed otherwise).",
    ),
    Panel(
        "entropy_coef",
        "Entropy-bonus coefficient per setting",
        "coefficient",
        (("entropy coef", _metric("control/entropy_coef")),),
        "The entropy-bonus coefficient each step's update used (adapted by the entropy_bonus controller).",
    ),
)

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


def _plot_panels(
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
    return [path for _, path in _plot_panels(RUN_PANELS, {r.label: [r] for r in runs}, Path(out_dir), smooth)]


# ---------------------------------------------------------------------------------------------------------
# Markdown.


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _pm(mean: float | None, half: float | None) -> str:
    return _fmt(mean) if half is None or mean is None else f"{mean:.4g} ± {half:.2g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


_ABSENT = object()


def _bound(config: Mapping[str, Any], key: str) -> str | None:
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
        **{f"mean {key}": num(st[key]) for key in _MEANS},
        "final reward/mean": num(st["reward_final"]),
        "best pass@k": None
        if best is None
        else f"{_fmt(best)} (step {_fmt(st['passk_best_step'])}, k={_fmt(st['passk_k'])})",
    }


def _figures_md(drawn: Sequence[tuple[Panel, Path]], out_dir: Path, temperature: str) -> list[str]:
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
    drawn = _plot_panels(RUN_PANELS, {r.label: [r] for r in runs}, out_dir / PLOTS_DIR, smooth)
    cells = [_run_cells(run, out_dir) for run in runs]
    keys = [k for k in cells[0] if any(c[k] is not None for c in cells)] if cells else []
    lines = [f"# {title or 'entroclip report'}", "", "## Runs", ""]
    lines += _table(["", *(r.label for r in runs)], [[k, *(c[k] or "n/a" for c in cells)] for k in keys])
    lines += ["", *_figures_md(drawn, out_dir, _temperatures(runs))]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------
# Studies: settings x seeds.

SUMMARY_KEYS = (
    "entropy_start",
    "entropy_end",
    "entropy_change",
    "clip_low",
    "clip_high",
    "effect_low",
    "effect_high",
    "rollout_end",
    "reward_final",
    "pass1_final",
    "passk_final",
    "hold_error",
)
#: Per-seed quantities tested against the baseline setting (Welch), reported as ``<key>_p``.
TESTED_KEYS = ("entropy_change", "pass1_final")


def _load_groups(groups: Mapping[str, Sequence[str | Path]]) -> dict[str, list[Run]]:
    if not groups:
        raise ValueError("a study needs at least one setting")
    empty = [label for label, dirs in groups.items() if not dirs]
    if empty:
        raise ValueError(f"settings without run folders: {empty}")
    return {label: load_runs(dirs) for label, dirs in groups.items()}


def _values(stats: Sequence[Mapping[str, float | None]], key: str) -> list[float]:
    """One quantity of ``run_stats`` over the runs that have it."""
    return [v for s in stats if (v := s[key]) is not None]


def _summarize(
    loaded: Mapping[str, Sequence[Run]], baseline: str | None, hold_after: int
) -> list[dict[str, Any]]:
    if baseline is not None and baseline not in loaded:
        raise ValueError(f"baseline {baseline!r} is not one of the settings {list(loaded)}")
    stats = {label: [run_stats(r.rows, hold_after) for r in runs] for label, runs in loaded.items()}
    summary = []
    for label, runs in loaded.items():
        bounds = {
            (config_value(r.config, "loss.eps_low"), config_value(r.config, "loss.eps_high")) for r in runs
        }
        if len(bounds) > 1:
            raise ValueError(
                f"setting {label!r} mixes clip bounds (eps_low, eps_high) across seeds: {bounds}"
            )
        ((eps_low, eps_high),) = bounds
        entry: dict[str, Any] = {
            "label": label,
            "eps_low": eps_low,
            "eps_high": eps_high,
            "n_seeds": len(runs),
            "seeds": [config_value(r.config, "run.seed") for r in runs],
            "runs": [str(r.path) for r in runs],
            "control": config_value(runs[0].config, "control.kind"),
        }
        for key in SUMMARY_KEYS:
            mean, std, ci95 = describe(_values(stats[label], key))
            entry.update({key: mean, f"{key}_std": std, f"{key}_ci95": ci95})
        errors = _values(stats[label], "hold_error")
        entry["hold_within"] = sum(e <= HOLD_TOLERANCE for e in errors) if errors else None
        for key in TESTED_KEYS:
            entry[f"{key}_p"] = None
            if baseline is not None and label != baseline:
                entry[f"{key}_p"] = welch_test(_values(stats[label], key), _values(stats[baseline], key)).p
        summary.append(entry)
    return summary


def summarize_study(
    groups: Mapping[str, Sequence[str | Path]], baseline: str | None = None, hold_after: int = HOLD_AFTER
) -> list[dict[str, Any]]:
    """One object per setting: clip bounds (None: not clipped), control kind, seeds, and for each of
    ``SUMMARY_KEYS`` the mean over seeds, ``*_std`` and ``*_ci95`` (95% t-interval half-width);
    ``hold_within``: seeds whose ``hold_error`` (after step ``hold_after``) is at most ``HOLD_TOLERANCE``
    (None without a controller target); ``<key>_p`` for ``TESTED_KEYS``: the two-sided Welch p-value of
    the per-seed values against ``baseline`` (None for the baseline itself, without one, or where undefined).
    """
    return _summarize(_load_groups(groups), baseline, hold_after)


def compare_settings(a: Sequence[str | Path], b: Sequence[str | Path]) -> WelchResult:
    """Welch t-test of the per-seed probe-entropy change, setting ``a`` minus setting ``b``."""
    a_stats, b_stats = ([run_stats(r.rows) for r in load_runs(dirs)] for dirs in (a, b))
    return welch_test(_values(a_stats, "entropy_change"), _values(b_stats, "entropy_change"))


def plot_study(
    groups: Mapping[str, Sequence[str | Path]], out_dir: str | Path, smooth: float = 0.0
) -> list[Path]:
    """Probe entropy and clip fractions over steps per setting: mean over seeds, band of one std."""
    return [path for _, path in _plot_panels(STUDY_PANELS, _load_groups(groups), Path(out_dir), smooth)]


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
    loaded = _load_groups(groups)
    summary = _summarize(loaded, baseline, hold_after)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    drawn = _plot_panels(STUDY_PANELS, loaded, out_dir / PLOTS_DIR, smooth)

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
