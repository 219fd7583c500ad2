"""Clipped PPO/GRPO surrogate with decoupled clip bounds, dual-clip, loss aggregation and KL estimators.

All functions are pure functions of tensors. Shapes: ``logp_*``, ``mask`` and per-token advantages are
``[batch, response_len]``; per-sequence advantages are ``[batch]`` and are broadcast over tokens.

Sign-gated clip events (the masks this module returns, never overlapping):

- clip-low:  A < 0 and r < 1 - eps_low   (the push-down of the token is stopped)
- clip-high: A > 0 and r > 1 + eps_high  (the push-up of the token is stopped)
- dual-clip: A < 0 and r > c              (the loss is capped at -c A)

On each of these tokens the gradient of the loss is exactly zero; elsewhere the per-token loss is
``-A r`` and its gradient w.r.t. ``logp_new`` is ``-A r / N`` with N set by the aggregation mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch
from torch import Tensor

from entroclip import metrics as names

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
KL_KINDS: tuple[str, ...] = get_args(KLKind)

#: Log-ratios are clamped to +-LOG_RATIO_LIMIT before exponentiation so that a diverged token can never
#: produce inf/NaN in the loss or its gradient (exp(20) ~ 5e8 is far outside every clip range).
LOG_RATIO_LIMIT = 20.0


@dataclass(frozen=True)
class SurrogateOutput:
    """Result of :func:`clipped_surrogate`.

    ``loss`` is the scalar to minimise. The masks are bool ``[batch, response_len]``; ``detached`` marks
    the tokens whose gradient was removed on request (Clip-Cov), apart from the clip events; ``ratio`` is
    the detached importance ratio (1 on invalid positions); ``token_scale`` is the per-token factor 1/N of
    the aggregation mode (0 on invalid positions), so that ``loss == -(A * r * token_scale).sum()`` on
    tokens that are neither clipped nor detached.
    """

    loss: Tensor
    pg_loss: Tensor
    clip_low: Tensor
    clip_high: Tensor
    dual: Tensor
    detached: Tensor
    ratio: Tensor
    token_scale: Tensor
    stats: dict[str, float] = field(default_factory=dict)


def check_eps(eps_low: float | None, eps_high: float | None, dual_clip: float | None) -> None:
    if eps_low is not None and not 0.0 <= eps_low <= 1.0:
        raise ValueError(f"eps_low must be in [0, 1] or None (no clip-low), got {eps_low}")
    if eps_high is not None and not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0 or None (no clip-high), got {eps_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 or None (no dual-clip), got {dual_clip}")


def broadcast_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Return advantages as ``[batch, response_len]``: per-sequence ``[batch]`` values are repeated."""
    if advantages.shape == mask.shape:
        return advantages
    if advantages.dim() == 1 and mask.dim() == 2 and advantages.shape[0] == mask.shape[0]:
        return advantages[:, None].expand_as(mask)
    raise ValueError(
        f"advantages must have shape {tuple(mask.shape)} (per token) or ({mask.shape[0]},) (per sequence), "
        f"got {tuple(advantages.shape)}"
    )


def check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must agree, got {shapes}")
    if next(iter(shapes.values())).__len__() != 2:
        raise ValueError(f"expected [batch, response_len] tensors, got {shapes}")


