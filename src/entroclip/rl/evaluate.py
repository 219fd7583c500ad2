"""Held-out evaluation: pass@1 and unbiased pass@k."""

from __future__ import annotations

import math

import numpy as np

from entroclip.rewards import Reward, score_batch
from entroclip.tasks import Example


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def pass_metrics(
    reward: Reward, texts: list[str], examples: list[Example], k: int, timeout_s: float, seed: int
) -> dict[str, float]:
    """``eval/pass@1``, ``eval/pass@k`` and ``eval/k`` of ``k`` responses per example (``texts`` holds
    each example's ``k`` responses together); a response is correct when its reward is > 0.5."""
    repeated = [x for x in examples for _ in range(k)]
    scored = score_batch(reward, texts, repeated, timeout_s=timeout_s, seed=seed)
    correct = (scored.rewards > 0.5).reshape(len(examples), k).sum(-1).tolist()
    return {
        "eval/pass@1": float(np.mean([pass_at_k(k, c, 1) for c in correct])),
        "eval/pass@k": float(np.mean([pass_at_k(k, c, k) for c in correct])),
        "eval/k": float(k),
    }
