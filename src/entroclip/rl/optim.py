"""The optimizer of an RL run: AdamW over the policy (and value head), with warm-up and decay."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from entroclip.config import Config


def trainable_parameters(*modules: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    """The parameters of the given modules (None: left out), in order."""
    return [p for module in modules if module is not None for p in module.parameters()]


def make_optimizer(params: Iterable[torch.nn.Parameter], config: Config) -> torch.optim.AdamW:
    optim = config.optim
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule over the run's optimizer steps (``run.steps * epochs * minibatches``)."""
    optim = config.optim
    total = max(config.run.steps * optim.epochs * optim.minibatches, 1)

    def factor(optimizer_step: int) -> float:
        if optimizer_step < optim.warmup_steps:
            return (optimizer_step + 1) / optim.warmup_steps
        progress = min((optimizer_step - optim.warmup_steps) / max(total - optim.warmup_steps, 1), 1.0)
        if optim.schedule == "linear":
            return 1.0 - progress
        if optim.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
