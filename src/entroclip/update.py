"""One policy update: mu passes of shuffled minibatch steps on the clipped surrogate, with diagnostics.

Kept apart from the training loop so that the same update can be replayed on copies of the model with
other clip bounds (the counterfactual attribution probe).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from entroclip import metrics as names
from entroclip.attribution import EFFECT_KEYS, attribution_terms
from entroclip.compiling import EAGER, CompileCache
from entroclip.config import Config
from entroclip.control import ControlAction
from entroclip.covariance import CovSettings, covariance_terms
from entroclip.distributed import DistContext, global_loss_factor
from entroclip.entropy import token_stats
from entroclip.levers import high_entropy_mask, token_weight_effect, token_weight_term
from entroclip.losses import LEDGER_KEYS, PolicyLossKind, ledger_terms
from entroclip.objectives import Aggregation, KLKind, importance_ratio, surrogate_terms, with_regularisers
from entroclip.policy.sampling import Rollout, response_logits, response_logits_and_hidden
from entroclip.value import clipped_value_loss


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
class RunSettings:
    """What the update keeps fixed over a run, built once from the config (the per-step clip bounds and
    entropy coefficient come in the controller's :class:`ControlAction`). ``group_size``: minibatches hold
    whole groups of this many consecutive rows (1: single rows). A compiled step specialises on these."""

    dual_clip: float | None
    agg: Aggregation
    max_len: int | None
    temperature: float
    epochs: int
    minibatches: int
    grad_clip: float | None
    group_size: int
    kl_coef: float
    kl_kind: KLKind
    attribution: bool
    value_coef: float
    value_clip: float
    cov: CovSettings | None
    policy_loss: PolicyLossKind | None
    high_prob: float = 0.95
    top_entropy_quantile: float = 1.0

    @classmethod
    def from_config(cls, config: Config) -> RunSettings:
        return cls(
            dual_clip=config.loss.dual_clip,
            agg=config.loss.agg,
            max_len=config.loss.max_len or config.rollout.max_new_tokens,
            temperature=config.rollout.temperature,
            epochs=config.optim.epochs,
            minibatches=config.optim.minibatches,
            grad_clip=config.optim.grad_clip,
            group_size=config.rollout.group_size if config.optim.group_minibatches else 1,
            kl_coef=config.loss.kl.coef if not config.loss.kl.in_reward else 0.0,
            kl_kind=config.loss.kl.kind,
            attribution=config.diagnostics.attribution,
            value_coef=config.advantage.value_coef,
            value_clip=config.advantage.value_clip,
            cov=CovSettings.from_config(config.control),
            policy_loss=None
            if config.loss.kind == "ppo"
            else PolicyLossKind(
                config.loss.kind,
                config.loss.tau_pos,
                config.loss.tau_neg,
                config.loss.beta1,
                config.loss.beta2,
            ),
            high_prob=config.control.high_prob,
            top_entropy_quantile=config.loss.top_entropy_quantile,
        )


Reduction = Literal["sum", "min", "max"]

#: Each minibatch step's statistics by name, and how they combine over the update's steps and over
#: ranks. ``loss_pg``, ``value_loss`` and the effects are each rank's share of a global aggregate.
STEP_STATS: dict[str, Reduction] = {
    "tokens": "sum",
    "clip_low": "sum",
    "clip_high": "sum",
    "dual": "sum",
    "cov_selected": "sum",
    "ratio_sum": "sum",
    "ratio_min": "min",
    "ratio_max": "max",
    "loss_pg": "sum",
    "value_loss": "sum",
    **dict.fromkeys(EFFECT_KEYS, "sum"),
    "effect_rescale": "sum",
    "effect_weight": "sum",
    "likely": "sum",
}
#: statistics that only some steps report (the kinds of entroclip.losses; the token weights): absent until
#: a step adds them
_OPTIONAL = {"effect_rescale", "effect_weight", "likely"}
#: the first-order entropy effects, each rank's share of a global aggregate
_EFFECTS = (*EFFECT_KEYS, "effect_rescale", "effect_weight")
_START = {"sum": 0.0, "min": math.inf, "max": -math.inf}
_COMBINE: dict[Reduction, Callable[[float, float], float]] = {"sum": operator.add, "min": min, "max": max}


@dataclass
class UpdateStats:
    """The ``STEP_STATS`` of every minibatch step of one update, combined; step counts and the summed
    gradient norm (the same on every rank). ``metrics()`` turns them into the update's metrics."""

    totals: dict[str, float] = field(
        default_factory=lambda: {k: _START[r] for k, r in STEP_STATS.items() if k not in _OPTIONAL}
    )
    grad_norm_sum: float = 0.0
    value_steps: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            reduction = STEP_STATS[key]
            self.totals[key] = _COMBINE[reduction](self.totals.get(key, _START[reduction]), value)

    def reduced(self, ctx: DistContext) -> UpdateStats:
        """The stats of the global batch: every statistic combined over ranks by its reduction."""
        if not ctx.enabled:
            return self
        totals = dict(self.totals)
        for reduction, reduce in (("sum", ctx.sum), ("min", ctx.min), ("max", ctx.max)):
            keys = [k for k, r in STEP_STATS.items() if r == reduction and k in totals]
            totals.update(zip(keys, reduce([totals[k] for k in keys]), strict=True))
        return replace(self, totals=totals)

    def metrics(self) -> dict[str, float]:
        t = self.totals
        n = max(t["tokens"], 1.0)
        steps = max(self.optimizer_steps, 1)
        out = {
            names.CLIP_LOW: t["clip_low"] / n,
            names.CLIP_HIGH: t["clip_high"] / n,
            names.CLIP_REGION: (t["clip_low"] + t["clip_high"]) / n,
            names.CLIP_DUAL: t["dual"] / n,
            names.RATIO_MEAN: t["ratio_sum"] / n,
            names.RATIO_MIN: t["ratio_min"] if t["tokens"] else 1.0,
            names.RATIO_MAX: t["ratio_max"] if t["tokens"] else 1.0,
            names.LOSS_PG: t["loss_pg"] / steps,
            names.GRAD_NORM: self.grad_norm_sum / steps,
            names.OPTIMIZER_STEPS: float(self.optimizer_steps),
        }
        out.update({names.entropy_metric(k): t[k] for k in EFFECT_KEYS if k in t})
        for key in ("effect_rescale", "effect_weight"):
            if key in t:
                out[names.entropy_metric(key)] = t[key]
        if "likely" in t:
            out[names.LIKELY_TOKENS] = t["likely"] / n
        if t["cov_selected"]:
            out[names.CLIP_COV] = t["cov_selected"] / n
        if self.value_steps:
            out[names.LOSS_VALUE] = t["value_loss"] / self.value_steps
        return out


def minibatch_indices(
    batch_size: int, minibatches: int, generator: torch.Generator, group_size: int = 1
) -> list[Tensor]:
    """A shuffled split of ``range(batch_size)`` into ``minibatches`` near-equal parts of whole groups
    (``group_size`` consecutive rows; 1: single rows). Needs at least ``minibatches`` groups."""
    groups = batch_size // group_size
    if batch_size % group_size or groups < minibatches:
        raise ValueError(
            f"{batch_size} rows in groups of {group_size} cannot make {minibatches} minibatches of "
            "whole groups"
        )
    members = torch.arange(group_size)
    order = torch.randperm(groups, generator=generator)
    return [(part.unsqueeze(-1) * group_size + members).flatten() for part in order.chunk(minibatches)]


def run_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: UpdateBatch,
    settings: RunSettings,
    action: ControlAction,
    shuffle_seed: int,
    consecutive_skips: int = 0,
    value_head: torch.nn.Module | None = None,
    ctx: DistContext = SINGLE_PROCESS,
    compiler: CompileCache = EAGER,
) -> tuple[UpdateStats, int]:
    """Take ``epochs * minibatches`` optimizer steps with the clip bounds and entropy coefficient of
    ``action``; return the stats and the updated count of consecutive skipped steps.

    A step whose loss or gradient is not finite is skipped (no parameter or optimizer change). With a
    ``value_head`` (PPO), its clipped value loss is added with weight ``settings.value_coef``. Under data
    parallelism (``ctx``), ``model`` is the DDP-wrapped (or FSDP-sharded) policy and the batch is this
    rank's share; the returned stats are this rank's (see :meth:`UpdateStats.reduced`). ``compiler``:
    eager (the default) or compiled, see :class:`CompileCache`.
    """
    stats = UpdateStats()
    generator = torch.Generator().manual_seed(shuffle_seed)
    tensors = ActionTensors.of(action)
    model.train()
    rows = batch.advantages.shape[0]
    for _ in range(settings.epochs):
        for index in minibatch_indices(rows, settings.minibatches, generator, settings.group_size):
            mb = batch.select(index)
            args = (model, value_head, optimizer, mb, settings, action, tensors, stats, generator, ctx)
            if not compiler.compiled:
                ok = _minibatch_step(*args, compiler)
            else:
                state = generator.get_state()
                try:
                    ok = _minibatch_step(*args, compiler)
                except Exception as error:  # a failed compilation: the step again, eagerly
                    compiler.fall_back(error)
                    generator.set_state(state)
                    ok = _minibatch_step(*args, compiler)
            if ok:
                scheduler.step()
                consecutive_skips = 0
            else:
                consecutive_skips += 1
    return stats, consecutive_skips


