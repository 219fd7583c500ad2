"""Prompt sources: built-in procedural and traced tasks, local jsonl/parquet and reasoning-gym datasets."""

from entroclip.tasks.base import Example, Task, in_eval_split
from entroclip.tasks.dataset import FiniteTask
from entroclip.tasks.local import JsonlTask
from entroclip.tasks.procedural import AdditionTask, MultiplicationTask, ProceduralTask, ReverseTask
from entroclip.tasks.registry import TASKS, make_task, register_task
from entroclip.tasks.trace import (
    DELIMITER,
    AdditionTraceTask,
    FillerTraceTask,
    TracedTask,
    sft_target,
    trace_answer_masks,
)

__all__ = [
    "DELIMITER",
    "TASKS",
    "AdditionTask",
    "AdditionTraceTask",
    "Example",
    "FillerTraceTask",
    "FiniteTask",
    "JsonlTask",
    "MultiplicationTask",
    "ProceduralTask",
    "ReverseTask",
    "Task",
    "TracedTask",
    "in_eval_split",
    "make_task",
    "register_task",
    "sft_target",
    "trace_answer_masks",
]
