"""Policy losses besides PPO's token clip (GSPO, CISPO, SAPO, CE-GPPO), each with PPO's entropy ledger.

All functions are pure functions of tensors with the inputs of :func:`entroclip.objectives.surrogate_terms`:
``logp_new`` ``[B, T]`` (differentiable), ``logp_old`` ``[B, T]`` (a constant), advantages ``[B]`` or
``[B, T]``, a response ``mask`` ``[B, T]`` (bool or 0/1), and, where the kind allows it, an aggregation mode
``agg`` with ``max_len`` (see :func:`entroclip.objectives.aggregation_scale`). Each returns a
:class:`PolicyLoss`.

The entropy ledger. The gradient of every loss here is ``-sum_t w_t grad log pi(a_t)``: w_t
(``PolicyLoss.weight``) is token t's effective policy-gradient weight. The plain, unclipped policy gradient
with the same aggregation has ``w_pg_t = A_t r_t / N_t`` (``PolicyLoss.pg_weight``, r_t the token ratio).
A gradient step of size eta on token t's own logits changes its entropy by ``eta w_t kappa_t`` to first
order, so what a kind removes or rescales on a set of tokens changes the entropy by
``sum (w_t - w_pg_t) kappa_t`` per unit step (:func:`entropy_ledger`). On PPO's clipped tokens w = 0, and
this is minus what their gradient would have done: :func:`entroclip.attribution.clip_attribution`'s
``effect_low`` / ``effect_high`` / ``effect_dual``.

Events per kind (the bool masks ``clip_low`` / ``clip_high`` / ``dual``, disjoint, False on invalid tokens;
r the token ratio, s_i = exp(mean_t log r_it) the sequence ratio, N_t the aggregation's count):

======== ================================================ ================================================
kind     events                                           w_t
======== ================================================ ================================================
ppo      low: A < 0, r < 1 - eps_low; high: A > 0,        0 on events, A r / N elsewhere
         r > 1 + eps_high; dual: A < 0, r > c
gspo     PPO's low / high on s_i, on every token of the   0 on events, A s_i / N elsewhere
         sequence (no dual)
cispo    low: r < 1 - eps_low; high: r > 1 + eps_high,    A clip(r, 1 - eps_low, 1 + eps_high) / N
         whatever the sign of A (CISPO caps the weight
         of every token)
sapo     the gate's slope below half its value at r = 1:  A f'(r) r / N, f'(r) = 4 sigma (1 - sigma),
         low: A < 0, r < 1 - SAPO_HALF_SLOPE / tau_neg;   sigma = sigmoid(tau (r - 1))
         high: A > 0, r > 1 + SAPO_HALF_SLOPE / tau_pos
cegppo   PPO's (dual optional)                            beta1 (1 - eps_low) A / N on low,
                                                          beta2 (1 + eps_high) A / N on high, 0 on dual,
                                                          A r / N elsewhere
======== ================================================ ================================================

Log-ratios are clamped to +-LOG_RATIO_LIMIT as in :func:`entroclip.objectives.importance_ratio`. Under PPO,
SAPO and CE-GPPO a token beyond the clamp has no gradient, which the closed-form ``weight`` does not model
(exp(20) is far outside every bound here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from entroclip.objectives import (
    LOG_RATIO_LIMIT,
    Aggregation,
    aggregation_scale,
    broadcast_advantages,
    check_eps,
    check_shapes,
    clip_masks,
    importance_ratio,
)

#: tau |r - 1| beyond which SAPO's gate slope f'(r) = 4 sigma (1 - sigma) is below 1/2 (its value at r = 1 is
#: 1): sigma (1 - sigma) < 1/8 <=> |tanh(tau (r - 1) / 2)| > 1/sqrt(2) <=> tau |r - 1| > 2 artanh(1/sqrt(2))
#: = 2 asinh(1) = ln(3 + 2 sqrt(2)) ~ 1.763.
SAPO_HALF_SLOPE = 2.0 * math.asinh(1.0)

LEDGER_KEYS = (
    "effect_low",
    "effect_high",
    "effect_dual",
    "effect_pos",
    "effect_neg",
    "effect_rescale",
    "effect_total",
)


@dataclass(frozen=True)
class PolicyLoss:
    """Result of the losses of this module; tensors ``[B, T]`` float32 (masks bool) unless noted.

    ``loss``: the scalar to minimise, ``(token_loss * token_scale).sum()``; ``token_loss``: the per-token
    policy-gradient loss before aggregation, 0 on invalid tokens; both differentiable in ``logp_new``.
    ``clip_low`` / ``clip_high`` / ``dual``: the kind's events (module docstring). ``ratio``: the detached
    ratio the kind bounds or gates (GSPO: the sequence ratio on each of its tokens), 1 on invalid tokens.
    ``token_scale``: the aggregation's 1/N_t, positive on valid tokens and 0 elsewhere. ``advantages``: per
    token, 0 on invalid tokens. ``weight``: w_t = -d loss / d logp_new_t; ``pg_weight``: A_t r_t / N_t, the
    unclipped policy-gradient weight (both detached, 0 on invalid tokens).

    Not :class:`entroclip.objectives.SurrogateOutput`: that one promises ``loss = -sum A r / N`` on the
    tokens without an event, which GSPO, CISPO and SAPO break, and has no per-token weights.
    """

    loss: Tensor
    token_loss: Tensor
    clip_low: Tensor
    clip_high: Tensor
    dual: Tensor
    ratio: Tensor
    token_scale: Tensor
    advantages: Tensor
    weight: Tensor
    pg_weight: Tensor


def _inputs(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(bool mask, float32 per-token advantages with 0 on invalid tokens), after the shape checks."""
    check_shapes(logp_new=logp_new, logp_old=logp_old, mask=mask)
    mask = mask.bool()
    adv = broadcast_advantages(advantages, mask).to(torch.float32)
    return mask, torch.where(mask, adv, torch.zeros_like(adv))