class ActionTensors(NamedTuple):
    """A step's :class:`ControlAction` as 0-d tensors (None: off), so that a compiled step does not
    specialise on values that a controller changes from step to step. The bounds are float64 (``1 - eps``
    is then the same number as with Python floats), the coefficient float32 (the loss's dtype)."""

    eps_low: Tensor | None
    eps_high: Tensor | None
    entropy_coef: Tensor | None
    token_weight: Tensor | None = None

    @classmethod
    def of(cls, action: ControlAction) -> ActionTensors:
        def scalar(value: float | None, dtype: torch.dtype) -> Tensor | None:
            return torch.tensor(value, dtype=dtype) if value is not None else None

        coef = action.entropy_coef if action.entropy_coef != 0.0 else None
        weight = action.token_weight if action.token_weight != 0.0 else None
        return cls(
            scalar(action.eps_low, torch.float64),
            scalar(action.eps_high, torch.float64),
            scalar(coef, torch.float32),
            scalar(weight, torch.float32),
        )


class PolicyTerms(NamedTuple):
    """The forward pass of a minibatch: log-probs of the responses ``[B, T]``, entropy and kappa ``[B, T]``
    (when asked for) and the clipped value loss (with a value head)."""

    logp: Tensor
    entropy: Tensor | None
    kappa: Tensor | None
    value_loss: Tensor | None


