"""The task registry: built-in tasks by name, user tasks by decorator or import path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from entroclip.registry import Registry, check_options
from entroclip.tasks.base import Task

TASKS: Registry[Task] = Registry(
    "task",
    {
        "addition": "entroclip.tasks.procedural:AdditionTask",
        "multiplication": "entroclip.tasks.procedural:MultiplicationTask",
        "reverse": "entroclip.tasks.procedural:ReverseTask",
        "jsonl": "entroclip.tasks.local:JsonlTask",
        "reasoning_gym": "entroclip.tasks.rgym:ReasoningGymTask",
        "addition_trace": "entroclip.tasks.trace:AdditionTraceTask",
        "trace": "entroclip.tasks.trace:FillerTraceTask",
    },
)


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Decorator registering a Task class (or factory) under ``name`` for :func:`make_task`."""

    def decorate(factory: Callable[..., Task]) -> Callable[..., Task]:
        TASKS.register(name, factory)
        return factory

    return decorate


def make_task(name: str, **options: Any) -> Task:
    """Build a task by registered name or ``"package.module:Factory"`` path, with keyword options."""
    factory = TASKS.resolve(name)
    check_options(factory, options, f"task {name!r}")
    task = factory(**options)
    if not isinstance(task, Task):
        raise TypeError(f"task {name!r} built a {type(task).__name__}, not an entroclip.tasks.Task")
    return task