def aggregation_scale(mask: Tensor, agg: Aggregation = "token-mean", max_len: int | None = None) -> Tensor:
    """Per-token factor 1/N_t of an aggregation mode, ``[batch, response_len]`` float32, 0 where masked.

    ``sum(values * aggregation_scale(mask, agg))`` is the aggregated value. Rows without a valid token are
    ignored by the seq-mean modes; an all-invalid mask gives all zeros (the loss is 0, not NaN).

    - token-mean: 1 / (valid tokens in the batch)
    - seq-mean-token-mean: 1 / (sequences * valid tokens of that sequence)
    - seq-mean-token-sum: 1 / sequences
    - seq-mean-token-sum-norm: 1 / (sequences * max_len), max_len a constant (Dr.GRPO)
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    valid = mask.to(torch.float32)
    tokens_per_seq = valid.sum(-1, keepdim=True)
    n_seq = (tokens_per_seq > 0).sum().clamp(min=1)
    if agg == "token-mean":
        return valid / valid.sum().clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        return valid / (tokens_per_seq.clamp(min=1.0) * n_seq)
    if agg == "seq-mean-token-sum":
        return valid / n_seq
    if max_len is None or max_len < 1:
        raise ValueError(f"max_len must be a positive int for agg='seq-mean-token-sum-norm', got {max_len}")
    return valid / (n_seq * float(max_len))


def aggregate(
    values: Tensor, mask: Tensor, agg: Aggregation = "token-mean", max_len: int | None = None
) -> Tensor:
    """Aggregate per-token ``values`` ``[batch, response_len]`` to a scalar with the given mode."""
    scale = aggregation_scale(mask.bool(), agg, max_len)
    return torch.where(mask.bool(), values, torch.zeros_like(values)).mul(scale).sum()


def clip_masks(
    ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float | Tensor | None,
    eps_high: float | Tensor | None,
    dual_clip: float | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sign-gated (clip-low, clip-high, dual-clip) bool masks ``[B, T]`` from the ratio and advantages."""
    mask = mask.bool()
    adv = broadcast_advantages(advantages, mask)
    neg, pos = (adv < 0) & mask, (adv > 0) & mask
    no_event = torch.zeros_like(mask)
    clip_low = neg & (ratio < 1.0 - eps_low) if eps_low is not None else no_event
    clip_high = pos & (ratio > 1.0 + eps_high) if eps_high is not None else no_event
    dual = neg & (ratio > dual_clip) if dual_clip is not None else no_event
    return clip_low, clip_high, dual


def clipped_surrogate(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float | None = 0.2,
    eps_high: float | None = 0.28,
    dual_clip: float | None = None,
    agg: Aggregation = "token-mean",
    max_len: int | None = None,
    *,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    logp_ref: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: KLKind = "k3",
    detach: Tensor | None = None,
    token_penalty: Tensor | None = None,
) -> SurrogateOutput:
    """PPO/GRPO clipped surrogate ``min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` as a loss to minimise.

    Args:
        logp_new: log pi_theta(a_t) of the sampled tokens, differentiable, ``[B, T]``.
        logp_old: log pi_old(a_t) at sampling time, ``[B, T]`` (treated as a constant).
        advantages: ``[B, T]`` or ``[B]``.
        mask: response mask ``[B, T]`` (bool or 0/1): True on tokens that count.
        eps_low, eps_high: decoupled clip bounds; None switches that side off (eps_low=1 never fires).
        dual_clip: c > 1 caps the loss of negative-advantage tokens at -c A; None switches it off.
        agg: loss aggregation mode, see :func:`aggregation_scale`; ``max_len`` for the ``-norm`` mode.
        entropy, entropy_coef: optional per-token entropy ``[B, T]`` and bonus coefficient
            (``loss -= entropy_coef * aggregate(entropy)``).
        logp_ref, kl_coef, kl_kind: optional reference log-probs and KL penalty
            (``loss += kl_coef * aggregate(kl_penalty(logp_new, logp_ref, kl_kind))``).
        detach: optional bool ``[B, T]``: tokens whose gradient is removed as well (Clip-Cov); they
            keep their loss value and are reported in ``out.detached`` and ``clip_ratio/cov_mean``.
        token_penalty: optional per-token loss term ``[B, T]`` added before aggregation (KL-Cov).
    """
    check_eps(eps_low, eps_high, dual_clip)
    out, extra = surrogate_terms(
        logp_new,
        logp_old,
        advantages,
        mask,
        eps_low,
        eps_high,
        dual_clip,
        agg,
        max_len,
        entropy=entropy if entropy_coef != 0.0 else None,
        entropy_coef=entropy_coef,
        logp_ref=logp_ref if kl_coef != 0.0 else None,
        kl_coef=kl_coef,
        kl_kind=kl_kind,
        detach=detach,
        token_penalty=token_penalty,
    )
    masks = (out.clip_low, out.clip_high, out.dual)
    stats = _surrogate_stats(out.pg_loss.detach(), out.ratio, mask.bool(), *masks, extra)
    return replace(out, stats=stats)


