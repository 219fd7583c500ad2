"""Run a grid of settings x seeds, in parallel processes, with one live progress bar per run."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import signal
import threading
import time
import unicodedata
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import product
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from entroclip.checkpoint import list_checkpoints
from entroclip.config import Config, apply_overrides, parse_config
from entroclip.consoles import unwrapped_console
from entroclip.runio import CONFIG_FILE, is_run_folder


@dataclass(frozen=True)
class Setting:
    """One point of a study: a label and ``section.field=value`` overrides of the base config."""

    label: str
    overrides: tuple[str, ...]


class StudyFailed(RuntimeError):
    """Some runs of a study raised (each was reported on the console); the other runs finished."""

    def __init__(self, failed: Sequence[str], total: int) -> None:
        super().__init__(f"{len(failed)} of {total} runs failed: {', '.join(failed)}")
        self.failed = list(failed)
        self.total = total


#: a worker's queue of (run key, finished step) progress updates for the sweep's progress bars
_progress_updates: Any = None


def _init_worker(parent: int, updates: Any, stop: Event) -> None:
    global _progress_updates
    _progress_updates = updates
    # Ctrl+C reaches the whole process group: the sweep alone decides, and ends its workers through `stop`
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(parent, stop=stop)


def exit_with_parent(parent: int, poll_s: float = 0.5, stop: Event | None = None) -> None:
    """Worker initializer: end this process once ``parent`` (the sweep) is gone, or once the event
    ``stop`` is set, so that a sweep that is killed or interrupted leaves no worker writing into its run
    folders."""

    def watch() -> None:
        while os.getppid() == parent and not (stop is not None and stop.is_set()):
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_one(config: dict[str, Any], run_key: str, resume: bool) -> str:
    from entroclip.trainer import Trainer

    cfg = parse_config(config)
    trainer = Trainer(cfg, resume=resume, overwrite=True, console=unwrapped_console(quiet=True))
    trainer.train(show_progress=False, on_step=lambda step, _m: _progress_updates.put((run_key, step)))
    return cfg.run.out_dir


def check_label(label: str) -> None:
    """Refuse a label that is not one plain folder name: it names the setting's folder in the sweep."""
    if (
        not label
        or any(c in "/\\" or unicodedata.category(c) == "Cc" for c in label)
        or label.startswith(".")
        or len(label.encode()) > 255
    ):
        raise ValueError(
            f"setting label {label!r} must be a single folder name: no '/', '\\', control characters "
            "or leading '.', at most 255 bytes"
        )


def grid_settings(grid: Sequence[str]) -> list[Setting]:
    """Settings for the product of ``section.key=v1,v2,...`` axes, labelled ``key=v,key=v``."""
    axes: list[list[tuple[str, str]]] = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--grid expects section.key=v1,v2,..., got {item!r}")
        axes.append([(key, v) for v in values.split(",")])
    return (
        [
            Setting(
                ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in combo), tuple(f"{k}={v}" for k, v in combo)
            )
            for combo in product(*axes)
        ]
        if axes
        else []
    )


def named_setting(spec: str) -> Setting:
    """``LABEL:section.key=value;section.key=value`` -> a Setting (for grouped overrides)."""
    label, sep, body = spec.partition(":")
    overrides = tuple(part for part in body.split(";") if part)
    if not sep or not label or not overrides or not all("=" in o for o in overrides):
        raise ValueError(f"--setting expects LABEL:section.key=value;section.key=value, got {spec!r}")
    return Setting(label, overrides)


def plan_runs(
    base: Config, settings: Sequence[Setting], seeds: Sequence[int], out_dir: Path
) -> dict[str, list[Config]]:
    """Validated configs for every (setting, seed), each writing to ``out_dir/<label>/seed<k>``."""
    plan: dict[str, list[Config]] = {}
    for setting in settings:
        check_label(setting.label)
        if setting.label in plan:
            raise ValueError(f"setting label {setting.label!r} is given twice: each names its own folder")
        plan[setting.label] = []
        for seed in seeds:
            data = base.model_dump(mode="json")
            run_dir = out_dir / setting.label / f"seed{seed}"
            apply_overrides(data, [*setting.overrides, f"run.seed={seed}", f"run.out_dir={run_dir}"])
            plan[setting.label].append(parse_config(data))
    return plan


