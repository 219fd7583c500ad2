"""Reward functions and batch scoring with a per-sample time limit.

Built-in rewards (``make_reward(name, **options)``): ``exact_match``, ``math`` (math-verify),
``reasoning_gym`` (the dataset's own scorer), ``random_bernoulli`` and ``random_symmetric`` (random
rewards of the control experiment). Own rewards: :func:`register_reward` or a ``"module:function"`` path.
:class:`RewardFailureMonitor` turns the failures of each step into warnings, and stops a run whose reward
fails on every sample.

This package does not import torch at import time: reward worker processes import it.
"""

from entroclip.rewards.base import (
    ISOLATIONS,
    Isolation,
    Reward,
    RewardFn,
    Score,
    reward_from_function,
    sample_rng,
)
from entroclip.rewards.batch import RewardResult, score_batch
from entroclip.rewards.exact import exact_match, normalise
from entroclip.rewards.extract import EXTRACT_MODES, ExtractMode, extract_answer
from entroclip.rewards.monitor import RewardFailureMonitor, RewardsFailing
from entroclip.rewards.noise import random_bernoulli, random_symmetric
from entroclip.rewards.pool import close_workers
from entroclip.rewards.registry import REWARDS, make_reward, register_reward

__all__ = [
    "EXTRACT_MODES",
    "ISOLATIONS",
    "REWARDS",
    "ExtractMode",
    "Isolation",
    "Reward",
    "RewardFailureMonitor",
    "RewardFn",
    "RewardResult",
    "RewardsFailing",
    "Score",
    "close_workers",
    "exact_match",
    "extract_answer",
    "make_reward",
    "normalise",
    "random_bernoulli",
    "random_symmetric",
    "register_reward",
    "reward_from_function",
    "sample_rng",
    "score_batch",
]