def _result(
    token_loss: Tensor,
    coefficient: Tensor,
    ratio: Tensor,
    logp_new: Tensor,
    logp_old: Tensor,
    adv: Tensor,
    mask: Tensor,
    scale: Tensor,
    events: tuple[Tensor, Tensor, Tensor],
) -> PolicyLoss:
    """Aggregate ``token_loss`` and assemble the result; ``coefficient`` is -d token_loss_t / d logp_new_t."""
    zero = torch.zeros_like(adv)
    token_loss = torch.where(mask, token_loss, zero)
    token_ratio = importance_ratio(logp_new.detach(), logp_old, mask)
    return PolicyLoss(
        loss=(token_loss * scale).sum(),
        token_loss=token_loss,
        clip_low=events[0],
        clip_high=events[1],
        dual=events[2],
        ratio=ratio.detach(),
        token_scale=scale,
        advantages=adv,
        weight=torch.where(mask, coefficient.detach() * scale, zero),
        pg_weight=adv * token_ratio * scale,
    )


def _token_clip(
    ratio: Tensor,
    logp_new: Tensor,
    logp_old: Tensor,
    adv: Tensor,
    mask: Tensor,
    bounds: tuple[float | None, float | None, float | None],
    kept: tuple[float, float] | None,
    scale: Tensor,
) -> PolicyLoss:
    """PPO's sign-gated clip ``max(-A x, -A clip(x))`` (and dual-clip) of a differentiable ratio x ``[B, T]``
    whose gradient w.r.t. ``logp_new_t`` equals its value (the token ratio; GSPO's sequence ratio in token
    form). ``bounds``: (eps_low, eps_high, dual_clip); ``kept``: CE-GPPO's (beta1, beta2), None for PPO."""
    eps_low, eps_high, dual_clip = bounds
    value = ratio.detach()
    clip_low, clip_high, dual = clip_masks(value, adv, mask, eps_low, eps_high, dual_clip)
    token_loss, coefficient = -adv * ratio, adv * value
    beta1, beta2 = kept if kept is not None else (None, None)
    sides = []
    if eps_low is not None:
        sides.append((clip_low, 1.0 - eps_low, beta1))
    if eps_high is not None:
        sides.append((clip_high, 1.0 + eps_high, beta2))
    for event, bound, beta in sides:
        # PPO's clipped branch is the constant -A * bound. CE-GPPO keeps the gradient coefficient
        # beta * bound * A through ratio / sg(ratio), 1 in value: the authors' -beta * bound / sg(r) * r * A.
        kept_value = torch.ones_like(value) if beta is None else beta * (ratio / value)
        token_loss = torch.where(event, -adv * bound * kept_value, token_loss)
        coefficient = torch.where(event, adv * bound * (beta or 0.0), coefficient)
    if dual_clip is not None:
        token_loss = torch.where(dual, -adv * dual_clip, token_loss)
        coefficient = torch.where(dual, torch.zeros_like(value), coefficient)
    return _result(
        token_loss, coefficient, value, logp_new, logp_old, adv, mask, scale, (clip_low, clip_high, dual)
    )


