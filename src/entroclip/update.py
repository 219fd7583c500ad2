"""One policy update: mu passes of shuffled minibatch steps on the clipped surrogate, with diagnostics.

Kept apart from the training loop so that the same update can be replayed on copies of the model with
other clip bounds (the counterfactual attribution probe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor
from transformers import PreTrainedModel

from entroclip.control import clip_cov_select, kl_cov_select
from entroclip.distributed import DistContext, global_loss_factor
from entroclip.entropy import EFFECT_KEYS, clip_attribution, token_stats
from entroclip.objectives import (
    LOG_RATIO_LIMIT,
    Aggregation,
    KLKind,
    broadcast_advantages,
    clip_masks,
    clipped_surrogate,
)
from entroclip.policy.sampling import Rollout, response_logits, response_logits_and_hidden
from entroclip.value import ValueHead, clipped_value_loss


@dataclass
class UpdateBatch:
    """A rollout batch ready for the update.

    ``advantages``: ``[B]`` (per sequence) or ``[B, T]`` (GAE); ``logp_old``/``logp_ref``: ``[B, T]``;
    ``old_values``/``returns``: ``[B, T]`` when a value head is trained.
    """

    rollout: Rollout
    advantages: Tensor
    logp_old: Tensor
    logp_ref: Tensor | None = None
    old_values: Tensor | None = None
    returns: Tensor | None = None

    def select(self, index: Tensor) -> UpdateBatch:
        def pick(t: Tensor | None) -> Tensor | None:
            return t[index] if t is not None else None

        return UpdateBatch(
            self.rollout.select(index),
            self.advantages[index],
            self.logp_old[index],
            pick(self.logp_ref),
            pick(self.old_values),
            pick(self.returns),
        )


SINGLE_PROCESS = DistContext()


@dataclass(frozen=True)
class CovSettings:
    """Clip-Cov / KL-Cov token selection in every minibatch step (see entroclip.control)."""

    kind: Literal["clip_cov", "kl_cov"]
    fraction: float
    lower: float = 1.0
    upper: float = 5.0
    coef: float = 1.0


@dataclass(frozen=True)
class UpdateSettings:
    """Everything the update needs besides the model, the optimizer and the batch."""

    eps_low: float | None
    eps_high: float | None
    dual_clip: float | None
    agg: Aggregation
    max_len: int | None
    temperature: float
    epochs: int
    minibatches: int
    grad_clip: float | None
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_kind: KLKind = "k3"
    attribution: bool = True
    value_coef: float = 0.5
    value_clip: float = 0.2
    cov: CovSettings | None = None


@dataclass
class UpdateStats:
    """Token-weighted sums over every minibatch step of one update; ``metrics()`` turns them into means."""

    tokens: float = 0.0
    clip_low: float = 0.0
    clip_high: float = 0.0
    dual: float = 0.0
    ratio_sum: float = 0.0
    ratio_min: float = math.inf
    ratio_max: float = -math.inf
    loss_sum: float = 0.0
    kl_sum: float = 0.0
    grad_norm_sum: float = 0.0
    value_loss_sum: float = 0.0
    cov_selected: float = 0.0
    value_steps: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0
    effects: dict[str, float] = field(default_factory=lambda: dict.fromkeys(EFFECT_KEYS, 0.0))

    def reduced(self, ctx: DistContext) -> UpdateStats:
        """The stats of the global batch: sums over ranks (gradient norms and step counts are the same on
        every rank and stay as they are)."""
        if not ctx.enabled:
            return self
        keys = list(self.effects)
        summed = ctx.sum(
            [
                self.tokens,
                self.clip_low,
                self.clip_high,
                self.dual,
                self.cov_selected,
                self.ratio_sum,
                self.loss_sum,
                self.value_loss_sum,
                *(self.effects[k] for k in keys),
            ]
        )
        (ratio_min,), (ratio_max,) = ctx.min([self.ratio_min]), ctx.max([self.ratio_max])
        tokens, low, high, dual, cov, ratio_sum, loss, value_loss, *effects = summed
        return replace(
            self,
            tokens=tokens,
            clip_low=low,
            clip_high=high,
            dual=dual,
            cov_selected=cov,
            ratio_sum=ratio_sum,
            ratio_min=ratio_min,
            ratio_max=ratio_max,
            loss_sum=loss,
            value_loss_sum=value_loss,
            effects=dict(zip(keys, effects, strict=True)),
        )

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        steps = max(self.optimizer_steps, 1)
        out = {
            "clip_ratio/low_mean": self.clip_low / n,
            "clip_ratio/high_mean": self.clip_high / n,
            "clip_ratio/region_mean": (self.clip_low + self.clip_high) / n,
            "clip_ratio/dual_mean": self.dual / n,
            "ratio/mean": self.ratio_sum / n,
            "ratio/min": self.ratio_min if self.tokens else 1.0,
            "ratio/max": self.ratio_max if self.tokens else 1.0,
            "loss/pg": self.loss_sum / steps,
            "grad/norm": self.grad_norm_sum / steps,
            "train/optimizer_steps": float(self.optimizer_steps),
        }
        out.update({f"entropy/{k}": v for k, v in self.effects.items()})
        if self.cov_selected:
            out["clip_ratio/cov_mean"] = self.cov_selected / n
        if self.value_steps:
            out["loss/value"] = self.value_loss_sum / self.value_steps
        return out


def minibatch_indices(batch_size: int, minibatches: int, generator: torch.Generator) -> list[Tensor]:
    """A shuffled split of ``range(batch_size)`` into ``minibatches`` near-equal parts."""
    return list(torch.randperm(batch_size, generator=generator).chunk(minibatches))


def run_update(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: UpdateBatch,
    settings: UpdateSettings,
    shuffle_seed: int,
    consecutive_skips: int = 0,
    value_head: ValueHead | None = None,
    ctx: DistContext = SINGLE_PROCESS,
) -> tuple[UpdateStats, int]:
    """Take ``epochs * minibatches`` optimizer steps; return the stats and the updated count of
    consecutive skipped steps.

    A step whose loss or gradient is not finite is skipped (no parameter or optimizer change). With a
    ``value_head`` (PPO), its clipped value loss is added with weight ``settings.value_coef``. Under data
    parallelism (``ctx``), ``model`` is the DDP-wrapped (or FSDP-sharded) policy and the batch is this
    rank's share; the returned stats are this rank's (see :meth:`UpdateStats.reduced`).
    """
    stats = UpdateStats()
    generator = torch.Generator().manual_seed(shuffle_seed)
    model.train()
    for _ in range(settings.epochs):
        for index in minibatch_indices(batch.advantages.shape[0], settings.minibatches, generator):
            ok = _minibatch_step(
                model, value_head, optimizer, batch.select(index), settings, stats, generator, ctx
            )
            if ok:
                scheduler.step()
                consecutive_skips = 0
            else:
                consecutive_skips += 1
    return stats, consecutive_skips


def _minibatch_step(
    model: PreTrainedModel,
    value_head: ValueHead | None,
    optimizer: torch.optim.Optimizer,
    mb: UpdateBatch,
    settings: UpdateSettings,
    stats: UpdateStats,
    generator: torch.Generator,
    ctx: DistContext,
) -> bool:
    rollout = mb.rollout
    mask = rollout.response_mask
    if value_head is None:
        logits, value_loss = response_logits(model, rollout, settings.temperature), None
    else:
        logits, hidden = response_logits_and_hidden(model, rollout, settings.temperature)
        assert mb.old_values is not None and mb.returns is not None
        value_loss = clipped_value_loss(
            value_head(hidden), mb.old_values, mb.returns, mask, settings.value_clip
        )
    logp_new, entropy, kappa = token_stats(
        logits, rollout.responses, entropy=bool(settings.entropy_coef), kappa=settings.attribution
    )
    assert logp_new is not None
    detach, penalty, selected = _covariance_terms(mb, logp_new, settings, generator)
    out = clipped_surrogate(
        logp_new,
        mb.logp_old,
        mb.advantages,
        mask,
        settings.eps_low,
        settings.eps_high,
        settings.dual_clip,
        settings.agg,
        settings.max_len,
        entropy=entropy,
        entropy_coef=settings.entropy_coef,
        logp_ref=mb.logp_ref,
        kl_coef=settings.kl_coef,
        kl_kind=settings.kl_kind,
        detach=detach,
        token_penalty=penalty,
    )
    # each rank's share of the global aggregate (1 in a single process); DDP averages the gradients
    factor = global_loss_factor(mask, settings.agg, ctx)
    token_factor = global_loss_factor(mask, "token-mean", ctx)
    loss = out.loss * factor
    if value_loss is not None:
        loss = loss + settings.value_coef * value_loss * token_factor
    optimizer.zero_grad(set_to_none=True)
    if not ctx.enabled and not torch.isfinite(loss):
        stats.skipped_steps += 1
        return False
    loss.backward()  # with several ranks a non-finite loss is caught below, on every rank at once
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    max_norm = settings.grad_clip if settings.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        stats.skipped_steps += 1
        return False
    if kappa is not None:
        for key, value in clip_attribution(out, kappa, mb.advantages, logp_new, mb.logp_old, mask).items():
            stats.effects[key] += value * factor / ctx.world_size
    optimizer.step()
    n = float(mask.sum())
    valid_ratio = out.ratio[mask]
    stats.tokens += n
    stats.clip_low += float(out.clip_low.sum())
    stats.clip_high += float(out.clip_high.sum())
    stats.dual += float(out.dual.sum())
    stats.cov_selected += float((selected & ~(out.clip_low | out.clip_high | out.dual)).sum())
    stats.ratio_sum += float(valid_ratio.sum())
    if valid_ratio.numel():
        stats.ratio_min = min(stats.ratio_min, float(valid_ratio.min()))
        stats.ratio_max = max(stats.ratio_max, float(valid_ratio.max()))
    stats.loss_sum += out.stats["loss/pg"] * factor / ctx.world_size
    stats.grad_norm_sum += float(grad_norm)
    if value_loss is not None:
        stats.value_loss_sum += float(value_loss.detach()) * token_factor / ctx.world_size
        stats.value_steps += 1
    stats.optimizer_steps += 1
    return True


def _covariance_terms(
    mb: UpdateBatch, logp_new: Tensor, settings: UpdateSettings, generator: torch.Generator
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Clip-Cov's detach mask or KL-Cov's per-token penalty for one minibatch, and the selected tokens."""
    mask = mb.rollout.response_mask
    cov = settings.cov
    if cov is None:
        return None, None, torch.zeros_like(mask)
    adv = broadcast_advantages(mb.advantages, mask)
    if cov.kind == "kl_cov":
        chosen = kl_cov_select(adv, logp_new, mask, cov.fraction)
        abs_log_ratio = (logp_new - mb.logp_old).abs()
        return None, torch.where(chosen, cov.coef * abs_log_ratio, torch.zeros_like(abs_log_ratio)), chosen
    ratio = torch.exp((logp_new.detach() - mb.logp_old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    low, high, dual = clip_masks(ratio, adv, mask, settings.eps_low, settings.eps_high, settings.dual_clip)
    chosen = clip_cov_select(
        adv, logp_new, mask, low | high | dual, cov.fraction, cov.lower, cov.upper, generator
    )
    return chosen, None, chosen
