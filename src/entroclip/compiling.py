"""torch.compile where it pays: a run's step functions on request (``run.compile``), and, for large
inputs, functions that make one pass over many elements.

Small inputs (tests, tiny models, the theorem checks) run eagerly: compiling costs seconds per graph, more
than such a call takes. From ``COMPILE_FROM`` elements on, a pass compiles into one loop that keeps no
intermediate of the input's size and takes about half the eager time or less.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

import torch

#: Calls on at least this many elements run compiled.
COMPILE_FROM = 1 << 20

Args = ParamSpec("Args")
Result = TypeVar("Result")
T = TypeVar("T")


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


class CompileCache:
    """Functions run eagerly or compiled with ``torch.compile`` (``run.compile``): the tensor work of the
    update's minibatch steps and the policy's no-grad passes. Each function is compiled once, on first use.

    Compiling removes most of the per-operator overhead (Python, dispatcher, autograd bookkeeping) of the
    forward and the backward pass, which dominates the update of a small model; the first step of every
    new shape pays the compilation. If compiling or running a compiled function fails, the step is taken
    again eagerly, with a warning, and every later step runs eagerly.
    """

    def __init__(
        self, compile: bool = False, backend: str = "inductor", options: dict[str, Any] | None = None
    ) -> None:
        """``backend`` and ``options`` go to ``torch.compile`` (``options`` for inductor only)."""
        self.compiled = compile
        self.backend = backend
        self.options = options if backend == "inductor" else None
        self._functions: dict[Callable[..., Any], Callable[..., Any]] = {}

    def wrap(self, function: Callable[..., T]) -> Callable[..., T]:
        """``function`` as it runs: compiled (once per function) when on, else as it is."""
        if not self.compiled:
            return function
        if function not in self._functions:
            self._functions[function] = torch.compile(function, backend=self.backend, options=self.options)
        return self._functions[function]

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)``, compiled when on; a failure to compile falls back to eager. Only for
        functions without side effects (a no-grad forward pass)."""
        if not self.compiled:
            return function(*args)
        try:
            return self.wrap(function)(*args)
        except Exception as error:
            self.fall_back(error)
            return function(*args)

    def fall_back(self, error: BaseException) -> None:
        """Warn and run everything eagerly from here on."""
        cause = getattr(error, "inner_exception", None) or error  # the backend's own error
        first_line = next(iter(str(cause).strip().splitlines()), "")
        warnings.warn(
            f"run.compile: torch.compile failed, training continues eagerly "
            f"({type(cause).__name__}: {first_line})",
            RuntimeWarning,
            stacklevel=3,
        )
        self.compiled = False
        self._functions.clear()


#: the eager default
EAGER = CompileCache()
