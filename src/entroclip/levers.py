"""Loss-side entropy levers besides the clip bounds: EntroPIC's token weights and the 80/20 rule's
high-entropy token mask.

- Token weights (Yang et al. 2025, EntroPIC, arXiv 2511.15248; their code yk7333/EntroPIC,
  ``compute_policy_loss_entropic``): the loss gains ``alpha * aggregate(-r |A|)`` over the tokens whose
  current probability exceeds ``high_prob``. On those tokens the policy-gradient weight becomes
  ``(1 + alpha)`` for A > 0 and ``(1 - alpha)`` for A < 0: alpha > 0 sharpens already likely tokens
  (entropy falls), alpha < 0 holds them back (entropy rises). The term is aggregated over the likely
  tokens only, as the authors' code does.
- High-entropy mask (Wang et al. 2025, "Beyond the 80/20 rule", arXiv 2506.01939; TRL's
  ``top_entropy_quantile``): only the tokens whose entropy is at or above the (1 - rho) quantile of the
  minibatch keep their policy loss; the others count 0 in the aggregate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entroclip.objectives import Aggregation, aggregation_scale, broadcast_advantages, importance_ratio


def likely_tokens(logp_new: Tensor, mask: Tensor, high_prob: float) -> Tensor:
    """Bool ``[B, T]``: valid tokens whose current probability exceeds ``high_prob`` (in (0, 1))."""
    return mask.bool() & (logp_new.detach() > math.log(high_prob))


def token_weight_term(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    high_prob: float,
    agg: Aggregation = "token-mean",
    max_len: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """EntroPIC's adjustment ``aggregate(-r |A|)`` over the likely tokens (a scalar, differentiable in
    ``logp_new``; the loss adds ``alpha`` times it), the likely-token mask ``[B, T]`` and its per-token
    aggregation factor ``[B, T]`` (0 elsewhere)."""
    likely = likely_tokens(logp_new, mask, high_prob)
    adv = broadcast_advantages(advantages, mask).to(torch.float32).abs()
    ratio = importance_ratio(logp_new, logp_old, mask)
    scale = aggregation_scale(likely, agg, max_len)
    term = torch.where(likely, -adv * ratio, torch.zeros_like(ratio)).mul(scale).sum()
    return term, likely, scale


@torch.no_grad()
def token_weight_effect(
    alpha: Tensor | float,
    advantages: Tensor,
    ratio: Tensor,
    likely: Tensor,
    scale: Tensor,
    kappa: Tensor,
) -> Tensor:
    """First-order entropy change per unit lr of the token-weight term (nats), 0-d: on a likely token the
    term's weight is ``alpha |A| r scale`` in the same form as the surrogate's ``A r / N`` (see
    :mod:`entroclip.attribution`), so its entropy change is that weight times kappa."""
    adv = broadcast_advantages(advantages, likely).to(torch.float32).abs()
    weight = torch.where(likely, adv * ratio.float() * scale, torch.zeros_like(scale))
    return (alpha * (weight * kappa.float()).sum()).float()


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Bool ``[B, T]``: valid tokens whose entropy is at or above the ``1 - quantile`` quantile of the valid
    tokens' entropies (TRL's ``get_high_entropy_mask`` with threshold ``1 - top_entropy_quantile``, on one
    process). ``quantile`` 1 keeps every token; 0 keeps the highest-entropy token(s)."""
    mask = mask.bool()
    values = entropy.detach().float()[mask]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - quantile)
    return mask & (entropy.detach().float() >= threshold)