def is_sweep_folder(path: Path) -> bool:
    """An empty folder, or one holding a ``<label>/seed<k>`` run folder (the train command's rule)."""
    return path.is_dir() and (
        not any(path.iterdir()) or any(is_run_folder(run) for run in path.glob("*/seed[0-9]*"))
    )


def prepare_sweep_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing sweep folder unless ``resume`` (its runs continue) or ``overwrite`` (it is
    deleted); either refuses a folder that is not a sweep folder, so that no other files are touched."""
    if resume and overwrite:
        raise ValueError("give either --resume or --overwrite, not both")
    if not out_dir.exists():
        return
    if not (resume or overwrite):
        raise ValueError(
            f"--out already exists: {out_dir} (use --resume to continue its runs, or --overwrite)"
        )
    if not is_sweep_folder(out_dir):
        flag = "--resume" if resume else "--overwrite"
        raise ValueError(
            f"{flag} refuses {out_dir}: not an entroclip sweep folder (no <label>/seed<k> run folder in it)"
        )
    if overwrite:
        shutil.rmtree(out_dir)


def run_study(
    plan: Mapping[str, Sequence[Config]],
    workers: int = 2,
    console: Console | None = None,
    resume: bool = False,
) -> dict[str, list[Path]]:
    """Train every planned run, ``workers`` at a time; returns label -> run folders.

    An existing run folder is replaced, or with ``resume`` continued from its last checkpoint (a finished
    run is only re-read), so an interrupted study can be completed by running it again. A run that raises
    is reported in one line while the others go on; then StudyFailed is raised. On KeyboardInterrupt the
    queued runs are cancelled and the running ones stopped (their checkpoints stay) before it propagates.
    """
    console = console or unwrapped_console()
    ctx = mp.get_context("spawn")
    updates, stop = ctx.Queue(), ctx.Event()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    runs: dict[Future[str], str] = {}
    failed: list[str] = []
    with (
        ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(os.getpid(), updates, stop),
        ) as pool,
        progress,
    ):
        try:
            bars: dict[str, Any] = {}
            for label, cfgs in plan.items():
                for cfg in cfgs:
                    key = f"{label}/seed{cfg.run.seed}"
                    run_dir = Path(cfg.run.out_dir)
                    resumes = resume and (run_dir / CONFIG_FILE).is_file()
                    bars[key] = progress.add_task(
                        key, total=cfg.run.steps, completed=_resume_step(run_dir) if resumes else 0
                    )
                    runs[pool.submit(_run_one, cfg.model_dump(mode="json"), key, resumes)] = key
            pending = set(runs)
            while pending:
                _drain(updates, progress, bars, timeout=0.2)
                for future in [f for f in pending if f.done()]:
                    pending.discard(future)
                    key = runs[future]
                    if (error := future.exception()) is not None:
                        failed.append(key)
                        progress.update(bars[key], description=f"{key} failed")
                        console.print(f"run {key} failed: {_one_line(error)}", markup=False, highlight=False)
            _drain(updates, progress, bars, timeout=0.0)
        except KeyboardInterrupt:
            stop.set()  # each worker's watcher ends it within its poll interval, mid-run like a kill -9
            pool.shutdown(cancel_futures=True)
            raise
    if failed:
        raise StudyFailed(failed, len(runs))
    return {label: [Path(cfg.run.out_dir) for cfg in cfgs] for label, cfgs in plan.items()}


def _resume_step(run_dir: Path) -> int:
    """The step a run resumes from: its latest checkpoint's, 0 without one."""
    found = list_checkpoints(run_dir)
    return found[-1][0] if found else 0


def _one_line(error: BaseException) -> str:
    """``ExcType: message`` on one line (a message may span several)."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _drain(updates: Any, progress: Progress, bars: dict[str, Any], timeout: float) -> None:
    try:
        key, step = updates.get(timeout=timeout) if timeout else updates.get_nowait()
        progress.update(bars[key], completed=step)
        while True:
            key, step = updates.get_nowait()
            progress.update(bars[key], completed=step)
    except queue.Empty:
        return
