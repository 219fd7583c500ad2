"""One GRPO update of tabular softmax policies: sampling, the clipped surrogate, PG / NPG / Adam steps.

An update samples one batch from pi_old (``prompts`` groups of ``group_size`` actions per seed, each group
in a context drawn uniformly), then makes ``passes`` passes over it in ``minibatches`` minibatches of
whole groups, one optimiser step per minibatch. Each seed's objective is the mean over its minibatch of
the clipped surrogate of :func:`entroclip.objectives.surrogate_terms` (the tensors of ``clipped_surrogate``);
its clip masks and its gradient (exactly 0 on clipped samples) are taken from that function, so the lab
follows the core's clipping rule.

With per-sample weights w_i = dJ/dlog pi(a_i) (= A_i r_i / B on samples that are not clipped), the steps
on the logits of context c are, with lr the learning rate:

- ``pg``: lr * sum_i w_i (e_{a_i} - pi_c), plain gradient ascent on the logits;
- ``npg``: lr * K * sum_i w_i e_{a_i} / pi_c(a_i), tabular natural policy gradient: for a softmax the
  Fisher matrix maps e_a / pi_a to e_a - pi, and the Fisher weight 1/K of a context (prompts are drawn
  uniformly) is divided out, so the step does not shrink with K (the paper's Theorem 2 has no d(s));
- ``adam``: Adam on the logits (torch.optim.Adam's update), with the gradient of the pg step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

from entroclip.compiling import CompiledForLargeInputs
from entroclip.losses import PolicyLossKind
from entroclip.objectives import surrogate_terms
from entroclip.theory.rewards import RandomReward
from entroclip.theory.softmax import SoftmaxState

Optimiser = Literal["pg", "npg", "adam"]
OPTIMISERS: tuple[str, ...] = get_args(Optimiser)

#: Starting points for the step size, per optimiser: large enough that ratios leave [0.8, 1.2] within an
#: update from the default policy (npg steps scale as 1 / pi_a and Adam's as lr itself).
DEFAULT_LR: dict[str, float] = {"pg": 1.0, "npg": 0.01, "adam": 0.05}


@dataclass(frozen=True)
class ClipBounds:
    """Clip bounds of the surrogate; None switches a side off (as in ``clipped_surrogate``)."""

    eps_low: float | None = 0.2
    eps_high: float | None = 0.2
    dual_clip: float | None = None

    def __post_init__(self) -> None:
        if self.eps_low is not None and not 0.0 <= self.eps_low <= 1.0:
            raise ValueError(f"eps_low must be in [0, 1] or None, got {self.eps_low}")
        if self.eps_high is not None and not self.eps_high >= 0.0:
            raise ValueError(f"eps_high must be >= 0 or None, got {self.eps_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")

    def without_low(self) -> ClipBounds:
        return replace(self, eps_low=None)

    def without_high(self) -> ClipBounds:
        return replace(self, eps_high=None)

    @property
    def clips(self) -> bool:
        return (self.eps_low, self.eps_high, self.dual_clip) != (None, None, None)


NO_CLIP = ClipBounds(None, None, None)


@dataclass(frozen=True)
class LabConfig:
    """Everything that defines an update, apart from the policies it starts from.

    ``lr`` is the step size on the logits (units: logits per unit of the per-seed objective).
    """

    clip: ClipBounds = field(default_factory=ClipBounds)
    optimiser: Optimiser = "pg"
    lr: float = 1.0
    passes: int = 1
    minibatches: int = 4
    prompts: int = 4
    group_size: int = 8
    reward: RandomReward = field(default_factory=RandomReward)
    #: a loss of entroclip.losses (GSPO, CISPO, SAPO, CE-GPPO) with the clip's bounds; None: PPO's clip
    loss: PolicyLossKind | None = None

    def __post_init__(self) -> None:
        if self.optimiser not in OPTIMISERS:
            raise ValueError(f"optimiser must be one of {OPTIMISERS}, got {self.optimiser!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if self.passes < 1 or self.minibatches < 1 or self.prompts < 1 or self.group_size < 2:
            raise ValueError(
                "need passes, minibatches, prompts >= 1 and group_size >= 2, got "
                f"{self.passes}, {self.minibatches}, {self.prompts}, {self.group_size}"
            )
        if self.prompts % self.minibatches != 0:
            raise ValueError(
                f"prompts ({self.prompts}) must be a multiple of minibatches ({self.minibatches}): "
                "minibatches hold whole groups"
            )

    def with_clip(self, clip: ClipBounds) -> LabConfig:
        return replace(self, clip=clip)

    @property
    def theorem_applies(self) -> bool:
        """Whether the closed form is the expected first-order change of every inner step.

        Theorems 1 and 2 average over samples that are independent of the current iterate pi_k. That
        holds for PG and NPG when each minibatch is used once (one pass): its groups were not used to
        move pi_k. From the second pass on, the clipped samples are the ones that moved the policy.
        """
        return self.optimiser in ("pg", "npg") and self.passes == 1 and self.loss is None


@dataclass(frozen=True)
class Minibatch:
    """Samples of one optimiser step, each ``[S, B]``; ``flat_actions`` = context * n + action."""

    contexts: Tensor
    flat_actions: Tensor
    advantages: Tensor
    logp_old: Tensor


@dataclass(frozen=True)
class Batch:
    """One rollout batch per seed: ``contexts`` ``[S, P]``; ``flat_actions``, ``advantages`` and
    ``logp_old`` ``[S, P, G]``; ``orders`` ``[passes - 1, S, P]``, the order of the groups in each pass
    after the first, which takes them as drawn (they are iid, so that order is as random as any)."""

    contexts: Tensor
    flat_actions: Tensor
    advantages: Tensor
    logp_old: Tensor
    orders: Tensor

    def minibatches(self, count: int) -> Iterator[Minibatch]:
        """The minibatches of all passes in order, ``count`` per pass, each of whole groups."""
        seeds, prompts, group_size = self.flat_actions.shape
        samples = (self.flat_actions, self.advantages, self.logp_old)
        for order in [None, *self.orders]:
            if order is None:
                contexts, shuffled = self.contexts, list(samples)
            else:
                index = order.unsqueeze(-1).expand(-1, -1, group_size)
                contexts, shuffled = self.contexts.gather(1, order), [x.gather(1, index) for x in samples]
            shuffled.insert(0, contexts.unsqueeze(-1).expand(-1, -1, group_size))
            for groups in range(0, prompts, prompts // count):
                part = slice(groups, groups + prompts // count)
                yield Minibatch(*(x[:, part].reshape(seeds, -1) for x in shuffled))


def sample_batch(policy: SoftmaxState, config: LabConfig, generator: torch.Generator) -> Batch:
    """Draw a rollout batch from the current policies (pi_old) of every seed."""
    seeds, contexts_n, n = policy.shape
    prompts, group_size = config.prompts, config.group_size
    contexts = torch.randint(contexts_n, (seeds, prompts), generator=generator)
    # Every context row draws prompts * group_size iid actions; prompt p of a seed takes the p-th group of
    # its own context's draws, so prompts that share a context get disjoint, independent draws.
    draws = policy.sample(prompts * group_size, generator).view(seeds, contexts_n, prompts, group_size)
    actions = draws.gather(1, contexts.view(seeds, 1, prompts, 1).expand(-1, 1, -1, group_size)).squeeze(1)
    flat_actions = contexts.unsqueeze(-1) * n + actions
    sample_contexts = contexts.unsqueeze(-1).expand(-1, -1, group_size)
    logp_old = policy.log_probs_at(flat_actions.reshape(seeds, -1), sample_contexts.reshape(seeds, -1))
    advantages = config.reward.sample_advantages((seeds, prompts), group_size, generator, policy.logits.dtype)
    orders = torch.rand(config.passes - 1, seeds, prompts, generator=generator).argsort(-1)
    return Batch(contexts, flat_actions, advantages, logp_old.view(seeds, prompts, group_size), orders)


def _weights_and_fractions(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    eps_low: Tensor,
    eps_high: Tensor,
    dual_clip: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`surrogate_weights` on bounds given as 0-d tensors (a compiled graph serves every value)."""

    def loss(logp: Tensor) -> tuple[Tensor, Tensor]:
        mask = torch.ones_like(logp, dtype=torch.bool)
        out, _ = surrogate_terms(
            logp, logp_old, advantages, mask, eps_low, eps_high, dual_clip, agg="seq-mean-token-mean"
        )
        # three means, not one over a stacked [3, S B] mask: that one compiles into a 4x slower kernel
        fractions = [clipped.float().mean() for clipped in (out.clip_low, out.clip_high, out.dual)]
        return out.loss, torch.stack(fractions)

    grad, fractions = torch.func.grad(loss, has_aux=True)(logp_new)
    return -grad * logp_new.shape[0], fractions


