"""torch.compile for the lab's large runs: functions that run once per inner step on every seed.

Small policies (tests, the theorem checks) run eagerly: compiling costs seconds per graph, more than such
a run takes. From ``COMPILE_FROM`` logits on, a pass over all logits compiles into one loop that takes
about half the eager time, and the per-sample work of a step into one kernel instead of dozens.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Generic, ParamSpec, TypeVar

import torch

#: Policies with at least this many logits (seeds x contexts x actions) run compiled.
COMPILE_FROM = 1 << 20

Args = ParamSpec("Args")
Result = TypeVar("Result")


class CompiledForLargeRuns(Generic[Args, Result]):
    """``function``, through torch.compile (dynamic shapes, one graph) for policies of at least
    ``COMPILE_FROM`` logits; eagerly for smaller ones and wherever torch.compile cannot build it (e.g.
    without a C++ compiler, or past dynamo's recompile limit), after a warning."""

    def __init__(self, function: Callable[Args, Result]) -> None:
        self.function = function
        self.compiled: Callable[Args, Result] | None = None
        self.compiles = True

    def __call__(self, policy_size: int, *args: Args.args, **kwargs: Args.kwargs) -> Result:
        """Run on ``args``; ``policy_size``: the number of logits of the policies the call serves."""
        if self.compiles and policy_size >= COMPILE_FROM:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.function, dynamic=True, fullgraph=True)
                return self.compiled(*args, **kwargs)
            except (RuntimeError, torch._dynamo.exc.FailOnRecompileLimitHit) as error:
                warnings.warn(f"the theory lab runs eagerly: torch.compile failed ({error})", stacklevel=2)
                self.compiles = False
        return self.function(*args, **kwargs)
