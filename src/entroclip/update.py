"""One policy update: mu passes of shuffled minibatch steps on the clipped surrogate, with diagnostics.

Kept apart from the training loop so that the same update can be replayed on copies of the model with
other clip bounds (the counterfactual attribution probe).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple, TypeVar

import torch
from torch import Tensor

from entroclip.control import clip_cov_select, kl_cov_select
from entroclip.distributed import DistContext, global_loss_factor
from entroclip.entropy import EFFECT_KEYS, attribution_terms, token_stats
from entroclip.objectives import (
    LOG_RATIO_LIMIT,
    Aggregation,
    KLKind,
    broadcast_advantages,
    clip_masks,
    surrogate_terms,
)
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
T = TypeVar("T")


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
    """Everything the update needs besides the model, the optimizer and the batch. ``group_size``:
    minibatches hold whole groups of this many consecutive rows (1: single rows)."""

    eps_low: float | None
    eps_high: float | None
    dual_clip: float | None
    agg: Aggregation
    max_len: int | None
    temperature: float
    epochs: int
    minibatches: int
    grad_clip: float | None
    group_size: int = 1
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


class StepFunctions:
    """The tensor work of a minibatch step (the forward pass, the per-token statistics, the loss and the
    step's statistics), run eagerly or compiled with ``torch.compile`` (``run.compile``).

    Compiling removes most of the per-operator overhead (Python, dispatcher, autograd bookkeeping) of the
    forward and the backward pass, which dominates the update of a small model; the first step of every
    new shape pays the compilation. If compiling or running a compiled function fails, the step is taken
    again eagerly, with a warning, and every later step runs eagerly.
    """

    def __init__(
        self, compile: bool = False, backend: str = "inductor", options: dict[str, Any] | None = None
    ) -> None:
        """``backend`` and ``options`` go to ``torch.compile`` (``options`` for inductor only)."""
        self.compiled = compile
        self.backend = backend
        self.options = options if backend == "inductor" else None
        self._functions: dict[Callable[..., Any], Callable[..., Any]] = {}

    def get(self, function: Callable[..., T]) -> Callable[..., T]:
        """``function`` as it runs: compiled (once per function) when on, else as it is."""
        if not self.compiled:
            return function
        if function not in self._functions:
            self._functions[function] = torch.compile(function, backend=self.backend, options=self.options)
        return self._functions[function]

    def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)``, compiled when on; a failure to compile falls back to eager. Only for
        functions without side effects (a no-grad forward pass)."""
        if not self.compiled:
            return function(*args)
        try:
            return self.get(function)(*args)
        except Exception as error:
            self.fall_back(error)
            return function(*args)

    def fall_back(self, error: BaseException) -> None:
        """Warn and run everything eagerly from here on."""
        cause = getattr(error, "inner_exception", None) or error  # the backend's own error
        first_line = next(iter(str(cause).strip().splitlines()), "")
        warnings.warn(
            f"run.compile: torch.compile failed, training continues eagerly "
            f"({type(cause).__name__}: {first_line})",
            RuntimeWarning,
            stacklevel=3,
        )
        self.compiled = False
        self._functions.clear()


EAGER = StepFunctions()


def run_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: UpdateBatch,
    settings: UpdateSettings,
    shuffle_seed: int,
    consecutive_skips: int = 0,
    value_head: torch.nn.Module | None = None,
    ctx: DistContext = SINGLE_PROCESS,
    functions: StepFunctions = EAGER,
) -> tuple[UpdateStats, int]:
    """Take ``epochs * minibatches`` optimizer steps; return the stats and the updated count of
    consecutive skipped steps.

    A step whose loss or gradient is not finite is skipped (no parameter or optimizer change). With a
    ``value_head`` (PPO), its clipped value loss is added with weight ``settings.value_coef``. Under data
    parallelism (``ctx``), ``model`` is the DDP-wrapped (or FSDP-sharded) policy and the batch is this
    rank's share; the returned stats are this rank's (see :meth:`UpdateStats.reduced`). ``functions``:
    eager (the default) or compiled, see :class:`StepFunctions`.
    """
    stats = UpdateStats()
    generator = torch.Generator().manual_seed(shuffle_seed)
    knobs, static = _knobs(settings), _StaticSettings.of(settings)
    model.train()
    rows = batch.advantages.shape[0]
    for _ in range(settings.epochs):
        for index in minibatch_indices(rows, settings.minibatches, generator, settings.group_size):
            mb = batch.select(index)
            args = (model, value_head, optimizer, mb, settings, static, knobs, stats, generator, ctx)
            if not functions.compiled:
                ok = _minibatch_step(*args, functions)
            else:
                state = generator.get_state()
                try:
                    ok = _minibatch_step(*args, functions)
                except Exception as error:  # a failed compilation: the step again, eagerly
                    functions.fall_back(error)
                    generator.set_state(state)
                    ok = _minibatch_step(*args, functions)
            if ok:
                scheduler.step()
                consecutive_skips = 0
            else:
                consecutive_skips += 1
    return stats, consecutive_skips


