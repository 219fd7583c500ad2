"""The ``entroclip`` command line: train, sft, report, demo, theory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
AllowCode = Annotated[
    bool, typer.Option(help="let the config name tasks and rewards by import path (runs their code)")
]


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
    allow_code: AllowCode = False,
) -> None:
    """Train a policy with the clipped objective and log entropy diagnostics to a run folder."""
    from entroclip.checkpoint import CheckpointError
    from entroclip.config import ConfigError, load_config
    from entroclip.distributed import init_distributed, shutdown
    from entroclip.rewards import RewardsFailing
    from entroclip.runio import CONFIG_FILE, UNSTARTED_HINT
    from entroclip.trainer import Trainer, TrainingStopped
    from entroclip.trust import allow_code as allow_code_in_this_process

    overrides = list(set_ or [])
    if resume is not None:
        if config is not None:
            raise fail(
                "give either CONFIG or --resume DIR, not both (a resumed run uses its own config.yaml)"
            )
        if out is not None:
            raise fail("give either --resume DIR or --out DIR, not both (a run resumes in its own folder)")
        config = resume / CONFIG_FILE
        if not config.is_file():
            raise fail(f"cannot resume: {config} not found{UNSTARTED_HINT}")
        overrides.append(f"run.out_dir={resume}")
    if config is None:
        raise fail("missing CONFIG (or --resume DIR)")
    if out is not None:
        overrides.append(f"run.out_dir={out}")
    if allow_code:
        allow_code_in_this_process()
    try:
        cfg = load_config(config, overrides)
        ctx = init_distributed()
        console.quiet = not ctx.is_main
        trainer = Trainer(cfg, resume=resume is not None, overwrite=overwrite, console=console, ctx=ctx)
        run_dir = trainer.train(show_progress=progress)
        shutdown(ctx)
    except (ConfigError, CheckpointError) as err:
        raise fail(str(err)) from None
    except (TrainingStopped, RewardsFailing) as err:
        raise fail(str(err), code=1) from None
    except OSError as err:  # e.g. the disk filled up during training; checkpoints already written stay valid
        raise fail(f"{err} (resume from the last checkpoint with --resume once fixed)", code=1) from None
    console.print(f"run folder: {run_dir}")


@app.command()
def sft(
    out: Annotated[
        Path, typer.Option(help="folder for the fine-tuned model: new, empty, or an earlier sft output")
    ] = Path("runs/sft"),
    model: Annotated[
        str, typer.Option(help="built-in model name or local Hugging Face model folder (with config.json)")
    ] = "tiny-0.1m",
    task: Annotated[str, typer.Option(help="task with answers")] = "addition",
    options: Annotated[
        str, typer.Option(help="task options as a YAML mapping, e.g. '{dataset: basic_arithmetic}'")
    ] = "{}",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 600,
    batch_size: Annotated[int, typer.Option(help="examples per optimizer step")] = 64,
    lr: Annotated[
        float, typer.Option(help="peak learning rate, in (0, 1] (warm-up, then cosine decay)")
    ] = 3e-3,
    seed: Annotated[int, typer.Option(help="seed of the initialisation, data order and evaluation")] = 0,
    eval_prompts: Annotated[int, typer.Option(help="held-out prompts for the accuracy")] = 256,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (at most the CPU count)")] = 1,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier sft output in --out")] = False,
) -> None:
    """Supervised warm-up of a small model on a task with answers (about a minute for tiny-0.1m)."""
    import os

    import torch
    import yaml
    from safetensors import SafetensorError

    from entroclip.sft import SFTSettings, check_range, supervised_warmup
    from entroclip.tasks import make_task

    try:
        task_options = yaml.safe_load(options)
    except yaml.YAMLError as err:
        raise fail(f"--options is not valid YAML: {err}") from None
    if not isinstance(task_options, dict):
        raise fail(f"--options must be a YAML mapping of task options, got {options!r}")
    try:
        check_range("--threads", threads, 1, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        settings = SFTSettings(steps, batch_size, lr, seed=seed, eval_prompts=eval_prompts)
        task_obj = make_task(task, **task_options)
        summary = supervised_warmup(task_obj, model, out, settings, console, overwrite=overwrite)
    except (ValueError, TypeError, ImportError) as err:
        raise fail(str(err)) from None
    except (OSError, RuntimeError, SafetensorError) as err:  # e.g. a full disk; --out is left as it was
        raise fail(f"{err} (nothing was saved; run sft again once fixed)", code=1) from None
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
        list[str] | None, typer.Option(help="axis section.key=v1,v2 (runs cover the product of all axes)")
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            help="named setting LABEL:OVERRIDES, OVERRIDES being section.key=value items joined by ';'"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override section.key=value for every run")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds per setting (seeds 0 to N-1)")] = 3,
    out: Annotated[Path, typer.Option(help="sweep folder")] = Path("runs/sweep"),
    workers: Annotated[int, typer.Option(min=1, help="runs in parallel")] = 2,
    baseline: Annotated[
        str | None, typer.Option(help="label of the setting the others are tested against")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="continue the runs in --out from their checkpoints (finished runs are kept)"),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing sweep folder")] = False,
    allow_code: AllowCode = False,
    hold_after: Annotated[
        int, typer.Option(min=0, help="steps before a controller's hold error counts (warm-up)")
    ] = 20,
) -> None:
    """Run a grid of settings x seeds, then write summary.json, report.md and overlaid plots."""
    from entroclip.config import ConfigError, load_config
    from entroclip.report import write_study_report
    from entroclip.study import (
        grid_settings,
        named_setting,
        plan_runs,
        prepare_sweep_dir,
        run_study,
    )
    from entroclip.trust import allow_code as allow_code_in_this_process
    from entroclip.trust import check_config_code

    if allow_code:
        allow_code_in_this_process()  # the run processes inherit it
    try:
        settings = grid_settings(grid or []) + [named_setting(s) for s in setting or []]
        if not settings:
            raise ValueError("give at least one --grid axis or --setting")
        labels = [s.label for s in settings]
        if baseline is not None and baseline not in labels:
            raise ValueError(f"--baseline must be one of {labels}, got {baseline!r}")
        plan = plan_runs(load_config(config, list(set_ or [])), settings, list(range(seeds)), out)
        for planned in plan.values():
            check_config_code(planned[0])  # seeds differ only in run.seed and run.out_dir
        prepare_sweep_dir(out, resume=resume, overwrite=overwrite)
    except (ConfigError, ValueError) as err:
        raise fail(str(err)) from None
    except OSError as err:  # --overwrite could not delete the old sweep folder
        raise fail(str(err), code=1) from None
    with study_failures("run the same sweep with --resume"):
        groups = run_study(plan, workers=workers, console=console, resume=resume)
        report = write_study_report(
            groups, out, title=f"Sweep of {config}", baseline=baseline, hold_after=hold_after
        )
    console.print(f"report: {report}")


@contextlib.contextmanager
def study_failures(how_to_continue: str) -> Iterator[None]:
    """One line for a study whose runs failed (exit 1) or that was interrupted (exit 130)."""
    from entroclip.study import StudyFailed

    try:
        yield
    except StudyFailed as err:
        raise fail(
            f"{len(err.failed)} of {err.total} runs failed (listed above), the others are kept: fix the "
            f"cause and {how_to_continue}",
            code=1,
        ) from None
    except KeyboardInterrupt:
        raise fail(
            f"interrupted: queued runs cancelled and running ones stopped; {how_to_continue} to continue "
            "from their checkpoints",
            code=130,
        ) from None


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

    with study_failures("run the demo again"):
        report_path = run_demo(out, seeds=seeds, steps=steps, workers=workers, console=console)
    console.print(f"report: {report_path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
