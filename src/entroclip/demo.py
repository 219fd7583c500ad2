"""``make demo``: SFT warm-up of the tiny model, then the random-reward clip study, then its report."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from entroclip.config import load_config
from entroclip.consoles import unwrapped_console
from entroclip.report import write_study_report
from entroclip.sft import SFTSettings, supervised_warmup
from entroclip.study import Setting, plan_runs, run_study
from entroclip.tasks import make_task

DEMO_CONFIG = Path("configs/demo.yaml")

#: the four settings of the study: (label, eps_low, eps_high); None = that side is not clipped
DEMO_SETTINGS = (
    Setting("clip-high-only", ("loss.eps_low=null", "loss.eps_high=0.2")),
    Setting("standard-0.2-0.2", ("loss.eps_low=0.2", "loss.eps_high=0.2")),
    Setting("clip-higher-0.2-0.28", ("loss.eps_low=0.2", "loss.eps_high=0.28")),
    Setting("aggressive-clip-low-0.05-0.2", ("loss.eps_low=0.05", "loss.eps_high=0.2")),
)


def warm_up(out: Path, task_name: str, model: str, console: Console) -> Path:
    """The SFT model of the demo, reused when ``out/sft`` already holds a finished one."""
    sft_dir = out / "sft"
    summary_file = sft_dir / "sft_summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        console.print(f"reusing the warm-up model in {sft_dir} (accuracy {summary['accuracy']:.1%})")
        return sft_dir
    console.print(f"supervised warm-up of {model} on {task_name} ...")
    summary = supervised_warmup(make_task(task_name), model, sft_dir, SFTSettings(), console)
    console.print(f"warm-up done: held-out accuracy {summary['accuracy']:.1%}")
    return sft_dir


def run_demo(
    out: Path, seeds: int = 3, steps: int | None = None, workers: int = 2, console: Console | None = None
) -> Path:
    console = console or unwrapped_console()
    if not DEMO_CONFIG.is_file():
        raise FileNotFoundError(f"{DEMO_CONFIG} not found: run the demo from the repository root")
    base = load_config(DEMO_CONFIG)
    assert base.model.builtin is not None, "configs/demo.yaml warms up a built-in model"
    sft_dir = warm_up(out, base.task.name, base.model.builtin, console)
    overrides = [f"model.path={sft_dir}", "model.builtin=null"]
    if steps is not None:
        overrides.append(f"run.steps={steps}")
    base = load_config(DEMO_CONFIG, overrides)
    plan = plan_runs(base, DEMO_SETTINGS, list(range(seeds)), out / "study")
    console.print(
        f"random-reward clip study: {len(DEMO_SETTINGS)} settings x {seeds} seeds, "
        f"{base.run.steps} steps each"
    )
    groups = run_study(plan, workers=workers, console=console)
    return write_study_report(
        groups, out, title="Random-reward clip study (tiny model, Bernoulli(0.5) rewards)"
    )
