"""Run-folder reading, statistics, plots and markdown reports on synthetic run folders with known values."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from entroclip.report import (
    compare_settings,
    describe,
    ema,
    hold_error,
    plot_runs,
    plot_study,
    run_stats,
    summarize_study,
    t_cdf,
    t_quantile,
    welch_test,
    write_report,
    write_study_report,
)
from entroclip.runio import RunFolderError, config_value, metric_series, read_config, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path,
    name: str,
    *,
    eps_low: float | None = 0.2,
    eps_high: float | None = 0.2,
    seed: int = 0,
    steps: int = 6,
    probe_start: float = 2.0,
    change: float = 0.3,
    clip_low: float = 0.01,
    clip_high: float = 0.03,
    eval_every: int = 0,
    ratio: bool = True,
) -> Path:
    """A run whose probe entropy moves linearly from ``probe_start`` by ``change`` over ``steps`` updates."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "loss": {"eps_low": eps_low, "eps_high": eps_high},
        "rollout": {"temperature": 1.0},
        "run": {"seed": seed, "steps": steps},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for s in range(1, steps + 1):
        row = {
            "step": s,
            "entropy/rollout": probe_start + 0.1 + change * s / steps,
            "entropy/probe_before": probe_start + change * (s - 1) / steps,
            "entropy/probe_after": probe_start + change * s / steps,
            "clip_ratio/low_mean": clip_low * (1 + (s % 2)),
            "clip_ratio/high_mean": clip_high,
            "entropy/effect_low": 0.5,
            "entropy/effect_high": -0.25,
            "reward/mean": 0.1 * s,
        }
        if ratio:
            row.update({"ratio/mean": 1.0, "ratio/min": 0.7, "ratio/max": 1.4})
        if eval_every and s % eval_every == 0:
            row.update({"eval/pass@1": 0.2, "eval/pass@k": 0.1 * s, "eval/k": 4})
        rows.append(json.dumps(row))
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return run


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


# --- run folders ---------------------------------------------------------------------------------------


def test_read_config_and_metrics(tmp_path):
    run = make_run(tmp_path, "r", eps_low=None, steps=4, eval_every=2)
    config = read_config(run)
    assert config_value(config, "loss.eps_low", "absent") is None
    assert config_value(config, "loss.eps_high") == 0.2
    assert config_value(config, "loss.nope", "absent") == "absent"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    steps, values = metric_series(rows, "eval/pass@k")
    assert steps.tolist() == [2, 4] and values == pytest.approx([0.2, 0.4])


def test_truncated_last_line_is_ignored_and_repeated_step_keeps_last(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lines = [
        '{"step": 1, "reward/mean": 0.5}',
        '{"step": 2, "reward/mean": null}',
        '{"step": 2, "reward/mean": 0.7}',
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "reward/me')
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    steps, values = metric_series(rows, "reward/mean")
    assert steps.tolist() == [1, 2] and values.tolist() == [0.5, 0.7]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, oops\n{"step": 4}\n')
    with pytest.raises(RunFolderError, match=re.escape(f"{run / 'metrics.jsonl'}:3: not valid JSON")):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"no_step": 2}\n')
    with pytest.raises(
        RunFolderError, match=r"metrics\.jsonl:2: expected a JSON object with an integer 'step'"
    ):
        read_metrics(run)


def test_missing_folder_and_files_name_the_path(tmp_path):
    with pytest.raises(RunFolderError, match=re.escape(f"run folder not found: {tmp_path / 'nope'}")):
        read_metrics(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        RunFolderError, match=re.escape(f"metrics.jsonl not found in run folder: {tmp_path / 'empty'}")
    ):
        read_metrics(tmp_path / "empty")
    with pytest.raises(RunFolderError, match=r"config\.yaml not found"):
        write_report([tmp_path / "empty"], tmp_path / "out")


# --- statistics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)]
)
def test_t_quantile_matches_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


