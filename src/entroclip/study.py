"""Run a grid of settings x seeds, in parallel processes, with one live progress bar per run."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from entroclip.config import Config, apply_overrides, parse_config
from entroclip.consoles import unwrapped_console


@dataclass(frozen=True)
class Setting:
    """One point of a study: a label and ``section.field=value`` overrides of the base config."""

    label: str
    overrides: tuple[str, ...]


#: a worker's queue of (run key, finished step) progress updates for the sweep's progress bars
_progress_updates: Any = None


def _init_worker(parent: int, updates: Any) -> None:
    global _progress_updates
    _progress_updates = updates
    exit_with_parent(parent)


def exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """Worker initializer: end this process once ``parent`` (the sweep) is gone, so that a sweep that is
    killed or interrupted leaves no worker writing into its run folders."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_one(config: dict[str, Any], run_key: str, resume: bool) -> str:
    from entroclip.runio import CONFIG_FILE
    from entroclip.trainer import Trainer

    cfg = parse_config(config)
    resume = resume and (Path(cfg.run.out_dir) / CONFIG_FILE).is_file()
    trainer = Trainer(cfg, resume=resume, overwrite=True, console=unwrapped_console(quiet=True))
    trainer.train(show_progress=False, on_step=lambda step, _m: _progress_updates.put((run_key, step)))
    return cfg.run.out_dir


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
        plan[setting.label] = []
        for seed in seeds:
            data = base.model_dump(mode="json")
            run_dir = out_dir / setting.label / f"seed{seed}"
            apply_overrides(data, [*setting.overrides, f"run.seed={seed}", f"run.out_dir={run_dir}"])
            plan[setting.label].append(parse_config(data))
    return plan


def run_study(
    plan: Mapping[str, Sequence[Config]],
    workers: int = 2,
    console: Console | None = None,
    resume: bool = False,
) -> dict[str, list[Path]]:
    """Train every planned run, ``workers`` at a time; returns label -> run folders.

    An existing run folder is replaced, or with ``resume`` continued from its last checkpoint (a finished
    run is only re-read), so an interrupted study can be completed by running it again.
    """
    console = console or unwrapped_console()
    jobs = [(label, cfg) for label, cfgs in plan.items() for cfg in cfgs]
    ctx = mp.get_context("spawn")
    updates = ctx.Queue()
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(), updates)
    ) as pool:
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        with progress:
            bars, futures = {}, []
            for label, cfg in jobs:
                key = f"{label}/seed{cfg.run.seed}"
                bars[key] = progress.add_task(key, total=cfg.run.steps)
                futures.append(pool.submit(_run_one, cfg.model_dump(mode="json"), key, resume))
            while not all(f.done() for f in futures):
                _drain(updates, progress, bars, timeout=0.2)
            _drain(updates, progress, bars, timeout=0.0)
    _raise_first_error(futures)
    return {label: [Path(cfg.run.out_dir) for cfg in cfgs] for label, cfgs in plan.items()}


def _drain(updates: Any, progress: Progress, bars: dict[str, Any], timeout: float) -> None:
    try:
        key, step = updates.get(timeout=timeout) if timeout else updates.get_nowait()
        progress.update(bars[key], completed=step)
        while True:
            key, step = updates.get_nowait()
            progress.update(bars[key], completed=step)
    except queue.Empty:
        return


def _raise_first_error(futures: list[Future[str]]) -> None:
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