_weights_pass = CompiledForLargeInputs(_weights_and_fractions, "the theory lab")


def _kind_weights_and_fractions(
    logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip: ClipBounds, loss: PolicyLossKind
) -> tuple[Tensor, Tensor]:
    """:func:`surrogate_weights` for a loss of :mod:`entroclip.losses`, eagerly. Each sample is a one-token
    response (GSPO's sequence ratio is then the token ratio), and the mean over all S B samples has the
    same gradient per sample as the mean over each seed's B samples, then over the S seeds."""
    seeds = logp_new.shape[0]

    def objective(logp: Tensor) -> tuple[Tensor, Tensor]:
        column = (logp.reshape(-1, 1), logp_old.reshape(-1, 1), advantages.reshape(-1))
        mask = torch.ones_like(column[0], dtype=torch.bool)
        out = loss(*column, mask, clip.eps_low, clip.eps_high, clip.dual_clip, "seq-mean-token-mean", None)
        fractions = [event.float().mean() for event in (out.clip_low, out.clip_high, out.dual)]
        return out.loss, torch.stack(fractions)

    grad, fractions = torch.func.grad(objective, has_aux=True)(logp_new)
    return -grad * seeds, fractions


def surrogate_weights(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    clip: ClipBounds,
    policy_size: int = 0,
    loss: PolicyLossKind | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample weights w = dJ/dlog pi(a) of each seed's mean clipped surrogate J, ``[S, B]``, and the
    fractions of samples clipped low, high and by the dual clip, ``[3]``.

    Rows are seeds; ``seq-mean-token-mean`` averages over the B samples of a row and then over the S
    rows, so S times the gradient of the core's loss is minus each seed's own gradient. ``policy_size``
    (logits of the policies stepped) decides whether the work runs compiled. ``loss``: a kind of
    :mod:`entroclip.losses` instead of PPO's clip (always eager).
    """
    if loss is not None:
        return _kind_weights_and_fractions(logp_new, logp_old, advantages, clip, loss)
    # a side that is off gets a bound that never fires (r < 0, r > inf): one compiled graph serves all
    bounds = (
        1.0 if clip.eps_low is None else clip.eps_low,
        math.inf if clip.eps_high is None else clip.eps_high,
        math.inf if clip.dual_clip is None else clip.dual_clip,
    )
    return _weights_pass(policy_size, logp_new, logp_old, advantages, *map(logp_new.new_tensor, bounds))


def _adam_and_exponentiate(
    logits: Tensor,
    weights: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    sparse_gradient: Tensor,
    factor: Tensor,
    step_size: Tensor,
    root_correction: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    shift: Tensor,
) -> Tensor:
    """One Adam step on the logits along the gradient ``weights * factor + sparse_gradient``, with
    torch.optim.Adam's arithmetic; then ``logits -= shift`` and ``weights = exp(logits)``. Returns the
    weights' sums over actions ``[S, K, 1]``.

    Args:
        logits, weights, exp_avg, exp_avg_sq: ``[S, K, n]``, changed in place; sparse_gradient
        ``[S, K, n]``; factor, shift ``[S, K, 1]``; step_size = lr / (1 - beta1^t) and root_correction =
        sqrt(1 - beta2^t), 0-d tensors (one compiled graph serves every step t).
    """
    gradient = weights * factor + sparse_gradient
    exp_avg.lerp_(gradient, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
    logits.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / root_correction + eps))
    logits.sub_(shift)
    return torch.exp(logits, out=weights).sum(-1, keepdim=True)


_adam_pass = CompiledForLargeInputs(_adam_and_exponentiate, "the theory lab")


class LogitAdam:
    """Adam on the logits of every seed (torch.optim.Adam's update; by default betas (0.9, 0.999), eps
    1e-8; no weight decay), fused with the refresh of the policy's weights into one pass per step.

    The gradient of the negated objective on the logits of context c is pi_c sum_i w_i - sum_i w_i e_{a_i}
    (the pg step's direction, negated); its sparse part is scattered into a buffer that is zero between
    steps.
    """

    def __init__(
        self, policy: SoftmaxState, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = torch.zeros_like(policy.logits)
        self.exp_avg_sq = torch.zeros_like(policy.logits)
        self.sparse_gradient = torch.zeros_like(policy.logits)
        self.steps = 0

    def step(
        self, policy: SoftmaxState, flat_actions: Tensor, weights: Tensor, context_weight: Tensor
    ) -> None:
        """One step on sample weights ``weights`` at ``flat_actions`` (``[S, B]``), whose sums per context
        are ``context_weight`` ``[S, K]``."""
        seeds = policy.shape[0]
        sparse = self.sparse_gradient.view(seeds, -1)
        sparse.scatter_add_(1, flat_actions, -weights)
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = policy.logits.new_tensor(self.lr / (1 - beta1**self.steps))
        root_correction = policy.logits.new_tensor(math.sqrt(1 - beta2**self.steps))
        factor = context_weight.unsqueeze(-1) / policy.normaliser
        policy.update_logits(
            _adam_pass,
            self.exp_avg,
            self.exp_avg_sq,
            self.sparse_gradient,
            factor,
            step_size,
            root_correction,
            beta1,
            beta2,
            self.eps,
        )
        sparse.scatter_(1, flat_actions, 0.0)


def make_optimiser(policy: SoftmaxState, config: LabConfig) -> LogitAdam | None:
    """The Adam state that ``adam`` steps need (None for pg and npg); one per independent run."""
    return LogitAdam(policy, config.lr) if config.optimiser == "adam" else None


def ascend(
    policy: SoftmaxState,
    contexts: Tensor,
    flat_actions: Tensor,
    weights: Tensor,
    config: LabConfig,
    adam: LogitAdam | None = None,
    lr: float | None = None,
    log_probs: Tensor | None = None,
    unmoved: bool = False,
) -> None:
    """Take one optimiser step on sample weights ``weights`` ``[S, B]`` (npg touches only the sampled logits).

    ``lr`` overrides ``config.lr`` for pg and npg, whose steps are linear in it (a negative value steps
    backwards); Adam keeps the rate it was built with. ``log_probs``: log pi of the samples ``[S, B]`` at
    the current policies, where the caller has them (npg divides by pi). ``unmoved``: every sample's ratio
    is exactly 1 (the policies still are the ones that drew the samples). The weights A_i / B then sum to
    zero in every context, as the advantages do in every group, and the gradient's part along pi is taken
    as exactly zero, not as the float32 rounding of that sum: pg makes a sparse step, and Adam does not
    amplify the rounding into a step on every logit.
    """
    seeds, contexts_n, n = policy.shape
    lr = config.lr if lr is None else lr
    if config.optimiser == "npg":
        probs = (policy.log_probs_at(flat_actions, contexts) if log_probs is None else log_probs).exp()
        # a clipped sample (weight 0) of an action whose probability underflowed must not move: 0 / 0
        natural = torch.where(weights != 0, weights / probs, 0.0)
        policy.add_at(flat_actions, contexts, (lr * contexts_n) * natural)
        return
    if config.optimiser == "pg" and unmoved:
        policy.add_at(flat_actions, contexts, lr * weights)
        return
    context_weight = policy.logits.new_zeros(seeds, contexts_n)
    if not unmoved:
        context_weight.scatter_add_(1, contexts, weights)
    if config.optimiser == "pg":
        policy.logits.view(seeds, contexts_n * n).scatter_add_(1, flat_actions, lr * weights)
        policy.step_along_probs(-lr * context_weight)
        return
    if adam is None:
        raise ValueError("the adam optimiser needs its state: see make_optimiser")
    adam.step(policy, flat_actions, weights, context_weight)


@dataclass(frozen=True)
class ClipFractions:
    """Fractions of samples clipped, averaged over the inner steps of an update (core's stats)."""

    low: float
    high: float
    dual: float


class StepObserver(Protocol):
    """Hook called around every inner step of :func:`lab_update` (e.g. ``theory.theorems.PathTheory``)."""

    def before_step(self, policy: SoftmaxState) -> None: ...

    def after_step(self, policy: SoftmaxState) -> None: ...


def lab_update(
    policy: SoftmaxState,
    batch: Batch,
    config: LabConfig,
    adam: LogitAdam | None = None,
    observer: StepObserver | None = None,
) -> ClipFractions:
    """Apply one update (all passes and minibatches of ``batch``) to ``policy`` in place: the lab's
    tabular counterpart of the trainer's :func:`entroclip.update.run_update`."""
    fractions = []
    for minibatch in batch.minibatches(config.minibatches):
        logp_new = policy.log_probs_at(minibatch.flat_actions, minibatch.contexts)
        weights, clipped = surrogate_weights(
            logp_new,
            minibatch.logp_old,
            minibatch.advantages,
            config.clip,
            policy.logits.numel(),
            config.loss,
        )
        if observer is not None:
            observer.before_step(policy)
        unmoved = torch.equal(logp_new, minibatch.logp_old)
        ascend(
            policy,
            minibatch.contexts,
            minibatch.flat_actions,
            weights,
            config,
            adam,
            log_probs=logp_new,
            unmoved=unmoved,
        )
        if observer is not None:
            observer.after_step(policy)
        fractions.append(clipped)
    # an infinite logit makes its row's normaliser or entropy (0 * -inf) non-finite; the entropy costs
    # no extra pass: a dense step leaves it behind, and callers read it after the update in any case
    if not bool(torch.isfinite(policy.log_norm).all() and torch.isfinite(policy.entropy()).all()):
        raise FloatingPointError(
            f"the policy diverged (non-finite logits) under {config.optimiser} with lr={config.lr}: "
            "lower the learning rate (npg moves log pi_a by about lr / pi_a for a rare action a)"
        )
    return ClipFractions(*torch.stack(fractions).mean(0).tolist())
