"""The reward registry: built-in rewards by name, user rewards by decorator or import path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from entroclip.registry import Registry, check_options
from entroclip.rewards.base import ISOLATIONS, Isolation, Reward, reward_from_function

REWARDS: Registry[Reward] = Registry(
    "reward",
    {
        "exact_match": "entroclip.rewards.exact:exact_match",
        "math": "entroclip.rewards.maths:math_answer",
        "reasoning_gym": "entroclip.rewards.rgym:reasoning_gym_reward",
        "random_bernoulli": "entroclip.rewards.noise:random_bernoulli",
        "random_symmetric": "entroclip.rewards.noise:random_symmetric",
        "trace_answer": "entroclip.rewards.trace:trace_answer",
    },
)


def register_reward(
    name: str, *, isolation: Isolation = "process", uses_rng: bool = False
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Decorator registering a reward function ``(completion, example, **options) -> float`` under ``name``.

    ``make_reward(name, **options)`` binds the options as keyword arguments. With ``uses_rng`` the function
    takes ``(completion, example, rng)``. Functions run with ``isolation="process"`` must be importable
    (defined at module level) so that a worker process can load them.
    """

    def decorate(fn: Callable[..., float]) -> Callable[..., float]:
        REWARDS.register(
            name, partial(reward_from_function, fn, name=name, isolation=isolation, uses_rng=uses_rng)
        )
        return fn

    return decorate


def make_reward(name: str, *, isolation: Isolation | None = None, **options: Any) -> Reward:
    """Build a reward by registered name, or from a ``"package.module:function"`` path.

    A path may point to a :class:`Reward` or to a plain function ``(completion, example) -> float``, which
    is run with ``isolation="process"`` unless ``isolation`` says otherwise; ``options`` are bound to it as
    keyword arguments. ``isolation`` also overrides the default of a registered reward.
    """
    if isolation is not None and isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    target = REWARDS.resolve(name)
    if name in REWARDS:
        check_options(target, options, f"reward {name!r}")
        reward = target(**options)
    elif isinstance(target, Reward):
        if options:
            raise ValueError(f"{name!r} is a ready Reward and takes no options, got {sorted(options)}")
        reward = target
    else:
        reward = reward_from_function(target, name=name, **options)
    if not isinstance(reward, Reward):
        raise TypeError(f"reward {name!r} built a {type(reward).__name__}, not an entroclip.rewards.Reward")
    return reward if isolation is None else replace(reward, isolation=isolation)
