"""Random rewards, independent of the action, and their group-relative advantages.

The advantages come from :func:`entroclip.advantages.group_advantages` (GRPO, Dr.GRPO, RLOO). Because the
rewards ignore the action, every advantage is independent of the sampled action and has mean 0, which is
the setting of the paper's theorems; their one statistic that enters the first-order entropy change is
``E[max(A, 0)]`` (the paper's mu * nu), computed exactly by :meth:`RandomReward.positive_part_mean`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from entroclip.advantages import ADVANTAGE_KINDS, AdvantageKind, group_advantages

RewardKind = Literal["bernoulli", "gaussian"]
REWARD_KINDS: tuple[str, ...] = get_args(RewardKind)


@dataclass(frozen=True)
class RandomReward:
    """Rewards that ignore the action: Bernoulli(``success_prob``) or standard Gaussian.

    ``advantage`` names the group-relative estimator applied to each group of rewards. Every one of them
    subtracts the group mean, so a group's advantages sum to zero (``updates.ascend`` relies on it).
    """

    kind: RewardKind = "bernoulli"
    success_prob: float = 0.5
    advantage: AdvantageKind = "grpo"

    def __post_init__(self) -> None:
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {self.kind!r}")
        if self.advantage not in ADVANTAGE_KINDS:
            raise ValueError(f"advantage must be one of {ADVANTAGE_KINDS}, got {self.advantage!r}")
        if not 0.0 < self.success_prob < 1.0:
            raise ValueError(f"success_prob must be in (0, 1), got {self.success_prob}")

    def sample_advantages(
        self, groups: tuple[int, int], group_size: int, generator: torch.Generator, dtype: torch.dtype
    ) -> Tensor:
        """Advantages ``[S, P, G]`` for ``groups = (S, P)`` groups of ``group_size`` rewards each."""
        shape = (*groups, group_size)
        if self.kind == "bernoulli":
            successes = torch.rand(shape, generator=generator, dtype=dtype) < self.success_prob
            return self._bernoulli_advantages(successes, dtype)
        rewards = torch.randn(shape, generator=generator, dtype=dtype)
        return group_advantages(rewards.reshape(-1), group_size, self.advantage).view(shape).to(dtype)

    def _bernoulli_table(self, group_size: int, dtype: torch.dtype) -> Tensor:
        """Advantages of the group whose first k rewards are successes, for k = 0..G, ``[G + 1, G]``."""
        successes = torch.arange(group_size + 1).unsqueeze(-1)
        groups = (torch.arange(group_size) < successes).to(dtype)
        return group_advantages(groups.reshape(-1), group_size, self.advantage).view_as(groups).to(dtype)

    def _bernoulli_advantages(self, successes: Tensor, dtype: torch.dtype) -> Tensor:
        """Advantages of Bernoulli groups, bool ``[S, P, G]`` -> ``[S, P, G]``.

        A group's advantages depend only on its number k of successes, so they are looked up in the
        table the core's estimator gives for each k (a success's in column 0, a failure's in column G - 1).
        """
        table = self._bernoulli_table(successes.shape[-1], dtype)
        counts = successes.sum(-1, keepdim=True)
        return torch.where(successes, table[:, 0][counts], table[:, -1][counts])

    def positive_part_mean(self, group_size: int) -> float:
        """E[max(A, 0)] of one advantage in a group of ``group_size`` (= E[max(-A, 0)], as E[A] = 0)."""
        if self.kind == "bernoulli":
            return self._bernoulli_positive_part(group_size)
        return self._gaussian_positive_part(group_size)

    def _bernoulli_positive_part(self, group_size: int) -> float:
        """Exact sum over the number k of successes in the group, through the advantage estimator."""
        p, g = self.success_prob, group_size
        positive = self._bernoulli_table(g, torch.float64).clamp_min(0).mean(-1).tolist()
        return sum(math.comb(g, k) * p**k * (1 - p) ** (g - k) * positive[k] for k in range(g + 1))

    def _gaussian_positive_part(self, group_size: int) -> float:
        """Closed forms for N(0, 1) rewards (the GRPO epsilon of 1e-6 is neglected).

        R_i - mean is N(0, (G-1)/G); with the unbiased std s, (R_i - mean)^2 / s^2 * G / (G-1)^2 is
        Beta(1/2, (G-2)/2), which gives E|R_i - mean| / s = (G-1)/sqrt(G) Gamma((G-1)/2) /
        (Gamma(G/2) sqrt(pi)). The positive part is half the absolute value by symmetry.
        """
        g = group_size
        centred_abs = math.sqrt((g - 1) / g) * math.sqrt(2 / math.pi)
        if self.advantage == "drgrpo":
            return centred_abs / 2
        if self.advantage == "rloo":
            return centred_abs * g / (g - 1) / 2
        log_ratio = math.lgamma((g - 1) / 2) - math.lgamma(g / 2)
        return (g - 1) / math.sqrt(g) * math.exp(log_ratio) / math.sqrt(math.pi) / 2
