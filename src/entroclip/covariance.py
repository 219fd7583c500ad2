"""Clip-Cov and KL-Cov: per-minibatch selection of the tokens with the largest covariance between advantage
and log-probability (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models"). Clip-Cov detaches the gradient of a random few of them; KL-Cov penalises |log r| on
the top fraction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from entroclip.config import ControlConfig
from entroclip.objectives import broadcast_advantages, clip_masks, importance_ratio

#: the published default fractions of valid tokens (Cui et al. 2025)
CLIP_COV_FRACTION = 2e-4
KL_COV_FRACTION = 2e-3


@dataclass(frozen=True)
class CovSettings:
    """Clip-Cov / KL-Cov token selection in every minibatch step."""

    kind: Literal["clip_cov", "kl_cov"]
    fraction: float
    lower: float
    upper: float
    coef: float

    @classmethod
    def from_config(cls, control: ControlConfig) -> CovSettings | None:
        """The selection ``control.kind`` asks for (None: neither rule)."""
        if control.kind not in ("clip_cov", "kl_cov"):
            return None
        default_fraction = CLIP_COV_FRACTION if control.kind == "clip_cov" else KL_COV_FRACTION
        return cls(
            kind=control.kind,
            fraction=control.cov_fraction or default_fraction,
            lower=control.cov_lower,
            upper=control.cov_upper,
            coef=control.kl_cov_coef,
        )


def centred_covariance(advantages: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token (A - mean A)(log pi - mean log pi) with means over the valid tokens, ``[B, T]`` float32;
    -inf on invalid tokens."""
    valid = mask.bool()
    adv, lp = advantages.detach().float(), logp.detach().float()
    n = valid.sum().clamp(min=1)
    adv_mean = torch.where(valid, adv, torch.zeros_like(adv)).sum() / n
    lp_mean = torch.where(valid, lp, torch.zeros_like(lp)).sum() / n
    cov = (adv - adv_mean) * (lp - lp_mean)
    return torch.where(valid, cov, torch.full_like(cov, -math.inf))


def _count(fraction: float, mask: Tensor) -> int:
    """How many tokens a fraction of the valid tokens means: max(1, floor(fraction * valid tokens))."""
    return max(1, int(fraction * int(mask.sum())))


def clip_cov_select(
    advantages: Tensor,
    logp: Tensor,
    mask: Tensor,
    clipped: Tensor,
    fraction: float,
    lower: float,
    upper: float,
    generator: torch.Generator,
) -> Tensor:
    """Clip-Cov: a random ``fraction`` of the valid tokens (at least 1), drawn among the tokens that are
    not already clipped and whose centred covariance lies in (lower, upper); their gradient is detached.
    Returns bool ``[B, T]``."""
    cov = centred_covariance(advantages, logp, mask)
    eligible = mask.bool() & ~clipped & (cov > lower) & (cov < upper)
    candidates = eligible.flatten().nonzero().squeeze(-1)
    chosen = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if candidates.numel():
        order = torch.randperm(candidates.numel(), generator=generator).to(candidates.device)
        chosen[candidates[order[: _count(fraction, mask)]]] = True
    return chosen.view_as(mask)


def kl_cov_select(advantages: Tensor, logp: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """KL-Cov: the top ``fraction`` of the valid tokens (at least 1) by centred covariance; they get the
    penalty coef * |log r|. Returns bool ``[B, T]``."""
    cov = centred_covariance(advantages, logp, mask).flatten()
    chosen = torch.zeros_like(cov, dtype=torch.bool)
    if mask.any():
        k = min(_count(fraction, mask), int(mask.sum()))
        chosen[torch.topk(cov, k).indices] = True
    return chosen.view_as(mask)


def covariance_terms(
    cov: CovSettings,
    advantages: Tensor,
    logp_new: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    eps_low: float | None,
    eps_high: float | None,
    dual_clip: float | None,
    generator: torch.Generator,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Clip-Cov's detach mask or KL-Cov's per-token penalty for one minibatch, and the selected tokens
    (bool ``[B, T]``). Clip-Cov draws among the tokens that the clip bounds leave unclipped."""
    adv = broadcast_advantages(advantages, mask)
    if cov.kind == "kl_cov":
        chosen = kl_cov_select(adv, logp_new, mask, cov.fraction)
        abs_log_ratio = (logp_new - logp_old).abs()
        return None, torch.where(chosen, cov.coef * abs_log_ratio, torch.zeros_like(abs_log_ratio)), chosen
    ratio = importance_ratio(logp_new.detach(), logp_old, mask)
    low, high, dual = clip_masks(ratio, adv, mask, eps_low, eps_high, dual_clip)
    chosen = clip_cov_select(
        adv, logp_new, mask, low | high | dual, cov.fraction, cov.lower, cov.upper, generator
    )
    return chosen, None, chosen