class _Knobs(NamedTuple):
    """The settings a controller changes from step to step, as 0-d tensors (None: off), so that a
    compiled step does not specialise on their values. The bounds are float64 (``1 - eps`` is then the
    same number as with Python floats), the coefficient float32 (the loss's dtype)."""

    eps_low: Tensor | None
    eps_high: Tensor | None
    entropy_coef: Tensor | None


def _knobs(settings: UpdateSettings) -> _Knobs:
    def scalar(value: float | None, dtype: torch.dtype) -> Tensor | None:
        return torch.tensor(value, dtype=dtype) if value is not None else None

    coef = settings.entropy_coef if settings.entropy_coef != 0.0 else None
    return _Knobs(
        scalar(settings.eps_low, torch.float64),
        scalar(settings.eps_high, torch.float64),
        scalar(coef, torch.float32),
    )


#: The floats of one minibatch step in the order of the vector ``_loss_terms`` returns (then EFFECT_KEYS).
_STEP_STATS = (
    "tokens",
    "clip_low",
    "clip_high",
    "dual",
    "cov_selected",
    "ratio_sum",
    "ratio_min",
    "ratio_max",
    "loss_pg",
    "value_loss",
)


def _policy_terms(
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    mb: UpdateBatch,
    temperature: float,
    entropy: bool,
    kappa: bool,
    value_clip: float,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The forward pass of a minibatch: log-probs of the responses, entropy and kappa (when asked for)
    and the clipped value loss (with a value head)."""
    rollout = mb.rollout
    if value_head is None:
        logits, value_loss = response_logits(model, rollout, temperature), None
    else:
        logits, hidden = response_logits_and_hidden(model, rollout, temperature)
        assert mb.old_values is not None and mb.returns is not None
        value_loss = clipped_value_loss(
            value_head(hidden), mb.old_values, mb.returns, rollout.response_mask, value_clip
        )
    logp_new, ent, kap = token_stats(logits, rollout.responses, entropy=entropy, kappa=kappa)
    assert logp_new is not None
    return logp_new, ent, kap, value_loss


def _loss_terms(
    mb: UpdateBatch,
    terms: tuple[Tensor, Tensor | None, Tensor | None, Tensor | None],
    knobs: _Knobs,
    settings: _StaticSettings,
    detach: Tensor | None,
    penalty: Tensor | None,
    selected: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The surrogate loss (before the data-parallel factor), the value loss, and the step's statistics as
    one float32 vector (``_STEP_STATS``, then ``EFFECT_KEYS`` when kappa is given)."""
    logp_new, entropy, kappa, value_loss = terms
    mask = mb.rollout.response_mask
    out, _ = surrogate_terms(
        logp_new,
        mb.logp_old,
        mb.advantages,
        mask,
        knobs.eps_low,
        knobs.eps_high,
        settings.dual_clip,
        settings.agg,
        settings.max_len,
        entropy=entropy if knobs.entropy_coef is not None else None,
        entropy_coef=knobs.entropy_coef if knobs.entropy_coef is not None else 0.0,
        logp_ref=mb.logp_ref if settings.kl_coef != 0.0 else None,
        kl_coef=settings.kl_coef,
        kl_kind=settings.kl_kind,
        detach=detach,
        token_penalty=penalty,
    )
    with torch.no_grad():
        r = out.ratio
        # tokens, clip_low, clip_high, dual and cov_selected, counted in one reduction
        clipped = out.clip_low | out.clip_high | out.dual
        cov = selected & ~clipped if selected is not None else torch.zeros_like(mask)
        events = torch.stack([mask, out.clip_low, out.clip_high, out.dual, cov])
        counts = events.flatten(1).sum(-1, dtype=torch.float32)
        inf = torch.full((), math.inf, dtype=torch.float32, device=r.device)
        values = [
            torch.where(mask, r, 0.0).sum(),
            torch.where(mask, r, math.inf).min() if r.numel() else inf,
            torch.where(mask, r, -math.inf).max() if r.numel() else -inf,
            out.pg_loss,
            value_loss if value_loss is not None else torch.zeros_like(inf),
        ]
        vector = torch.cat([counts, torch.stack([v.float() for v in values])])
        if kappa is not None:
            effects = attribution_terms(out, kappa, mb.advantages, logp_new, mb.logp_old, mask)
            vector = torch.cat([vector, effects])
    return out.loss, value_loss, vector


def _step_terms(
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    mb: UpdateBatch,
    knobs: _Knobs,
    settings: _StaticSettings,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``_policy_terms`` and ``_loss_terms`` of a step without Clip-Cov / KL-Cov, as one function (one
    compiled graph)."""
    terms = _policy_terms(
        model, value_head, mb, settings.temperature, settings.entropy, settings.kappa, settings.value_clip
    )
    return _loss_terms(mb, terms, knobs, settings, None, None, None)


@dataclass(frozen=True)
class _StaticSettings:
    """The settings a run keeps fixed (a compiled step specialises on them)."""

    temperature: float
    entropy: bool
    kappa: bool
    value_clip: float
    dual_clip: float | None
    agg: Aggregation
    max_len: int | None
    kl_coef: float
    kl_kind: KLKind

    @classmethod
    def of(cls, settings: UpdateSettings) -> _StaticSettings:
        return cls(
            settings.temperature,
            settings.entropy_coef != 0.0,
            settings.attribution,
            settings.value_clip,
            settings.dual_clip,
            settings.agg,
            settings.max_len,
            settings.kl_coef,
            settings.kl_kind,
        )


def _minibatch_step(
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    mb: UpdateBatch,
    settings: UpdateSettings,
    static: _StaticSettings,
    knobs: _Knobs,
    stats: UpdateStats,
    generator: torch.Generator,
    ctx: DistContext,
    functions: StepFunctions = EAGER,
) -> bool:
    mask = mb.rollout.response_mask
    if settings.cov is None:
        loss, value_loss, vector = functions.get(_step_terms)(model, value_head, mb, knobs, static)
    else:
        terms = functions.get(_policy_terms)(
            model, value_head, mb, static.temperature, static.entropy, static.kappa, static.value_clip
        )
        detach, penalty, selected = _covariance_terms(mb, terms[0], settings, generator)
        loss, value_loss, vector = functions.get(_loss_terms)(
            mb, terms, knobs, static, detach, penalty, selected
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
    values = dict(zip(_STEP_STATS + EFFECT_KEYS, vector.tolist(), strict=False))  # the one host sync
    stats.tokens += values["tokens"]
    stats.clip_low += values["clip_low"]
    stats.clip_high += values["clip_high"]
    stats.dual += values["dual"]
    stats.cov_selected += values["cov_selected"]
    stats.ratio_sum += values["ratio_sum"]
    stats.ratio_min = min(stats.ratio_min, values["ratio_min"])
    stats.ratio_max = max(stats.ratio_max, values["ratio_max"])
    stats.loss_sum += values["loss_pg"] * factor / ctx.world_size
    stats.grad_norm_sum += float(grad_norm)
    if value_loss is not None:
        stats.value_loss_sum += values["value_loss"] * token_factor / ctx.world_size
        stats.value_steps += 1
    if settings.attribution:
        for key in EFFECT_KEYS:
            stats.effects[key] += values[key] * factor / ctx.world_size
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
