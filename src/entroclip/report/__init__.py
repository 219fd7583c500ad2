"""PNG plots and markdown reports of run folders: one run, several runs overlaid, or a study.

A study is settings x seeds, e.g. ``{"clip-high only": [seed0, seed1, seed2], "0.2/0.28": [...]}``.
Its numbers are per-seed quantities (probe entropy at the start and the end, mean clip fractions, mean
attribution terms) averaged over seeds, with their standard deviation and a 95% Student-t interval;
its plots show the mean over seeds with a band of one standard deviation.

Modules, each using only those above it: ``stats`` (t distribution, intervals, Welch's test),
``quantities`` (per-run numbers from metric rows), ``summary`` (a study's per-setting numbers),
``panels`` (which metrics each figure shows), ``plots`` (drawing them), ``markdown`` (report.md).
"""

from entroclip.report.markdown import PLOTS_DIR, write_report, write_study_report
from entroclip.report.panels import RUN_PANELS, STUDY_PANELS, Curve, Panel
from entroclip.report.plots import Series, ema, plot_runs, plot_study
from entroclip.report.quantities import (
    HOLD_AFTER,
    HOLD_TOLERANCE,
    Rows,
    hold_error,
    probe_entropy_curve,
    run_stats,
)
from entroclip.report.stats import WelchResult, describe, t_cdf, t_quantile, welch_test
from entroclip.report.summary import SUMMARY_KEYS, TESTED_KEYS, compare_settings, summarize_study

__all__ = [
    "HOLD_AFTER",
    "HOLD_TOLERANCE",
    "PLOTS_DIR",
    "RUN_PANELS",
    "STUDY_PANELS",
    "SUMMARY_KEYS",
    "TESTED_KEYS",
    "Curve",
    "Panel",
    "Rows",
    "Series",
    "WelchResult",
    "compare_settings",
    "describe",
    "ema",
    "hold_error",
    "plot_runs",
    "plot_study",
    "probe_entropy_curve",
    "run_stats",
    "summarize_study",
    "t_cdf",
    "t_quantile",
    "welch_test",
    "write_report",
    "write_study_report",
]