@pytest.mark.parametrize("df", [1.0, 2.5, 7.3])
def test_t_cdf_matches_integrated_density(df):
    x = np.linspace(0.0, 3.0, 300_001)
    pdf = (
        math.gamma((df + 1) / 2)
        / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        * (1 + x**2 / df) ** (-(df + 1) / 2)
    )
    integral = float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))
    assert t_cdf(3.0, df) == pytest.approx(0.5 + integral, abs=1e-8)
    assert t_cdf(-3.0, df) == pytest.approx(0.5 - integral, abs=1e-8)


def test_describe_and_welch_by_hand():
    mean, std, ci = describe([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3)
    assert std == pytest.approx(math.sqrt(0.07))
    assert ci == pytest.approx(4.303 * math.sqrt(0.07) / math.sqrt(3), rel=1e-4)
    assert describe([1.0]) == (1.0, None, None)
    assert describe([]) == (None, None, None)

    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]
    res = welch_test(a, b)  # equal variances 2.5, n 5: t = -5 / 1, df = 8
    assert res.diff == pytest.approx(-5.0) and res.t == pytest.approx(-5.0) and res.df == pytest.approx(8.0)
    assert res.p == pytest.approx(2 * (1 - t_cdf(5.0, 8.0)), rel=1e-9)
    assert res.p == pytest.approx(0.001053, abs=2e-6)
    assert welch_test([1.0], [2.0, 3.0]).p is None
    assert welch_test([1.0, 1.0], [1.0, 1.0]).p is None


# Independent references for the scipy-backed statistics: closed forms of Student's t for df = 1, 2, 4,
# and, for any df, the hand-written functions that report.py used before scipy (evaluated in float64).


def _t_cdf_closed(t: float, df: int) -> float:
    """Student-t CDF in closed form for df = 1 (Cauchy), 2 and 4."""
    if df == 1:
        return 0.5 + math.atan(t) / math.pi
    if df == 2:
        return 0.5 + t / (2.0 * math.sqrt(2.0 + t * t))
    assert df == 4
    u = t / math.sqrt(4.0 + t * t)  # sin of the angle; F = 1/2 + (3/4) u (1 - u^2 / 3)
    return 0.5 + 0.75 * u * (1.0 - u * u / 3.0)


def _t_quantile_closed(p: float, df: int) -> float:
    """Student-t quantile in closed form for df = 1, 2 and 4."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    assert df == 4
    q = 4.0 * p * (1.0 - p)
    return math.copysign(
        2.0 * math.sqrt(math.cos(math.acos(math.sqrt(q)) / 3.0) / math.sqrt(q) - 1.0), p - 0.5
    )


def _hand_betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by the modified-Lentz continued fraction (the old report.py)."""

    def fraction(a: float, b: float, x: float) -> float:
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

    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * fraction(a, b, x) / a
    return 1.0 - front * fraction(b, a, 1.0 - x) / b


def _hand_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _hand_betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def _hand_t_quantile(p: float, df: float) -> float:
    """Bisection to a bracket 1e-12 wide relative to its top, its midpoint (p > 0.5)."""
    lo, hi = 0.0, 1.0
    while _hand_t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _hand_t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def _hand_welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(t, Welch-Satterthwaite df, two-sided p) by the formulas, in float64."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(t), float(df), _hand_betainc(df / 2.0, 0.5, df / (df + t * t))


@pytest.mark.parametrize("df", [1, 2, 4])
def test_t_cdf_and_quantile_match_closed_forms(df):
    # A handful of float64 operations: ~1e-15 relative, checked at 1e-13; the closed-form CDFs add a term
    # to 1/2, so in the far tail they are good only to ~1e-16 absolute, checked at 1e-15.
    for t in (-30.0, -4.0, -1.0, -0.1, 0.0, 0.5, 2.0, 4.303, 12.7):
        assert t_cdf(t, df) == pytest.approx(_t_cdf_closed(t, df), rel=1e-13, abs=1e-15)
    for p in (0.025, 0.1, 0.4, 0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, df) == pytest.approx(_t_quantile_closed(p, df), rel=1e-13)


