"""Scoring a batch of completions: per-sample time limit, failures counted and scored 0."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from entroclip.rewards.base import Reward, reward_from_function, score_one
from entroclip.rewards.pool import score_in_workers
from entroclip.tasks.base import Example

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class RewardResult:
    """Rewards of a batch: ``rewards`` float32 ``[N]`` (0 for failed samples), ``errors`` the number of
    failed samples (exceptions, time-outs, non-finite values), one message per failure (``"sample i:
    ..."``), and ``timeouts``, the failures that ran out of time."""

    rewards: Tensor
    errors: int
    error_messages: list[str]
    timeouts: int = 0


def score_batch(
    reward_fn: Reward | Callable[..., float],
    completions: Sequence[str],
    examples: Sequence[Example],
    *,
    timeout_s: float,
    seed: int,
    step: int = 0,
    workers: int | None = None,
) -> RewardResult:
    """Score ``completions[i]`` against ``examples[i]``; the run goes on whatever a sample does.

    Args:
        reward_fn: a :class:`Reward` (see ``make_reward``) or a plain function ``(completion, example) ->
            float``, which is run with ``isolation="process"``.
        timeout_s: time limit per sample, in seconds. It is enforced for process-isolated rewards (the
            worker is killed); inline rewards are trusted to be fast and run without a limit.
        seed, step: sample i of a reward that uses randomness gets the generator ``sample_rng(seed, step,
            i)``, so rewards are reproducible and independent of batching and worker count.
        workers: number of worker processes for process-isolated rewards (default: min(4, CPUs)). The
            workers are kept between calls; ``close_workers()`` stops them.
    """
    if len(completions) != len(examples):
        raise ValueError(f"got {len(completions)} completions but {len(examples)} examples; they must match")
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    for name, value in (("seed", seed), ("step", step)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    reward = reward_fn if isinstance(reward_fn, Reward) else reward_from_function(reward_fn)
    if reward.isolation == "inline":
        scores = [
            score_one(reward, c, ex, seed, step, i)
            for i, (c, ex) in enumerate(zip(completions, examples, strict=True))
        ]
    elif completions:
        scores = score_in_workers(
            reward, completions, examples, timeout_s=timeout_s, seed=seed, step=step, workers=workers
        )
    else:
        scores = []
    # torch is imported here, not at module level: worker processes import this package and stay light.
    import torch

    messages = [f"sample {i}: {s.error}" for i, s in enumerate(scores) if s.error is not None]
    return RewardResult(
        rewards=torch.tensor([s.value for s in scores], dtype=torch.float32),
        errors=len(messages),
        error_messages=messages,
        timeouts=sum(s.timed_out for s in scores),
    )