def _policy_terms(
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    mb: UpdateBatch,
    settings: RunSettings,
    entropy: bool,
) -> PolicyTerms:
    rollout = mb.rollout
    if value_head is None:
        logits, value_loss = response_logits(model, rollout, settings.temperature), None
    else:
        logits, hidden = response_logits_and_hidden(model, rollout, settings.temperature)
        assert mb.old_values is not None and mb.returns is not None
        value_loss = clipped_value_loss(
            value_head(hidden), mb.old_values, mb.returns, rollout.response_mask, settings.value_clip
        )
    logp_new, ent, kap = token_stats(logits, rollout.responses, entropy=entropy, kappa=settings.attribution)
    assert logp_new is not None
    return PolicyTerms(logp_new, ent, kap, value_loss)


def _loss_terms(
    mb: UpdateBatch,
    terms: PolicyTerms,
    tensors: ActionTensors,
    settings: RunSettings,
    detach: Tensor | None,
    penalty: Tensor | None,
    selected: Tensor | None,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """The policy loss (before the data-parallel factor), the value loss, and the step's ``STEP_STATS``
    as 0-d float32 tensors (the effects when kappa is given)."""
    if settings.policy_loss is not None:
        loss, value_loss, step = _kind_loss_terms(mb, terms, tensors, settings, settings.policy_loss)
        return _with_token_weight(loss, mb, terms, tensors, settings, step), value_loss, step
    mask = mb.rollout.response_mask
    keep = None
    if settings.top_entropy_quantile < 1.0:
        assert terms.entropy is not None
        keep = high_entropy_mask(terms.entropy, mask, settings.top_entropy_quantile)
    out, _ = surrogate_terms(
        terms.logp,
        mb.logp_old,
        mb.advantages,
        mask,
        tensors.eps_low,
        tensors.eps_high,
        settings.dual_clip,
        settings.agg,
        settings.max_len,
        entropy=terms.entropy if tensors.entropy_coef is not None else None,
        entropy_coef=tensors.entropy_coef if tensors.entropy_coef is not None else 0.0,
        logp_ref=mb.logp_ref if settings.kl_coef != 0.0 else None,
        kl_coef=settings.kl_coef,
        kl_kind=settings.kl_kind,
        detach=detach,
        token_penalty=penalty,
        keep=keep,
    )
    with torch.no_grad():
        clipped = out.clip_low | out.clip_high | out.dual
        cov = selected & ~clipped if selected is not None else torch.zeros_like(mask)
        step = _event_stats(mask, out.ratio, (out.clip_low, out.clip_high, out.dual, cov))
        step["loss_pg"] = out.pg_loss.float()
        step["value_loss"] = _value_loss_stat(terms.value_loss, step["tokens"])
        if terms.kappa is not None:
            effects = attribution_terms(out, terms.kappa, mb.advantages, terms.logp, mb.logp_old, mask)
            step.update(zip(EFFECT_KEYS, effects, strict=True))
    return _with_token_weight(out.loss, mb, terms, tensors, settings, step), terms.value_loss, step


def _with_token_weight(
    loss: Tensor,
    mb: UpdateBatch,
    terms: PolicyTerms,
    tensors: ActionTensors,
    settings: RunSettings,
    step: dict[str, Tensor],
) -> Tensor:
    """``loss`` plus EntroPIC's token-weight term when the action has a weight (``entroclip.levers``);
    adds the count of likely tokens and, with kappa, ``effect_weight`` to ``step``."""
    if tensors.token_weight is None:
        return loss
    mask = mb.rollout.response_mask
    term, likely, scale = token_weight_term(
        terms.logp, mb.logp_old, mb.advantages, mask, settings.high_prob, settings.agg, settings.max_len
    )
    with torch.no_grad():
        step["likely"] = likely.sum(dtype=torch.float32)
        if terms.kappa is not None:
            ratio = importance_ratio(terms.logp.detach(), mb.logp_old, mask)
            step["effect_weight"] = token_weight_effect(
                tensors.token_weight, mb.advantages, ratio, likely, scale, terms.kappa
            )
    return loss + tensors.token_weight * term


def _kind_loss_terms(
    mb: UpdateBatch, terms: PolicyTerms, tensors: ActionTensors, settings: RunSettings, kind: PolicyLossKind
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """:func:`_loss_terms` for the kinds of :mod:`entroclip.losses` (GSPO, CISPO, SAPO, CE-GPPO): their
    events and generalised entropy ledger in the same statistics; ``effect_rescale`` besides."""
    mask = mb.rollout.response_mask
    out = kind(
        terms.logp,
        mb.logp_old,
        mb.advantages,
        mask,
        tensors.eps_low,
        tensors.eps_high,
        settings.dual_clip,
        settings.agg,
        settings.max_len,
    )
    loss, _ = with_regularisers(
        out.loss,
        terms.logp,
        mask,
        settings.agg,
        settings.max_len,
        terms.entropy if tensors.entropy_coef is not None else None,
        tensors.entropy_coef if tensors.entropy_coef is not None else 0.0,
        mb.logp_ref if settings.kl_coef != 0.0 else None,
        settings.kl_coef,
        settings.kl_kind,
    )
    with torch.no_grad():
        step = _event_stats(mask, out.ratio, (out.clip_low, out.clip_high, out.dual, torch.zeros_like(mask)))
        step["loss_pg"] = out.loss.detach().float()
        step["value_loss"] = _value_loss_stat(terms.value_loss, step["tokens"])
        if terms.kappa is not None:
            ledger = dict(zip(LEDGER_KEYS, ledger_terms(out, terms.kappa), strict=True))
            step.update({key: ledger.get(key, torch.zeros_like(step["tokens"])) for key in EFFECT_KEYS})
            step["effect_rescale"] = ledger["effect_rescale"]
    return loss, terms.value_loss, step


def _event_stats(
    mask: Tensor, ratio: Tensor, events: tuple[Tensor, Tensor, Tensor, Tensor]
) -> dict[str, Tensor]:
    """Token and event counts (clip-low, clip-high, dual, covariance-selected) and the ratio's sum, min
    and max over the valid tokens, 0-d float32 each; counted in one reduction."""
    counts = torch.stack([mask, *events]).flatten(1).sum(-1, dtype=torch.float32)
    inf = torch.full((), math.inf, dtype=torch.float32, device=ratio.device)
    step = dict(zip(("tokens", "clip_low", "clip_high", "dual", "cov_selected"), counts, strict=True))
    step["ratio_sum"] = torch.where(mask, ratio, 0.0).sum().float()
    step["ratio_min"] = (torch.where(mask, ratio, math.inf).min() if ratio.numel() else inf).float()
    step["ratio_max"] = (torch.where(mask, ratio, -math.inf).max() if ratio.numel() else -inf).float()
    return step


def _value_loss_stat(value_loss: Tensor | None, like: Tensor) -> Tensor:
    return (value_loss if value_loss is not None else torch.zeros_like(like)).float()


def _step_terms(
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    mb: UpdateBatch,
    tensors: ActionTensors,
    settings: RunSettings,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """``_policy_terms`` and ``_loss_terms`` of a step without Clip-Cov / KL-Cov, as one function (one
    compiled graph)."""
    terms = _policy_terms(model, value_head, mb, settings, _needs_entropy(tensors, settings))
    return _loss_terms(mb, terms, tensors, settings, None, None, None)


def _needs_entropy(tensors: ActionTensors, settings: RunSettings) -> bool:
    """Whether the step needs the per-token entropy: for the bonus or the high-entropy mask."""
    return tensors.entropy_coef is not None or settings.top_entropy_quantile < 1.0


def _minibatch_step(
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    mb: UpdateBatch,
    settings: RunSettings,
    action: ControlAction,
    tensors: ActionTensors,
    stats: UpdateStats,
    generator: torch.Generator,
    ctx: DistContext,
    compiler: CompileCache = EAGER,
) -> bool:
    mask = mb.rollout.response_mask
    if settings.cov is None:
        loss, value_loss, step = compiler.wrap(_step_terms)(model, value_head, mb, tensors, settings)
    else:
        entropy = _needs_entropy(tensors, settings)
        terms = compiler.wrap(_policy_terms)(model, value_head, mb, settings, entropy)
        detach, penalty, selected = covariance_terms(
            settings.cov,
            mb.advantages,
            terms.logp,
            mb.logp_old,
            mask,
            action.eps_low,
            action.eps_high,
            settings.dual_clip,
            generator,
        )
        loss, value_loss, step = compiler.wrap(_loss_terms)(
            mb, terms, tensors, settings, detach, penalty, selected
        )
    # each rank's share of the global aggregate (1 in a single process); DDP averages the gradients
    factor = global_loss_factor(mask, settings.agg, ctx)
    token_factor = global_loss_factor(mask, "token-mean", ctx)
    loss = loss * factor
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
    optimizer.step()
    values = dict(zip(step, torch.stack(list(step.values())).tolist(), strict=True))  # the one host sync
    # the global aggregates' shares; the value loss and the effects only where they were computed
    values["loss_pg"] = values["loss_pg"] * factor / ctx.world_size
    values["value_loss"] = values["value_loss"] * token_factor / ctx.world_size
    if value_loss is None:
        del values["value_loss"]
    else:
        stats.value_steps += 1
    for key in _EFFECTS if settings.attribution else ():
        if key not in values:
            continue
        values[key] = values[key] * factor / ctx.world_size
    stats.add(values)
    stats.grad_norm_sum += float(grad_norm)
    stats.optimizer_steps += 1
    return True
