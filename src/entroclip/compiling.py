"""torch.compile for large inputs: functions that make one pass over many elements.

Small inputs (tests, tiny models, the theorem checks) run eagerly: compiling costs seconds per graph, more
than such a call takes. From ``COMPILE_FROM`` elements on, a pass compiles into one loop that keeps no
intermediate of the input's size and takes about half the eager time or less.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Generic, ParamSpec, TypeVar

import torch

#: Calls on at least this many elements run compiled.
COMPILE_FROM = 1 << 20

Args = ParamSpec("Args")
Result = TypeVar("Result")


class CompiledForLargeInputs(Generic[Args, Result]):
    """``function``, through torch.compile for calls on at least ``COMPILE_FROM`` elements; ``eager`` (by
    default ``function`` itself) for smaller ones and wherever torch.compile cannot build it (e.g. without
    a C++ compiler, or past dynamo's recompile limit), after a warning that names ``purpose``.

    ``dynamic=True``: every size is symbolic (one graph); False: sizes are static except the dimensions
    that the caller marks with ``torch._dynamo.maybe_mark_dynamic``."""

    def __init__(
        self,
        function: Callable[Args, Result],
        purpose: str,
        eager: Callable[Args, Result] | None = None,
        dynamic: bool = True,
    ) -> None:
        self.function = function
        self.purpose = purpose
        self.eager = function if eager is None else eager
        self.dynamic = dynamic
        self.compiled: Callable[Args, Result] | None = None
        self.compiles = True

    def __call__(self, size: int, *args: Args.args, **kwargs: Args.kwargs) -> Result:
        """Run on ``args``; ``size``: the number of elements the call works on."""
        if self.compiles and size >= COMPILE_FROM:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.function, dynamic=self.dynamic, fullgraph=True)
                return self.compiled(*args, **kwargs)
            except (RuntimeError, torch._dynamo.exc.FailOnRecompileLimitHit) as error:
                warnings.warn(f"{self.purpose} runs eagerly: torch.compile failed ({error})", stacklevel=2)
                self.compiles = False
        return self.eager(*args, **kwargs)
