"""Random rewards, independent of the response: the control experiment of the clipping-entropy study.

Their randomness comes from the per-sample generator the scorer passes in (see ``sample_rng``), so a run
is reproducible from its seed.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, get_args

import numpy as np

from entroclip.rewards.base import Reward
from entroclip.tasks.base import Example

Distribution = Literal["sign", "gaussian"]
DISTRIBUTIONS: tuple[str, ...] = get_args(Distribution)


def random_bernoulli(*, p: float = 0.5) -> Reward:
    """Reward 1.0 with probability ``p`` and 0.0 otherwise, whatever the completion."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    return Reward(fn=partial(_bernoulli, p=p), name="random_bernoulli", isolation="inline", uses_rng=True)


def random_symmetric(*, distribution: Distribution = "sign", scale: float = 1.0) -> Reward:
    """Zero-mean reward, whatever the completion: ``sign`` gives +-scale with probability 1/2 each,
    ``gaussian`` draws from N(0, scale^2)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not scale > 0.0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    fn = partial(_symmetric, distribution=distribution, scale=scale)
    return Reward(fn=fn, name="random_symmetric", isolation="inline", uses_rng=True)


def _bernoulli(completion: str, example: Example, rng: np.random.Generator, *, p: float) -> float:
    return float(rng.random() < p)


def _symmetric(
    completion: str, example: Example, rng: np.random.Generator, *, distribution: Distribution, scale: float
) -> float:
    if distribution == "sign":
        return scale if rng.random() < 0.5 else -scale
    return scale * float(rng.standard_normal())