@pytest.mark.parametrize("df", [1.0, 1.5, 2.7, 4.0, 5.3, 9.0, 29.0, 120.0])
def test_t_cdf_and_quantile_match_hand_written(df):
    # The continued fraction stops at 1e-15 and 1 - tail loses ~1e-16 absolute: 1e-13 absolute on the CDF.
    for t in (-6.0, -2.0, -0.3, 0.7, 2.2, 8.0):
        assert t_cdf(t, df) == pytest.approx(_hand_t_cdf(t, df), rel=0.0, abs=1e-13)
    # The bisection's midpoint is within 5e-13 relative of its own root: checked at 1e-12 (p away from
    # 1/2, where the root is near 0 and the hand CDF's absolute error dominates the relative one).
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(_hand_t_quantile(p, df), rel=1e-12)
        assert t_quantile(1.0 - p, df) == pytest.approx(-_hand_t_quantile(p, df), rel=1e-12)
    with pytest.raises(ValueError, match="df must be > 0"):
        t_quantile(0.975, 0.0)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_describe_interval_matches_closed_form(n):
    values = [0.1 * i + 0.37 * i * i for i in range(n)]
    mean, std, ci = describe(values)
    assert mean == pytest.approx(sum(values) / n, rel=1e-15)
    assert std == pytest.approx(float(np.std(values, ddof=1)), rel=1e-14)
    quantile = _t_quantile_closed(0.975, n - 1)  # df = 1, 2, 4
    assert ci == pytest.approx(quantile * float(np.std(values, ddof=1)) / math.sqrt(n), rel=1e-13)


def test_welch_matches_closed_forms_and_hand_written():
    # One side constant, n = 3: df = 2 exactly and p = 1 - t / sqrt(2 + t^2), t = 2 sqrt(3).
    res = welch_test([0.3, 0.4, 0.5], [0.2, 0.2, 0.2])
    assert res.t == pytest.approx(2 * math.sqrt(3), rel=1e-13) and res.df == pytest.approx(2.0, rel=1e-13)
    assert res.p == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-13)
    # Equal variances and n = 3 on both sides: df = 4, p from the df = 4 closed-form CDF.
    res = welch_test([1.0, 2.0, 4.0], [3.0, 4.0, 6.0])
    assert res.df == pytest.approx(4.0, rel=1e-13)
    assert res.p == pytest.approx(2 * (1 - _t_cdf_closed(abs(res.t or 0.0), 4)), rel=1e-13)
    # Fractional df, unequal sizes: the formulas with the hand-written incomplete beta, 1e-12 relative
    # (scipy and the formulas differ in the last digits of t, df and I_x; observed < 3e-14).
    rng = np.random.default_rng(7)
    for n, m in [(2, 5), (3, 4), (4, 7), (6, 3), (9, 2)]:
        a = rng.normal(0.0, rng.uniform(0.1, 2.0), n).tolist()
        b = rng.normal(rng.uniform(-2.0, 2.0), 1.0, m).tolist()
        t, df, p = _hand_welch(a, b)
        res = welch_test(a, b)
        assert res.diff == pytest.approx(float(np.mean(a) - np.mean(b)), rel=1e-14)
        assert (res.t, res.df, res.p) == pytest.approx((t, df, p), rel=1e-12)


def test_ema():
    assert ema(np.full(5, 3.0), 0.9) == pytest.approx(np.full(5, 3.0))
    assert ema(np.array([1.0, 3.0]), 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])
    assert ema(np.array([1.0, np.nan, 2.0]), 0.0).tolist()[::2] == [1.0, 2.0]
    with pytest.raises(ValueError, match="smoothing"):
        ema(np.ones(2), 1.0)


def test_run_stats(tmp_path):
    run = make_run(tmp_path, "r", steps=4, change=0.4, eval_every=2)
    st = run_stats(read_metrics(run))
    assert st["entropy_start"] == pytest.approx(2.0) and st["entropy_end"] == pytest.approx(2.4)
    assert st["entropy_change"] == pytest.approx(0.4)
    assert st["clip_low"] == pytest.approx(0.015) and st["clip_high"] == pytest.approx(0.03)
    assert st["reward_final"] == pytest.approx(0.4)
    assert (st["passk_best"], st["passk_best_step"], st["passk_k"]) == pytest.approx((0.4, 4, 4))
    assert st["clip_dual"] is None and st["effect_dual"] is None


