"""The ``entroclip`` command line: train, sft, report, demo, theory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from entroclip.consoles import unwrapped_console
from entroclip.theory.cli import app as theory_app

app = typer.Typer(
    name="entroclip",
    help="RL with verifiable rewards for language models, with entropy measured and controlled by clipping.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(theory_app, name="theory")
console = unwrapped_console()

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print a one-line error and return the exit to raise."""
    console.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config (omit with --resume)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.field=value")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (overrides run.out_dir)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this folder")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run folder")] = False,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
) -> None:
    """Train a policy with the clipped objective and log entropy diagnostics to a run folder."""
    from entroclip.checkpoint import CheckpointError
    from entroclip.config import ConfigError, load_config
    from entroclip.distributed import init_distributed, shutdown
    from entroclip.runio import CONFIG_FILE
    from entroclip.trainer import Trainer, TrainingStopped

    overrides = list(set_ or [])
    if resume is not None:
        if config is not None:
            raise fail(
                "give either CONFIG or --resume DIR, not both (a resumed run uses its own config.yaml)"
            )
        config = resume / CONFIG_FILE
        if not config.is_file():
            raise fail(f"cannot resume: {config} not found")
        overrides.append(f"run.out_dir={resume}")
    if config is None:
        raise fail("missing CONFIG (or --resume DIR)")
    if out is not None:
        overrides.append(f"run.out_dir={out}")
    try:
        cfg = load_config(config, overrides)
        ctx = init_distributed()
        console.quiet = not ctx.is_main
        trainer = Trainer(cfg, resume=resume is not None, overwrite=overwrite, console=console, ctx=ctx)
        run_dir = trainer.train(show_progress=progress)
        shutdown(ctx)
    except (ConfigError, CheckpointError) as err:
        raise fail(str(err)) from None
    except TrainingStopped as err:
        raise fail(str(err), code=1) from None
    except OSError as err:  # e.g. the disk filled up during training; checkpoints already written stay valid
        raise fail(f"{err} (resume from the last checkpoint with --resume once fixed)", code=1) from None
    console.print(f"run folder: {run_dir}")


@app.command()
def sft(
    out: Annotated[Path, typer.Option(help="folder for the fine-tuned model")] = Path("runs/sft"),
    model: Annotated[str, typer.Option(help="built-in model name or local model folder")] = "tiny-0.1m",
    task: Annotated[str, typer.Option(help="task with answers")] = "addition",
    options: Annotated[
        str, typer.Option(help="task options as a YAML mapping, e.g. '{dataset: basic_arithmetic}'")
    ] = "{}",
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = 600,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(min=0.0)] = 3e-3,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    eval_prompts: Annotated[int, typer.Option(min=1, help="held-out prompts for the accuracy")] = 256,
    threads: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    """Supervised warm-up of a small model on a task with answers (about a minute for tiny-0.1m)."""
    import torch
    import yaml

    from entroclip.sft import SFTSettings, supervised_warmup
    from entroclip.tasks import make_task

    torch.set_num_threads(threads)
    try:
        task_options = yaml.safe_load(options)
    except yaml.YAMLError as err:
        raise fail(f"--options is not valid YAML: {err}") from None
    if not isinstance(task_options, dict):
        raise fail(f"--options must be a YAML mapping of task options, got {options!r}")
    try:
        task_obj = make_task(task, **task_options)
        settings = SFTSettings(steps, batch_size, lr, seed=seed, eval_prompts=eval_prompts)
        summary = supervised_warmup(task_obj, model, out, settings, console)
    except (ValueError, TypeError, ImportError) as err:
        raise fail(str(err)) from None
    console.print(
        f"saved {out}: held-out accuracy {summary['accuracy']:.2%}, final loss {summary['final_loss']:.3f}"
    )


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run folders (overlaid)")],
    out: Annotated[Path | None, typer.Option(help="output folder (default: the first run's)")] = None,
) -> None:
    """Write PNG plots and report.md for one or several runs."""
    from entroclip.report import write_report

    try:
        path = write_report(runs, out or runs[0])
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    console.print(f"report: {path}")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="base YAML config")],
    grid: Annotated[
        list[str] | None, typer.Option(help="axis: section.key=v1,v2,... (product of all axes)")
    ] = None,
    setting: Annotated[
        list[str] | None, typer.Option(help="named setting: LABEL:section.key=value;section.key=value")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override for every run")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds per setting (0..N-1)")] = 3,
    out: Annotated[Path, typer.Option(help="sweep folder")] = Path("runs/sweep"),
    workers: Annotated[int, typer.Option(min=1, help="parallel runs")] = 2,
    baseline: Annotated[
        str | None, typer.Option(help="label of the setting others are tested against")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="continue runs already in --out from their checkpoints (finished runs are kept)"),
    ] = False,
    hold_after: Annotated[
        int, typer.Option(min=0, help="steps before a controller's hold error counts (warm-up)")
    ] = 20,
) -> None:
    """Run a grid of settings x seeds, then write summary.json, report.md and overlaid plots."""
    from entroclip.config import ConfigError, load_config
    from entroclip.report import write_study_report
    from entroclip.study import grid_settings, named_setting, plan_runs, run_study

    try:
        settings = grid_settings(grid or []) + [named_setting(s) for s in setting or []]
        if not settings:
            raise ValueError("give at least one --grid axis or --setting")
        labels = [s.label for s in settings]
        if baseline is not None and baseline not in labels:
            raise ValueError(f"--baseline must be one of {labels}, got {baseline!r}")
        plan = plan_runs(load_config(config, list(set_ or [])), settings, list(range(seeds)), out)
    except (ConfigError, ValueError) as err:
        raise fail(str(err)) from None
    groups = run_study(plan, workers=workers, console=console, resume=resume)
    report = write_study_report(
        groups, out, title=f"Sweep of {config}", baseline=baseline, hold_after=hold_after
    )
    console.print(f"report: {report}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="demo folder")] = Path("runs/demo"),
    seeds: Annotated[int, typer.Option(min=1, help="seeds per setting")] = 3,
    steps: Annotated[
        int | None, typer.Option(min=1, help="RL steps per run (default: configs/demo.yaml)")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="parallel runs")] = 2,
) -> None:
    """SFT warm-up of the tiny model, then the random-reward clip study and its report."""
    from entroclip.demo import run_demo

    report_path = run_demo(out, seeds=seeds, steps=steps, workers=workers, console=console)
    console.print(f"report: {report_path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
