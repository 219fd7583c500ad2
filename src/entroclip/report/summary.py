"""Study summaries: settings x seeds, each run reduced by ``run_stats``, then per setting the mean over
seeds with its std and 95% t-interval, and Welch p-values against a baseline setting.

A study is ``{"clip-high only": [seed0, seed1, seed2], "0.2/0.28": [...]}`` (setting label -> run folders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from entroclip.report.quantities import HOLD_AFTER, HOLD_TOLERANCE, run_stats
from entroclip.report.stats import WelchResult, describe, welch_test
from entroclip.runio import Run, config_value, load_runs

#: ``run_stats`` keys summarized per setting in ``summary.json``: mean, ``<key>_std``, ``<key>_ci95``.
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


def load_groups(groups: Mapping[str, Sequence[str | Path]]) -> dict[str, list[Run]]:
    """Read every run folder of a study, keeping the settings' order; each setting needs a folder."""
    if not groups:
        raise ValueError("a study needs at least one setting")
    empty = [label for label, dirs in groups.items() if not dirs]
    if empty:
        raise ValueError(f"settings without run folders: {empty}")
    return {label: load_runs(dirs) for label, dirs in groups.items()}


def values(stats: Sequence[Mapping[str, float | None]], key: str) -> list[float]:
    """One quantity of ``run_stats`` over the runs that have it."""
    return [v for s in stats if (v := s[key]) is not None]


def summarize(
    loaded: Mapping[str, Sequence[Run]], baseline: str | None, hold_after: int
) -> list[dict[str, Any]]:
    """``summarize_study`` of groups already read by ``load_groups`` (the report reads them once)."""
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
            mean, std, ci95 = describe(values(stats[label], key))
            entry.update({key: mean, f"{key}_std": std, f"{key}_ci95": ci95})
        errors = values(stats[label], "hold_error")
        entry["hold_within"] = sum(e <= HOLD_TOLERANCE for e in errors) if errors else None
        for key in TESTED_KEYS:
            entry[f"{key}_p"] = None
            if baseline is not None and label != baseline:
                entry[f"{key}_p"] = welch_test(values(stats[label], key), values(stats[baseline], key)).p
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
    return summarize(load_groups(groups), baseline, hold_after)


def compare_settings(a: Sequence[str | Path], b: Sequence[str | Path]) -> WelchResult:
    """Welch t-test of the per-seed probe-entropy change, setting ``a`` minus setting ``b``."""
    a_stats, b_stats = ([run_stats(r.rows) for r in load_runs(dirs)] for dirs in (a, b))
    return welch_test(values(a_stats, "entropy_change"), values(b_stats, "entropy_change"))