# --- plots and reports ---------------------------------------------------------------------------------


def test_plot_runs_overlays_and_skips_missing_panels(tmp_path):
    a = make_run(tmp_path, "a", eval_every=2)
    b = make_run(tmp_path, "b", eps_low=0.05, change=0.6, ratio=False)
    paths = plot_runs([a, b], tmp_path / "plots", smooth=0.5)
    assert sorted(p.name for p in paths) == [
        "attribution.png",
        "clip_fractions.png",
        "entropy.png",
        "pass_at_k.png",
        "ratio.png",
        "reward.png",
    ]
    for path in paths:
        assert_png(path)
    only_b = plot_runs([b], tmp_path / "plots_b")
    assert {p.name for p in only_b} == {"attribution.png", "clip_fractions.png", "entropy.png", "reward.png"}
    assert sorted(p.name for p in (tmp_path / "plots_b").iterdir()) == sorted(p.name for p in only_b)


def test_write_report_mentions_runs_and_embeds_plots(tmp_path):
    a = make_run(tmp_path, "standard", eval_every=3)
    b = make_run(tmp_path, "clip_high_only", eps_low=None, change=-0.3)
    out = tmp_path / "report"
    path = write_report([a, b], out, title="Two runs")
    text = path.read_text()
    assert path == out / "report.md" and text.startswith("# Two runs")
    assert "| standard | clip_high_only |" in text
    assert "`../standard`" in text and "| eps_low | 0.2 | off |" in text
    assert "| probe entropy, start → end (nats) | 2 → 2.3 | 2 → 1.7 |" in text
    assert "| best pass@k | 0.6 (step 6, k=4) | n/a |" in text
    assert "mean clip_dual" not in text and "| mean clip_low | 0.015 | 0.015 |" in text
    embedded = [line.rsplit("](", 1)[1][:-1] for line in text.splitlines() if line.startswith("![")]
    assert "plots/entropy.png" in embedded and len(embedded) == 6
    for rel in embedded:
        assert_png(out / rel)
    assert "pre-update (sampling) policy" in text and "full vocabulary" in text and "T = 1" in text
    assert "same fixed probe prompts and continuations" in text
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def make_study(root: Path) -> dict[str, list[Path]]:
    changes = {
        "clip-high only": [-0.1, -0.2, -0.6],
        "standard": [0.1, 0.2, 0.6],
        "clip-low": [0.5, 0.55, 0.6],
    }
    bounds = {"clip-high only": (None, 0.2), "standard": (0.2, 0.2), "clip-low": (0.05, 0.2)}
    return {
        label: [
            make_run(
                root,
                f"{label}/s{seed}",
                eps_low=bounds[label][0],
                eps_high=bounds[label][1],
                seed=seed,
                change=c,
            )
            for seed, c in enumerate(cs)
        ]
        for label, cs in changes.items()
    }


def test_summarize_study_by_hand(tmp_path):
    groups = make_study(tmp_path)
    summary = summarize_study(groups, baseline="standard")
    by = {e["label"]: e for e in summary}
    std = by["standard"]
    assert (std["eps_low"], std["eps_high"], std["n_seeds"], std["seeds"]) == (0.2, 0.2, 3, [0, 1, 2])
    assert by["clip-high only"]["eps_low"] is None
    assert std["entropy_start"] == pytest.approx(2.0) and std["entropy_start_std"] == pytest.approx(0.0)
    assert std["entropy_end"] == pytest.approx(2.3) and std["entropy_change"] == pytest.approx(0.3)
    assert std["entropy_change_std"] == pytest.approx(math.sqrt(0.07))
    assert std["entropy_change_ci95"] == pytest.approx(4.303 * math.sqrt(0.07 / 3), rel=1e-4)
    assert std["clip_low"] == pytest.approx(0.015) and std["effect_high"] == pytest.approx(-0.25)
    assert std["entropy_change_p"] is None
    expected = welch_test([-0.1, -0.2, -0.6], [0.1, 0.2, 0.6]).p
    assert by["clip-high only"]["entropy_change_p"] == pytest.approx(expected)
    assert compare_settings(groups["clip-high only"], groups["standard"]).p == pytest.approx(expected)
    assert 0 < expected < 0.1


