"""The entropy-control table of a sweep: one row per setting, means over seeds with 95% t-intervals.

    python scripts/control_table.py runs/study/control_trace [--target-ratio 0.8] [--after 20]
        [--retarget-step 75 --retarget-ratio 0.6]

Columns: the largest and the RMS relative distance |H - target| / target of the rollout entropy H from the
target over the steps after ``--after`` (static settings are measured against ``--target-ratio`` x their
step-1 entropy, so that their drift is on the same scale), the seeds whose largest distance is within 10%,
the steps the controller's output sat at a bound, the last pass@1 and pass@k, and the final trace and
answer entropy (mean of the last 5 steps). With ``--retarget-step``, also the steps each run took after
the new target to stay within 10% of it to the end ("settle"). Printed as a markdown table.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from entroclip.report import describe
from entroclip.report.quantities import Rows
from entroclip.runio import read_metrics

TOLERANCE = 0.1


def series(rows: Rows, name: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=float)


def targets(rows: Rows, steps: np.ndarray, ratio: float, retarget: tuple[int, float] | None) -> np.ndarray:
    """The controller's logged target at ``steps``, or ``ratio`` (then the retarget ratio) x the step-1
    entropy for a run without one."""
    target_steps, logged = series(rows, "control/target")
    if len(logged):
        return np.interp(steps, target_steps, logged)
    first = series(rows, "entropy/rollout")[1][0]
    out = np.full(len(steps), ratio * first)
    if retarget is not None:
        out[steps > retarget[0]] = retarget[1] * first
    return out


def tail_mean(rows: Rows, name: str, last: int = 5) -> float:
    values = series(rows, name)[1]
    return float(values[-last:].mean()) if values.size else math.nan


def run_row(rows: Rows, ratio: float, after: int, retarget: tuple[int, float] | None) -> dict[str, float]:
    steps, entropy = series(rows, "entropy/rollout")
    target = targets(rows, steps, ratio, retarget)
    error = np.abs(entropy - target) / target
    late = steps > after
    row = {
        "max": float(error[late].max()),
        "rms": float(math.sqrt((error[late] ** 2).mean())),
        "within": float(error[late].max() <= TOLERANCE),
        "saturated": float(series(rows, "control/saturated")[1].sum()),
        "pass1": series(rows, "eval/pass@1")[1][-1],
        "passk": series(rows, "eval/pass@k")[1][-1],
        "trace": tail_mean(rows, "entropy/trace"),
        "answer": tail_mean(rows, "entropy/answer"),
    }
    if retarget is not None:
        outside = steps[(steps > retarget[0]) & (error > TOLERANCE)]
        row["settle"] = float((outside.max() if outside.size else retarget[0]) - retarget[0])
    return row


def cell(values: list[float], digits: int = 3) -> str:
    mean, _, ci95 = describe([v for v in values if not math.isnan(v)])
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {ci95:.{digits}f}" if ci95 is not None else f"{mean:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--target-ratio", type=float, default=0.8)
    parser.add_argument("--after", type=int, default=20)
    parser.add_argument("--retarget-step", type=int)
    parser.add_argument("--retarget-ratio", type=float)
    args = parser.parse_args()
    retarget = (args.retarget_step, args.retarget_ratio) if args.retarget_step is not None else None
    head = ["setting", "max hold error", "RMS hold error", "seeds within 10%", "steps saturated"]
    head += ["pass@1", "pass@k", "final trace H", "final answer H"]
    head += ["settle (steps)"] if retarget else []
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for setting in sorted(p for p in args.sweep.iterdir() if p.is_dir() and any(p.glob("seed*"))):
        runs = [
            run_row(read_metrics(run), args.target_ratio, args.after, retarget)
            for run in sorted(setting.glob("seed*"))
        ]
        columns = {key: [r[key] for r in runs] for key in runs[0]}
        cells = [setting.name, cell(columns["max"]), cell(columns["rms"])]
        cells += [f"{int(sum(columns['within']))}/{len(runs)}", cell(columns["saturated"], 1)]
        cells += [
            cell(columns["pass1"]),
            cell(columns["passk"]),
            cell(columns["trace"]),
            cell(columns["answer"]),
        ]
        cells += [cell(columns["settle"], 1) + f" (max {max(columns['settle']):.0f})"] if retarget else []
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