def ppo_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float | None = 0.2,
    eps_high: float | None = 0.28,
    dual_clip: float | None = None,
    agg: Aggregation = "token-mean",
    max_len: int | None = None,
) -> PolicyLoss:
    """PPO's token clip ``min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` (with optional dual-clip at c =
    ``dual_clip``), the same loss and gradient as :func:`entroclip.objectives.surrogate_terms` (without its
    extra terms), as the reference kind of the ledger. Parameters as there; None switches a bound off."""
    check_eps(eps_low, eps_high, dual_clip)
    mask, adv = _inputs(logp_new, logp_old, advantages, mask)
    ratio = importance_ratio(logp_new, logp_old, mask)
    scale = aggregation_scale(mask, agg, max_len)
    return _token_clip(ratio, logp_new, logp_old, adv, mask, (eps_low, eps_high, dual_clip), None, scale)


def gspo_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float | None = 3e-4,
    eps_high: float | None = 4e-4,
    agg: Aggregation = "seq-mean-token-mean",
    max_len: int | None = None,
) -> PolicyLoss:
    """GSPO (arXiv 2507.18071): PPO's clip on the sequence ratio s_i = exp(mean_t log r_it) over the valid
    tokens of sequence i, in the token form ``s_it = sg[s_i] pi_t / sg[pi_t]`` of verl's
    ``compute_policy_loss_gspo``: the value of s_it is s_i and its gradient w.r.t. logp_new_t is s_i, so with
    ``seq-mean-token-mean`` the gradient is GSPO's sequence-level one; per-token advantages are allowed.

    Args:
        eps_low, eps_high: bounds on s_i (GSPO's published 3e-4 / 4e-4); None switches a side off.
        agg, max_len: aggregation of the per-token losses (GSPO's own: ``seq-mean-token-mean``).

    The sequence log-ratio is clamped to +-LOG_RATIO_LIMIT (verl clamps the token form at +10 only, which
    drops the gradient of an A < 0 sequence with s_i > e^10; here it is kept).
    """
    check_eps(eps_low, eps_high, None)
    mask, adv = _inputs(logp_new, logp_old, advantages, mask)
    zero = torch.zeros_like(adv)
    logp = torch.where(mask, logp_new.float(), zero)  # padding may hold anything, even inf
    log_ratio = logp.detach() - torch.where(mask, logp_old.float(), zero)
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    log_seq = (log_ratio.sum(-1, keepdim=True) / lengths).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.where(mask, torch.exp(log_seq + logp - logp.detach()), torch.ones_like(adv))
    scale = aggregation_scale(mask, agg, max_len)
    return _token_clip(ratio, logp_new, logp_old, adv, mask, (eps_low, eps_high, None), None, scale)


def cispo_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float | None = None,
    eps_high: float | None = 4.0,
    agg: Aggregation = "token-mean",
    max_len: int | None = None,
) -> PolicyLoss:
    """CISPO (arXiv 2506.13585): per-token loss ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) A logp_new``, as
    verl's ``compute_policy_loss_cispo``: the importance weight is capped, no token's gradient is dropped.

    Args:
        eps_low, eps_high: bounds on the weight; None switches a side off (MiniMax-M1 sets no lower bound;
            eps_high = 4 is ScaleRL's recommended cap of 5). verl's ``clip_ratio_low`` / ``clip_ratio_high``
            are eps_low / eps_high; TRL's ``loss_type="cispo"`` has no lower bound and
            ``epsilon_high = 1 + eps_high``.
        agg, max_len: aggregation (verl's default and TRL's normalisation by the token count: token-mean).
    """
    check_eps(eps_low, eps_high, None)
    mask, adv = _inputs(logp_new, logp_old, advantages, mask)
    ratio = importance_ratio(logp_new.detach(), logp_old, mask)
    # an absent bound is one the ratio (in [e^-20, e^20]) never crosses
    low = 1.0 - eps_low if eps_low is not None else 0.0
    high = 1.0 + eps_high if eps_high is not None else math.inf
    weight = ratio.clamp(low, high)
    logp = torch.where(mask, logp_new.float(), torch.zeros_like(adv))
    events = (mask & (ratio < low), mask & (ratio > high), torch.zeros_like(mask))
    scale = aggregation_scale(mask, agg, max_len)
    return _result(-weight * adv * logp, weight * adv, ratio, logp_new, logp_old, adv, mask, scale, events)