def test_hold_error_and_pass_at_1_test(tmp_path):
    """Controller runs: the largest relative distance from the target after warm-up, seeds within 10%."""
    runs = []
    for seed, (late_entropy, pass1) in enumerate([(0.95, 0.3), (1.05, 0.4), (1.3, 0.5)]):
        run = make_run(tmp_path, f"ctl/s{seed}", seed=seed, steps=4, eval_every=4)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row.update({"control/target": 1.0, "entropy/rollout": 2.0 if row["step"] <= 2 else late_entropy})
            if "eval/pass@1" in row:
                row["eval/pass@1"] = pass1
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    assert hold_error(read_metrics(runs[0]), after=2) == pytest.approx(0.05)
    assert hold_error(read_metrics(runs[0]), after=1) == pytest.approx(1.0)
    assert hold_error(read_metrics(make_run(tmp_path, "static")), after=0) is None
    base = [make_run(tmp_path, f"base/s{seed}", seed=seed, steps=4, eval_every=4) for seed in range(3)]
    by = {e["label"]: e for e in summarize_study({"ctl": runs, "base": base}, baseline="base", hold_after=2)}
    ctl = by["ctl"]
    assert ctl["hold_error"] == pytest.approx((0.05 + 0.05 + 0.3) / 3) and ctl["hold_within"] == 2
    assert by["base"]["hold_within"] is None and by["base"]["pass1_final"] == pytest.approx(0.2)
    assert ctl["pass1_final"] == pytest.approx(0.4)
    assert ctl["pass1_final_p"] == pytest.approx(welch_test([0.3, 0.4, 0.5], [0.2, 0.2, 0.2]).p)


def test_study_rejects_mixed_bounds_and_unknown_baseline(tmp_path):
    groups = {"mixed": [make_run(tmp_path, "a"), make_run(tmp_path, "b", eps_low=0.1)]}
    with pytest.raises(ValueError, match="'mixed' mixes clip bounds"):
        summarize_study(groups)
    with pytest.raises(ValueError, match="baseline 'x'"):
        summarize_study({"one": [tmp_path / "a"]}, baseline="x")


def test_study_report_and_plots(tmp_path):
    groups = make_study(tmp_path / "runs")
    out = tmp_path / "study"
    paths = plot_study(groups, out / "alt", smooth=0.3)
    assert sorted(p.name for p in paths) == [
        "clip_effects.png",
        "clip_fractions.png",
        "probe_entropy.png",
        "reward.png",
        "rollout_entropy.png",
    ]
    report = write_study_report(groups, out, title="Clip study", baseline="standard")
    text = report.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(summarize_study(groups, baseline="standard")))
    assert summary[0]["eps_low"] is None
    assert "| seeds | entropy start | entropy end | entropy change | p vs standard | clip-low |" in text
    ci = 4.303 * math.sqrt(0.07 / 3)
    assert f"| standard | n/a | 0.2 | 0.2 | 3 | 2 ± 0 | 2.3 ± {ci:.2g} | 0.3 ± {ci:.2g} | baseline |" in text
    assert "| clip-high only | n/a | off | 0.2 | 3 |" in text
    outcome = "| setting | rollout entropy end | final reward | pass@1 final | p vs standard | pass@k final |"
    assert outcome in text
    assert "| standard | 2.4 ± " in text and "| 0.6 ± 0 | n/a | baseline | n/a | n/a |" in text
    for rel in ("plots/probe_entropy.png", "plots/clip_fractions.png"):
        assert f"]({rel})" in text
        assert_png(out / rel)


# --- golden output: report.md and summary.json as written before report.py became a package -------------

GOLDEN = Path(__file__).parent.parent / "golden" / "report"
ROOT_MARK = "<root>"


def _noise(*key: int) -> float:
    """A fixed pseudo-random number in [0, 1) from integers (integer arithmetic: same on every machine)."""
    h = 0
    for k in key:
        h = (h * 1_000_003 + k * 7919 + 104_729) % 2_147_483_647
    return (h % 10_007) / 10_007