def importance_ratio(logp_new: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """r = pi_new / pi_old per token, ``[B, T]`` float32: ``exp`` of the log-ratio clamped to
    +-LOG_RATIO_LIMIT (no overflow), 1 on invalid tokens; differentiable in ``logp_new``."""
    log_ratio = logp_new.float() - logp_old.float().detach()
    log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    return torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def surrogate_terms(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float | Tensor | None,
    eps_high: float | Tensor | None,
    dual_clip: float | Tensor | None = None,
    agg: Aggregation = "token-mean",
    max_len: int | None = None,
    *,
    entropy: Tensor | None = None,
    entropy_coef: float | Tensor = 0.0,
    logp_ref: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: KLKind = "k3",
    detach: Tensor | None = None,
    token_penalty: Tensor | None = None,
    keep: Tensor | None = None,
) -> tuple[SurrogateOutput, dict[str, Tensor]]:
    """The tensors of :func:`clipped_surrogate` without its checks of the bounds and without ``stats``
    (no host sync), and the extra statistics as tensors. The entropy bonus and the KL term are added
    whenever ``entropy`` / ``logp_ref`` are given. ``eps_low``, ``eps_high``, ``dual_clip`` and
    ``entropy_coef`` may be 0-d tensors, so that a compiled caller does not specialise on their values
    (they change from step to step under a controller). ``keep``: optional bool ``[B, T]``; the other
    tokens count 0 in the policy loss (value and gradient; the aggregation's count is unchanged, as in
    TRL's ``top_entropy_quantile``) and, when not clipped, are reported in ``out.detached``."""
    check_shapes(logp_new=logp_new, logp_old=logp_old, mask=mask)
    mask = mask.bool()
    adv = broadcast_advantages(advantages, mask).to(torch.float32)
    adv = torch.where(mask, adv, torch.zeros_like(adv))

    ratio = importance_ratio(logp_new, logp_old, mask)
    r = ratio.detach()

    clip_low, clip_high, dual = clip_masks(r, adv, mask, eps_low, eps_high, dual_clip)

    # The clipped branches are constants in theta: their values, with no gradient.
    clipped_value = torch.zeros_like(adv)
    if eps_low is not None:
        clipped_value = torch.where(clip_low, -adv * (1.0 - eps_low), clipped_value)
    if eps_high is not None:
        clipped_value = torch.where(clip_high, -adv * (1.0 + eps_high), clipped_value)
    if dual_clip is not None:
        clipped_value = torch.where(dual, -adv * dual_clip, clipped_value)
    clipped = clip_low | clip_high | dual
    unclipped_value = -adv * ratio
    detached = torch.zeros_like(mask)
    if detach is not None:
        check_shapes(detach=detach, mask=mask)
        detached = detach.bool() & mask & ~clipped
        unclipped_value = torch.where(detached, unclipped_value.detach(), unclipped_value)
    per_token = torch.where(clipped, clipped_value, unclipped_value)
    if keep is not None:
        check_shapes(keep=keep, mask=mask)
        dropped = mask & ~keep.bool()
        per_token = torch.where(dropped, torch.zeros_like(per_token), per_token)
        detached = detached | (dropped & ~clipped)
    if token_penalty is not None:
        check_shapes(token_penalty=token_penalty, mask=mask)
        per_token = per_token + torch.where(mask, token_penalty.float(), torch.zeros_like(adv))

    scale = aggregation_scale(mask, agg, max_len)
    pg_loss = (per_token * scale).sum()
    loss, extra = with_regularisers(
        pg_loss, logp_new, mask, agg, max_len, entropy, entropy_coef, logp_ref, kl_coef, kl_kind
    )
    if detach is not None:
        extra[names.CLIP_COV] = detached.sum() / mask.sum().clamp(min=1)
    out = SurrogateOutput(loss, pg_loss, clip_low, clip_high, dual, detached, r, scale)
    return out, extra


def with_regularisers(
    pg_loss: Tensor,
    logp_new: Tensor,
    mask: Tensor,
    agg: Aggregation,
    max_len: int | None,
    entropy: Tensor | None,
    entropy_coef: float | Tensor,
    logp_ref: Tensor | None,
    kl_coef: float,
    kl_kind: KLKind,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``pg_loss`` minus the entropy bonus (when ``entropy`` ``[B, T]`` is given) plus the KL term to the
    reference (when ``logp_ref`` ``[B, T]`` is given), both aggregated like the policy loss; and the two
    terms, detached, as ``loss/entropy_bonus`` and ``kl/ref``."""
    mask = mask.bool()
    loss = pg_loss
    extra: dict[str, Tensor] = {}
    if entropy is not None:
        check_shapes(entropy=entropy, mask=mask)
        ent_term = aggregate(entropy.float(), mask, agg, max_len)
        loss = loss - entropy_coef * ent_term
        extra["loss/entropy_bonus"] = ent_term.detach()
    if logp_ref is not None:
        check_shapes(logp_ref=logp_ref, mask=mask)
        zero = torch.zeros_like(logp_new, dtype=torch.float32)
        kl = kl_penalty(
            torch.where(mask, logp_new.float(), zero), torch.where(mask, logp_ref.float(), zero), kl_kind
        )
        kl_term = aggregate(kl, mask, agg, max_len)
        loss = loss + kl_coef * kl_term
        extra["kl/ref"] = kl_term.detach()
    return loss, extra


def _surrogate_stats(
    pg_loss: Tensor,
    ratio: Tensor,
    mask: Tensor,
    clip_low: Tensor,
    clip_high: Tensor,
    dual: Tensor,
    extra: dict[str, Tensor],
) -> dict[str, float]:
    """Fractions over valid tokens and ratio statistics, gathered with one device sync."""
    n = mask.sum().clamp(min=1).float()
    any_valid = mask.any()
    big = torch.finfo(ratio.dtype).max
    ratio_min = torch.where(mask, ratio, torch.full_like(ratio, big)).min()
    ratio_max = torch.where(mask, ratio, torch.full_like(ratio, -big)).max()
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    values = {
        names.LOSS_PG: pg_loss,
        names.CLIP_LOW: clip_low.sum() / n,
        names.CLIP_HIGH: clip_high.sum() / n,
        names.CLIP_REGION: (clip_low | clip_high).sum() / n,
        names.CLIP_DUAL: dual.sum() / n,
        names.RATIO_MEAN: torch.where(mask, ratio, torch.zeros_like(ratio)).sum() / n,
        names.RATIO_MIN: torch.where(any_valid, ratio_min, one),
        names.RATIO_MAX: torch.where(any_valid, ratio_max, one),
        **extra,
    }
    flat = torch.stack([v.float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values.keys(), flat, strict=True))


def kl_penalty(logp: Tensor, logp_ref: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-token estimator of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1, k2, k3).

    k1 = log(pi/pi_ref); k2 = 0.5 log(pi/pi_ref)^2; k3 = pi_ref/pi - log(pi_ref/pi) - 1 (>= 0).
    Differentiable w.r.t. ``logp``; the log-ratio is clamped to +-LOG_RATIO_LIMIT before exp in k3.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    if logp.shape != logp_ref.shape:
        raise ValueError(
            f"logp and logp_ref shapes must agree, got {tuple(logp.shape)} and {tuple(logp_ref.shape)}"
        )
    log_ratio = logp.float() - logp_ref.float().detach()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    ref_over_pi = (-log_ratio).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(ref_over_pi) - ref_over_pi - 1.0