def sapo_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    agg: Aggregation = "seq-mean-token-mean",
    max_len: int | None = None,
) -> PolicyLoss:
    """SAPO (arXiv 2511.20347): per-token loss ``-f(r) A`` with the soft gate
    ``f(r) = sigmoid(tau (r - 1)) 4 / tau`` (f(1) = 2/tau, f'(1) = 1), as verl's
    ``compute_policy_loss_sapo``.

    Args:
        tau_pos, tau_neg: gate temperatures for A > 0 and A <= 0 (verl's and TRL's defaults 1.0 / 1.05).
        agg, max_len: aggregation; the default ``seq-mean-token-mean`` is what verl always uses, whatever
            its ``loss_agg_mode`` (TRL's ``sapo`` averages the per-sequence token means over all rows,
            empty ones included).

    The events mark the tokens where the gate's slope f'(r) fell below 1/2 on the side the advantage pushes
    towards (see ``SAPO_HALF_SLOPE``); with tau near 1 the low side needs r < 0 and never fires. The gate's
    damping on the other side (A > 0 with r < 1, A < 0 with r > 1) is in the ledger's ``effect_rescale``.
    """
    if not (tau_pos > 0.0 and tau_neg > 0.0):
        raise ValueError(f"tau_pos and tau_neg must be > 0, got {tau_pos} and {tau_neg}")
    mask, adv = _inputs(logp_new, logp_old, advantages, mask)
    ratio = importance_ratio(logp_new, logp_old, mask)
    r = ratio.detach()
    positive = adv > 0
    tau = torch.where(positive, tau_pos, tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    sigma = torch.sigmoid(tau * (r - 1.0))
    reach = SAPO_HALF_SLOPE / tau
    events = (
        mask & (adv < 0) & (r < 1.0 - reach),
        mask & positive & (r > 1.0 + reach),
        torch.zeros_like(mask),
    )
    # d f(r) / d logp = f'(r) r
    coefficient = adv * 4.0 * sigma * (1.0 - sigma) * r
    scale = aggregation_scale(mask, agg, max_len)
    return _result(-gate * adv, coefficient, r, logp_new, logp_old, adv, mask, scale, events)


def cegppo_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float | None = 0.2,
    eps_high: float | None = 0.2,
    beta1: float = 0.75,
    beta2: float = 1.0,
    dual_clip: float | None = None,
    agg: Aggregation = "token-mean",
    max_len: int | None = None,
) -> PolicyLoss:
    """CE-GPPO (arXiv 2509.20712): PPO's clip, except that the clipped tokens keep a bounded gradient, as
    the authors' ``compute_gppo_loss_general_beta`` (github.com/Kwai-Klear/CE-GPPO, verl/trainer/ppo/
    core_algos.py): ``-beta1 (1 - eps_low) r / sg(r) A`` on clip-low tokens,
    ``-beta2 (1 + eps_high) r / sg(r) A`` on clip-high tokens, ``-r A`` elsewhere, then dual-clip
    ``min(., -c A)`` for A < 0.

    Args:
        eps_low, eps_high: PPO's bounds (the authors' recipes: 0.2 / 0.2); None switches a side off.
        beta1, beta2: >= 0, the fractions of the bound's gradient kept on clip-low / clip-high tokens (the
            authors' 7B recipe: 0.75 / 1.0); 0 / 0 has PPO's gradient.
        dual_clip: c > 1 or None (the authors always apply it: 3.0 by default, 10.0 in their recipes).
        agg, max_len: aggregation (the authors' recipes: token-mean).
    """
    check_eps(eps_low, eps_high, dual_clip)
    if not (beta1 >= 0.0 and beta2 >= 0.0):
        raise ValueError(f"beta1 and beta2 must be >= 0, got {beta1} and {beta2}")
    if dual_clip is not None and eps_low is not None and beta1 * (1.0 - eps_low) >= dual_clip:
        # the authors' min(., -c A) would then cap the kept clip-low loss too
        raise ValueError(f"beta1 * (1 - eps_low) must be below dual_clip, got {beta1 * (1.0 - eps_low)}")
    mask, adv = _inputs(logp_new, logp_old, advantages, mask)
    ratio = importance_ratio(logp_new, logp_old, mask)
    scale = aggregation_scale(mask, agg, max_len)
    bounds = (eps_low, eps_high, dual_clip)
    return _token_clip(ratio, logp_new, logp_old, adv, mask, bounds, (beta1, beta2), scale)