def _golden_run(
    root: Path,
    name: str,
    config: dict,
    steps: int,
    *,
    salt: int,
    change: float,
    full: bool = True,
    eval_every: int = 0,
    pass1: float = 0.3,
    target: float | None = None,
) -> Path:
    """A run folder written by hand: probe entropy moving by about ``change``, noisy clip fractions, etc."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for s in range(1, steps + 1):
        u = [_noise(salt, s, j) for j in range(12)]
        row: dict = {"step": s, "entropy/rollout": 1.5 + change * s / steps + 0.05 * u[0]}
        row["reward/mean"] = None if s == 3 else 0.05 * s + 0.1 * u[1]
        if full:
            row.update(
                {
                    "entropy/probe_before": 2.0 + change * (s - 1) / steps + 0.01 * u[2],
                    "entropy/probe_after": 2.0 + change * s / steps + 0.01 * u[3],
                    "clip_ratio/low_mean": 0.02 * u[4],
                    "clip_ratio/high_mean": 0.05 * u[5],
                    "entropy/effect_low": 0.4 + 0.2 * u[6],
                    "entropy/effect_high": -0.3 - 0.2 * u[7],
                    "entropy/effect_pos": -0.1 * u[8],
                    "entropy/effect_neg": 0.1 * u[9],
                    "ratio/mean": 1.0 + 0.01 * (u[10] - 0.5),
                    "ratio/min": 0.6 + 0.1 * u[10],
                    "ratio/max": 1.3 + 0.2 * u[11],
                }
            )
        if salt % 3 == 0:  # some runs log the dual clip too
            row.update({"clip_ratio/dual_mean": 0.001 * u[8], "entropy/effect_dual": 0.05 * u[9]})
        if eval_every and s % eval_every == 0:
            row.update({"eval/pass@1": pass1 + 0.1 * u[10], "eval/pass@k": 0.5 + 0.02 * s, "eval/k": 8})
        if target is not None:
            late = s > 4
            row.update(
                {
                    "control/target": target,
                    "entropy/rollout": target * (1 + (0.2 * u[0] - 0.1) * (1 + salt % 2)) if late else 2.5,
                    "control/eps_low": 0.2 + 0.01 * u[1],
                    "control/entropy_coef": 0.001 * u[2],
                }
            )
        rows.append(json.dumps(row))
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return run


def _config(eps_low: float | None, eps_high: float | None, seed: int, steps: int, **extra: dict) -> dict:
    return {
        "loss": {"eps_low": eps_low, "eps_high": eps_high},
        "rollout": {"temperature": 1.0},
        "run": {"seed": seed, "steps": steps},
        "control": {"kind": "none"},
        **extra,
    }


def golden_runs(root: Path) -> list[Path]:
    """Three runs for ``write_report``: full metrics with evaluations, clip-low off and cut short, bare."""
    full = _golden_run(root, "runs/std", _config(0.2, 0.28, 0, 9), 9, salt=3, change=0.4, eval_every=3)
    off_config = _config(None, 0.28, 1, 10, rollout={"temperature": 0.7})
    off = _golden_run(root, "runs/off", off_config, 6, salt=1, change=-0.5)
    bare = _golden_run(root, "runs/bare", {"loss": {"eps_low": 0.1}}, 5, salt=2, change=0.2, full=False)
    return [full, off, bare]


def golden_study(root: Path) -> dict[str, list[Path]]:
    """Settings x seeds: a baseline, unequal seed counts (fractional Welch df), p < 0.001, one seed, and
    a controller whose hold error counts after the default warm-up."""
    steps = 24

    def setting(label: str, eps: tuple, n: int, change: float, pass1: float) -> list[Path]:
        return [
            _golden_run(
                root,
                f"study/{label}/s{seed}",
                _config(*eps, seed, steps),
                steps,
                salt=100 * len(label) + seed,
                change=change + 0.2 * _noise(len(label), seed),
                eval_every=6,
                pass1=pass1 + 0.2 * _noise(seed, len(label)),
            )
            for seed in range(n)
        ]

    control = {"control": {"kind": "entropy_target"}}
    return {
        "standard": setting("standard", (0.2, 0.2), 3, 0.1, 0.3),
        "clip-high only": setting("clip-high only", (None, 0.28), 4, -0.4, 0.35),
        "clip-low": setting("clip-low", (0.05, 0.2), 3, 2.0, 0.31),
        "single": setting("single", (0.1, 0.3), 1, 0.0, 0.3),
        "target": [
            _golden_run(
                root,
                f"study/target/s{seed}",
                _config(0.2, 0.2, seed, steps, **control),
                steps,
                salt=7 + seed,
                change=0.1 * seed,
                eval_every=8,
                target=1.2,
            )
            for seed in range(3)
        ],
    }


def write_golden_outputs(root: Path) -> dict[str, str]:
    """Write a run report and two study reports under ``root``; their texts (run paths as ``<root>``),
    plus ``files.txt``: every file written into the output folders."""
    from entroclip.report import write_report, write_study_report

    write_report(golden_runs(root), root / "report")  # as `entroclip report RUN... --out`
    groups = golden_study(root)
    write_study_report(groups, root / "sweep", title="Sweep of base.yaml", baseline="standard")
    subset = {k: groups[k] for k in ("clip-high only", "single", "target")}
    write_study_report(subset, root / "study_nobase", hold_after=5, smooth=0.5)
    texts = {}
    for folder in ("report", "sweep", "study_nobase"):
        for name in ("report.md", "summary.json"):
            if (root / folder / name).exists():
                texts[f"{folder}/{name}"] = (root / folder / name).read_text().replace(str(root), ROOT_MARK)
    written = sorted(
        p.relative_to(root).as_posix()
        for folder in ("report", "sweep", "study_nobase")
        for p in (root / folder).rglob("*")
        if p.is_file()
    )
    texts["files.txt"] = "\n".join(written) + "\n"
    return texts


def _assert_json_close(got: object, want: object, where: str = "") -> None:
    """Equal JSON, except that floats under ``*_ci95`` and ``*_p`` keys may differ by 1e-10 relative: scipy's
    t quantile and Welch p-value against the hand-written bisection (stopped at 1e-12 relative) and
    continued fraction (stopped at 1e-15) that wrote the golden files."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            _assert_json_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_json_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and where.endswith(("_ci95", "_p")):
        assert isinstance(got, float) and got == pytest.approx(want, rel=1e-10, abs=0.0), where
    else:
        assert type(got) is type(want) and got == want, where


