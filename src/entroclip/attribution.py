"""Clip attribution: the first-order entropy change of one update that each clip event caused.

A plain gradient step of size eta on token t's own logits changes its entropy by eta * w_t * kappa_t
(kappa from :func:`entroclip.entropy.entropy_sensitivity`, w_t the token's surrogate weight); summing over
the tokens that each clip event removed from the gradient gives what that event did to the entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from entroclip.objectives import SurrogateOutput, broadcast_advantages, importance_ratio

EFFECT_KEYS = ("effect_low", "effect_high", "effect_dual", "effect_cov", "effect_pos", "effect_neg")


@torch.no_grad()
def clip_attribution(
    out: SurrogateOutput,
    kappa: Tensor,
    advantages: Tensor,
    logp_new: Tensor,
    logp_old: Tensor,
    mask: Tensor,
) -> dict[str, float]:
    """First-order entropy budget of one update, per unit learning rate (nats per unit step size).

    With w_t = A_t r_t / N_t the unclipped surrogate weight of token t (N_t from the aggregation mode,
    ``out.token_scale``), a plain gradient step of size eta on the token's own logits changes its entropy
    by eta * w_t * kappa_t. Returned, summed over tokens:

    - ``effect_pos`` / ``effect_neg``: the change caused by the unclipped A > 0 / A < 0 tokens;
    - ``effect_low`` / ``effect_high`` / ``effect_dual`` / ``effect_cov``: minus the change the clip-low /
      clip-high / dual-clip / detached (Clip-Cov) tokens would have caused, i.e. the entropy change that
      removing their gradient caused.

    The theory predicts effect_low >= 0 and effect_high <= 0 in expectation. ``effect_pos + effect_neg``
    is the first-order change of the update as taken; every term assumes each token has its own logits
    (the tabular model), so with shared parameters it is a per-token proxy, not a prediction.
    """
    terms = attribution_terms(out, kappa, advantages, logp_new, logp_old, mask).tolist()
    return dict(zip(EFFECT_KEYS, terms, strict=True))


@torch.no_grad()
def attribution_terms(
    out: SurrogateOutput,
    kappa: Tensor,
    advantages: Tensor,
    logp_new: Tensor,
    logp_old: Tensor,
    mask: Tensor,
) -> Tensor:
    """:func:`clip_attribution` as a float32 tensor ``[6]`` in the order of ``EFFECT_KEYS`` (no host
    sync; a fixed set of operations, so that it compiles into the minibatch step)."""
    mask = mask.bool()
    adv = broadcast_advantages(advantages, mask).float()
    zero = torch.zeros_like(adv)
    ratio = torch.where(mask, importance_ratio(logp_new.detach(), logp_old, mask), zero)
    contribution = torch.where(mask, adv * ratio * out.token_scale * kappa.float(), zero)
    removed = out.clip_low | out.clip_high | out.dual | out.detached
    unclipped = mask & ~removed
    groups = torch.stack(
        [out.clip_low, out.clip_high, out.dual, out.detached, unclipped & (adv > 0), unclipped & (adv < 0)]
    )
    sums = torch.where(groups, contribution, zero).flatten(1).sum(-1)
    # the removed groups' effect is minus the change their gradient would have caused
    return torch.cat([-sums[:4], sums[4:]])