@torch.no_grad()
def entropy_ledger(out: PolicyLoss, kappa: Tensor) -> dict[str, float]:
    """:func:`ledger_terms` by name (``LEDGER_KEYS``)."""
    return dict(zip(LEDGER_KEYS, ledger_terms(out, kappa).tolist(), strict=True))


@torch.no_grad()
def ledger_terms(out: PolicyLoss, kappa: Tensor) -> Tensor:
    """First-order entropy budget of one update with ``out``'s loss, per unit step size (nats), as a float32
    tensor ``[7]`` in the order of ``LEDGER_KEYS`` (no host sync).

    ``kappa`` ``[B, T]``: the tokens' entropy sensitivity (:func:`entroclip.entropy.entropy_sensitivity`).
    With w the effective and w_pg the unclipped policy-gradient weight (:class:`PolicyLoss`), summed over
    tokens:

    - ``effect_low`` / ``effect_high`` / ``effect_dual``: (w - w_pg) kappa over the event's tokens, the
      entropy change of what the kind removed or rescaled there;
    - ``effect_pos`` / ``effect_neg``: w kappa over the other tokens with A > 0 / A < 0 (the update as taken);
    - ``effect_rescale``: (w - w_pg) kappa over the other tokens (GSPO: s_i instead of r_t; SAPO: the gate's
      slope; 0 for PPO, CISPO and CE-GPPO);
    - ``effect_total``: w kappa over all tokens, the first-order change of the update as taken.

    So ``effect_total = effect_low + effect_high + effect_dual + effect_rescale + sum w_pg kappa``. For PPO
    the first five equal :func:`entroclip.attribution.clip_attribution`'s. As there, every term assumes each
    token has its own logits (the tabular model).
    """
    valid = out.token_scale > 0
    kappa = torch.where(valid, kappa.float(), torch.zeros_like(out.weight))  # padding's kappa may be NaN
    change = out.weight * kappa
    rescaled = (out.weight - out.pg_weight) * kappa
    rest = valid & ~(out.clip_low | out.clip_high | out.dual)
    groups = [
        (out.clip_low, rescaled),
        (out.clip_high, rescaled),
        (out.dual, rescaled),
        (rest & (out.advantages > 0), change),
        (rest & (out.advantages < 0), change),
        (rest, rescaled),
        (valid, change),
    ]
    return torch.stack([torch.where(group, values, 0.0).sum() for group, values in groups])


#: the clipping schemes of ``loss.kind`` besides ``ppo`` (which the update takes through
#: :func:`entroclip.objectives.surrogate_terms`, with Clip-Cov and KL-Cov)
LossKind = Literal["gspo", "cispo", "sapo", "ce_gppo"]


@dataclass(frozen=True)
class PolicyLossKind:
    """One of the kinds of this module with its own parameters (``loss.kind`` and ``loss.tau_*`` /
    ``loss.beta*``); the bounds, dual-clip and aggregation are the run's (``loss.eps_*``, ``loss.dual_clip``,
    ``loss.agg``)."""

    kind: LossKind
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    beta1: float = 0.75
    beta2: float = 1.0

    def __call__(
        self,
        logp_new: Tensor,
        logp_old: Tensor,
        advantages: Tensor,
        mask: Tensor,
        eps_low: float | Tensor | None,
        eps_high: float | Tensor | None,
        dual_clip: float | None,
        agg: Aggregation,
        max_len: int | None,
    ) -> PolicyLoss:
        args = (logp_new, logp_old, advantages, mask)
        if self.kind == "gspo":
            return gspo_loss(*args, eps_low, eps_high, agg, max_len)  # type: ignore[arg-type]
        if self.kind == "cispo":
            return cispo_loss(*args, eps_low, eps_high, agg, max_len)  # type: ignore[arg-type]
        if self.kind == "sapo":
            return sapo_loss(*args, self.tau_pos, self.tau_neg, agg, max_len)
        return cegppo_loss(*args, eps_low, eps_high, self.beta1, self.beta2, dual_clip, agg, max_len)  # type: ignore[arg-type]
