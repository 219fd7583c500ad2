"""Pieces shared by the framework adapters: weighted advantages, clip statistics, entropy attribution."""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from entroclip import metrics as names
from entroclip.attribution import EFFECT_KEYS, clip_attribution
from entroclip.losses import PolicyLoss, entropy_ledger
from entroclip.objectives import SurrogateOutput, broadcast_advantages

#: the event fractions and the mean ratio an adapter reports (means over the call's response tokens), in the
#: order of :func:`token_sums`
SURROGATE_KEYS = (
    names.CLIP_LOW,
    names.CLIP_HIGH,
    names.CLIP_REGION,
    names.CLIP_DUAL,
    names.RATIO_MEAN,
)

#: how an adapter computes the entropy sensitivity kappa for ``entropy/effect_*``
Attribution = Literal["exact", "npg", "off"]


class LossEvents(Protocol):
    """The events and the ratio of one loss call, bool / float ``[B, T]``: what :class:`SurrogateOutput`
    (``loss.kind`` ppo) and :class:`~entroclip.losses.PolicyLoss` (the other kinds) have in common."""

    @property
    def clip_low(self) -> Tensor: ...

    @property
    def clip_high(self) -> Tensor: ...

    @property
    def dual(self) -> Tensor: ...

    @property
    def ratio(self) -> Tensor: ...


def weighted_advantages(advantages: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-token advantages ``[B, T]`` times non-negative weights ``[B, T]`` (per token) or ``[B, 1]``.

    For w > 0, the clipped surrogate of ``w * A`` is ``w`` times that of ``A`` with the same clip events
    (and so is each loss of :mod:`entroclip.losses`, whose events and SAPO's gate depend on the sign of A
    only), so this is how importance weights that multiply the per-token loss (verl's rollout correction,
    TRL's vLLM correction) enter :func:`entroclip.objectives.clipped_surrogate` and the other kinds. A token
    of weight 0 has no loss and no sign-gated event.
    """
    adv = broadcast_advantages(advantages, mask).float()
    if weights is None:
        return adv
    return adv * weights.detach().float().expand_as(adv)


def npg_kappa(logp: Tensor, mask: Tensor, entropy: Tensor | None = None) -> Tensor:
    """Natural-gradient entropy sensitivity ``-(log pi_a + H)`` of the sampled tokens, ``[B, T]``, 0 off-mask.

    A natural-gradient step of weight w on token a of a softmax changes its entropy by
    ``-eta * w * (log pi_a + H)`` to first order (exact for a tabular policy), the same sign as the
    plain-gradient kappa of :func:`entroclip.entropy.entropy_sensitivity` for rare and for likely tokens. It
    needs only log-probs: ``entropy`` is the per-token entropy when known, otherwise H is estimated by the
    mean of ``-log pi_a`` over the valid tokens.
    """
    valid = mask.bool()
    lp = logp.detach().float()
    if entropy is None:
        h: Tensor = -torch.where(valid, lp, torch.zeros_like(lp)).sum() / valid.sum().clamp(min=1)
    else:
        h = entropy.detach().float()
    return torch.where(valid, -(lp + h), torch.zeros_like(lp))


def token_sums(out: LossEvents, mask: Tensor, *values: Tensor) -> Tensor:
    """Sums over the valid tokens of ``mask`` ``[B, T]`` of the per-token quantities of ``SURROGATE_KEYS``
    (the events, their union, the ratio) and of ``values`` ``[B, T]``, then the valid tokens' count:
    float32 ``[len(SURROGATE_KEYS) + len(values) + 1]``, so that one reduction over ranks gives
    token-weighted means."""
    valid = mask.bool()
    per_token = (out.clip_low, out.clip_high, out.clip_low | out.clip_high, out.dual, out.ratio, *values)
    sums = [torch.where(valid, value.detach().float(), 0.0).sum() for value in per_token]
    return torch.stack([*sums, valid.sum().float()])


def event_metrics(out: LossEvents, mask: Tensor) -> dict[str, float]:
    """``SURROGATE_KEYS`` of one loss call, means over its valid tokens: PPO's sign-gated clip fractions,
    or another kind's events (:mod:`entroclip.losses`), and the mean ratio the kind bounds or gates."""
    *sums, count = token_sums(out, mask).tolist()
    return {key: total / max(count, 1.0) for key, total in zip(SURROGATE_KEYS, sums, strict=True)}


def attribution_metrics(
    out: SurrogateOutput | PolicyLoss,
    kappa: Tensor,
    advantages: Tensor,
    logp_new: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    prefix: str = "entropy/",
) -> dict[str, float]:
    """The first-order entropy effects of one loss call, keys ``prefix + effect_*``, as entroclip's trainer
    reports them: :func:`entroclip.entropy.clip_attribution` for PPO; for the other kinds the ledger of
    :func:`entroclip.losses.entropy_ledger` (``out`` holds its own advantages and ratios), its
    ``effect_cov`` 0 and ``effect_rescale`` besides."""
    if isinstance(out, PolicyLoss):
        ledger = entropy_ledger(out, kappa)
        effects = {key: ledger.get(key, 0.0) for key in (*EFFECT_KEYS, "effect_rescale")}
    else:
        effects = clip_attribution(out, kappa, advantages, logp_new, logp_old, mask)
    return {prefix + key: value for key, value in effects.items()}
