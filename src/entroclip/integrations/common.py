"""Pieces shared by the framework adapters: weighted advantages, clip statistics, entropy attribution."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from entroclip import metrics as names
from entroclip.attribution import clip_attribution
from entroclip.objectives import SurrogateOutput, broadcast_advantages

#: the :attr:`SurrogateOutput.stats` entries an adapter reports (means over the call's response tokens)
SURROGATE_KEYS = (
    names.CLIP_LOW,
    names.CLIP_HIGH,
    names.CLIP_REGION,
    names.CLIP_DUAL,
    names.RATIO_MEAN,
)

#: how an adapter computes the entropy sensitivity kappa for ``entropy/effect_*``
Attribution = Literal["exact", "npg", "off"]


def weighted_advantages(advantages: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-token advantages ``[B, T]`` times non-negative weights ``[B, T]`` (per token) or ``[B, 1]``.

    For w > 0, the clipped surrogate of ``w * A`` is ``w`` times that of ``A`` with the same clip events, so
    this is how importance weights that multiply the per-token loss (verl's rollout correction, TRL's vLLM
    correction) enter :func:`entroclip.objectives.clipped_surrogate`. A token of weight 0 has no loss and no
    clip event.
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


def surrogate_metrics(out: SurrogateOutput) -> dict[str, float]:
    """The sign-gated clip fractions and the mean ratio of one loss call, under entroclip's names."""
    return {key: out.stats[key] for key in SURROGATE_KEYS}


def attribution_metrics(
    out: SurrogateOutput,
    kappa: Tensor,
    advantages: Tensor,
    logp_new: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    prefix: str = "entropy/",
) -> dict[str, float]:
    """:func:`entroclip.entropy.clip_attribution` of one loss call, keys ``prefix + effect_*``."""
    effects = clip_attribution(out, kappa, advantages, logp_new, logp_old, mask)
    return {prefix + key: value for key, value in effects.items()}