def test_outputs_match_golden(tmp_path):
    """report.md texts are identical to those the pre-package report.py wrote; summary.json equal up to
    the last digits of the interval half-widths and p-values; the same files (PNGs included) written."""
    texts = write_golden_outputs(tmp_path)
    assert sorted(texts) == sorted(p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*") if p.is_file())
    for name, text in texts.items():
        want = (GOLDEN / name).read_text()
        if name.endswith(".json"):
            _assert_json_close(json.loads(text), json.loads(want), name)
        else:
            assert text == want, name
    for rel in texts["files.txt"].split():
        if rel.endswith(".png"):
            assert_png(tmp_path / rel)


def test_study_plots_show_the_counterfactual_and_the_trace_entropy_where_logged(tmp_path):
    """Runs with the counterfactual probe (every other step) and a reasoning trace get their two panels."""
    runs = []
    for seed in range(2):
        run = make_run(tmp_path, f"cf/s{seed}", seed=seed, steps=4)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row.update({"entropy/trace": 1.0, "entropy/answer": 0.5})
            if row["step"] % 2 == 0:
                row.update({"entropy/cf_effect_low": 0.01, "entropy/cf_effect_high": -0.01})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    names = {p.name for p in plot_study({"cf": runs}, tmp_path / "plots")}
    assert {"counterfactual.png", "trace_answer_entropy.png"} <= names


if __name__ == "__main__":  # python tests/unit/test_report.py: rewrite tests/golden/report/
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in write_golden_outputs(Path(tmp)).items():
            (GOLDEN / name).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / name).write_text(text)
