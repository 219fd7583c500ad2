"""A task that fails during training on purpose, for tests/e2e/test_sweep_reliability.py.

``task.name: sweep_tasks:BrokenStream`` (with ENTROCLIP_ALLOW_CODE=1); the sweep's worker processes
import this module by name (pytest puts tests/ on sys.path, and spawned workers inherit it).
"""

from dataclasses import dataclass

from entroclip.tasks import Example
from entroclip.tasks.procedural import AdditionTask


@dataclass(frozen=True)
class BrokenStream(AdditionTask):
    """Addition whose training stream fails (a data source that went away): its run fails at step 1,
    after its run folder was set up."""

    def examples(self, n: int, seed: int, offset: int = 0) -> list[Example]:
        raise RuntimeError("the data source went away")
