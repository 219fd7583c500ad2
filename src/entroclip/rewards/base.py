"""Reward functions: the :class:`Reward` wrapper, per-sample random generators and scoring of one sample."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple, get_args

import numpy as np

from entroclip.registry import check_options
from entroclip.tasks.base import Example

#: A reward function scores one completion: ``(completion, example) -> float``.
RewardFn = Callable[[str, Example], float]
Isolation = Literal["inline", "process"]
ISOLATIONS: tuple[str, ...] = get_args(Isolation)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Reward:
    """A reward function together with how :func:`~entroclip.rewards.score_batch` runs it.

    Attributes:
        fn: ``(completion, example) -> float``, or ``(completion, example, rng) -> float`` when ``uses_rng``.
        name: shown in error messages.
        isolation: ``"inline"`` runs ``fn`` in the calling thread, with no time limit (for cheap, trusted
            functions); ``"process"`` runs it in a worker process that is killed when a sample exceeds the
            time limit (for anything that may hang: parsers, solvers, user code).
        uses_rng: ``fn`` takes a ``numpy.random.Generator``; the scorer gives each sample its own.
    """

    fn: Callable[..., float]
    name: str
    isolation: Isolation = "process"
    uses_rng: bool = False

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {self.isolation!r}")

    def __call__(self, completion: str, example: Example, rng: np.random.Generator | None = None) -> float:
        if not self.uses_rng:
            return self.fn(completion, example)
        if rng is None:
            raise ValueError(f"reward {self.name!r} draws random numbers: pass rng (see sample_rng)")
        return self.fn(completion, example, rng)


def reward_from_function(
    fn: Callable[..., float],
    *,
    name: str | None = None,
    isolation: Isolation = "process",
    uses_rng: bool = False,
    **options: Any,
) -> Reward:
    """Wrap a plain function as a :class:`Reward`; ``options`` are bound to it as keyword arguments."""
    if not callable(fn):
        raise TypeError(f"a reward function must be callable, got {type(fn).__name__}")
    name = name or str(getattr(fn, "__qualname__", fn))
    if options:
        check_options(fn, options, f"reward {name!r}", partial=True)
        fn = partial(fn, **options)
    return Reward(fn=fn, name=name, isolation=isolation, uses_rng=uses_rng)


def sample_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``step``: independent streams from ``SeedSequence((seed, step,
    index))``, so a random reward does not depend on batching, worker order or thread count."""
    return np.random.default_rng([seed, step, index])


class Score(NamedTuple):
    """Outcome of one sample: the reward (0 on failure), the failure message, whether it timed out."""

    value: float
    error: str | None = None
    timed_out: bool = False


def score_one(reward: Reward, completion: str, example: Example, seed: int, step: int, index: int) -> Score:
    """Score one sample; an exception or a value that is not a finite float32 gives 0 and an error."""
    try:
        rng = sample_rng(seed, step, index) if reward.uses_rng else None
        value = float(reward(completion, example, rng))
    except Exception as e:
        return Score(0.0, f"{type(e).__name__}: {e}")
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        return Score(0.0, f"reward is not a finite float32: {value}")
    return Score(value)
