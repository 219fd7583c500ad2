"""Prompt sources: built-in procedural tasks, local jsonl/parquet datasets and reasoning-gym datasets."""

from entroclip.tasks.base import Example, Task, in_eval_split
from entroclip.tasks.dataset import FiniteTask
from entroclip.tasks.local import JsonlTask
from entroclip.tasks.procedural import AdditionTask, MultiplicationTask, ProceduralTask, ReverseTask
from entroclip.tasks.registry import TASKS, make_task, register_task

__all__ = [
    "TASKS",
    "AdditionTask",
    "Example",
    "FiniteTask",
    "JsonlTask",
    "MultiplicationTask",
    "ProceduralTask",
    "ReverseTask",
    "Task",
    "in_eval_split",
    "make_task",
    "register_task",
]
