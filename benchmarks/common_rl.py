"""A realistic update batch (configs/quick.yaml's shape) for the update-step benchmarks, and a bare PPO
update to compare ``run_update`` with, each eager or compiled as the trainer compiles them on a CPU.

quick.yaml: 16 prompts x group 8 = 128 sequences, 6 new tokens, Dr.GRPO advantages of Bernoulli(0.5)
rewards, eps 0.2/0.2, token-mean, 4 epochs x 4 minibatches, AdamW lr 1e-4 (fused), grad clip 1.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import torch

from entroclip.advantages import group_advantages
from entroclip.compiling import EAGER, CompileCache
from entroclip.config import Config, load_config
from entroclip.control import ControlAction
from entroclip.policy.sampling import response_logits, sample, token_logprobs
from entroclip.update import RunSettings, UpdateBatch, minibatch_indices, run_update

PROMPTS, GROUP, NEW_TOKENS, EPOCHS, MINIBATCHES, LR = 16, 8, 6, 4, 4, 1e-4


#: the clip bounds of configs/quick.yaml, as its static controller acts every step
QUICK_ACTION = ControlAction(eps_low=0.2, eps_high=0.2, entropy_coef=0.0)


def quick_config(
    attribution: bool = True, max_len: int = NEW_TOKENS, overrides: tuple[str, ...] = ()
) -> Config:
    """configs/quick.yaml with the benchmark's batch shape and ``overrides`` (``key=value``)."""
    fixed = [f"diagnostics.attribution={str(attribution).lower()}", f"loss.max_len={max_len}"]
    return load_config(Path(__file__).parent.parent / "configs/quick.yaml", [*fixed, *overrides])


def quick_settings(attribution: bool = True, max_len: int = NEW_TOKENS) -> RunSettings:
    """configs/quick.yaml's fixed update settings."""
    return RunSettings.from_config(quick_config(attribution, max_len))


def make_batch(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, seed: int = 0) -> UpdateBatch:
    """Rollout with ``entroclip.policy.sampling.sample``, Bernoulli(0.5) rewards, Dr.GRPO advantages,
    old log-probs from the training-time forward pass (as the trainer's ``collect``)."""
    rollout = sample(model, tokenizer, prompts, new_tokens, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.bernoulli(torch.full((len(prompts),), 0.5), generator=generator)
    advantages = group_advantages(rewards, GROUP, "drgrpo")
    with torch.no_grad():
        logp_old = token_logprobs(response_logits(model, rollout, 1.0), rollout.responses)
    return UpdateBatch(rollout, advantages, logp_old)


@dataclass
class UpdateRig:
    """A model, its initial weights and a batch; ``reset()`` restores weights and makes a fresh optimizer
    so that every timed update starts from the same state."""

    model: Any
    batch: UpdateBatch
    initial: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    @classmethod
    def create(cls, model: Any, batch: UpdateBatch) -> UpdateRig:
        return cls(model, batch, copy.deepcopy(model.state_dict()))

    def reset(self) -> None:
        self.model.load_state_dict(self.initial)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

    def update(
        self, settings: RunSettings, functions: CompileCache = EAGER, action: ControlAction = QUICK_ACTION
    ) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        run_update(
            self.model,
            self.optimizer,
            self.scheduler,
            self.batch,
            settings,
            action,
            shuffle_seed=0,
            compiler=functions,
        )

    def bare_update(self, settings: RunSettings, functions: CompileCache = EAGER) -> None:
        """The same minibatch steps with a minimal clipped loss and no diagnostics or statistics."""
        assert self.optimizer is not None and self.scheduler is not None
        bare_update(self.model, self.optimizer, self.scheduler, self.batch, settings, functions)


def tiny_rig(folder: Path) -> UpdateRig:
    """An :class:`UpdateRig` on the quick batch of the built-in tiny-0.1m (its files under ``folder``)."""
    model, tokenizer = harness.builtin_policy("tiny-0.1m", folder)
    prompts = harness.addition_prompts(PROMPTS, GROUP)
    return UpdateRig.create(model, make_batch(model, tokenizer, prompts, NEW_TOKENS))


def compiled_functions() -> CompileCache:
    """Compiled step functions with the options the trainer uses on a CPU (inductor's C++ wrapper)."""
    return CompileCache(True, options={"cpp_wrapper": True})


def bare_loss(
    model: Any, mb: UpdateBatch, temperature: float, eps_low: float, eps_high: float
) -> torch.Tensor:
    """A three-line clipped surrogate, token-mean: the loss of a bare update's minibatch step."""
    mask = mb.rollout.response_mask.float()
    logp = token_logprobs(response_logits(model, mb.rollout, temperature), mb.rollout.responses)
    ratio = torch.exp(logp - mb.logp_old)
    adv = mb.advantages[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def bare_update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: UpdateBatch,
    settings: RunSettings,
    functions: CompileCache = EAGER,
) -> None:
    generator = torch.Generator().manual_seed(0)
    model.train()
    eps_low = QUICK_ACTION.eps_low if QUICK_ACTION.eps_low is not None else 1.0
    eps_high = QUICK_ACTION.eps_high if QUICK_ACTION.eps_high is not None else math.inf
    loss_of = functions.wrap(bare_loss)
    for _ in range(settings.epochs):
        rows = batch.advantages.shape[0]
        for index in minibatch_indices(rows, settings.minibatches, generator, settings.group_size):
            loss = loss_of(model, batch.select(index), settings.temperature, eps_low, eps_high)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip or math.inf)
            optimizer.step()
            scheduler.step()
