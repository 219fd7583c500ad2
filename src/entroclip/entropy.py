"""Exact token entropy from logits, the logit-space entropy sensitivity kappa, and clip attribution.

Notation per token: z = logits / temperature over the vocabulary, pi = softmax(z), sampled token a,
H = -sum_v pi_v log pi_v (nats).

- dH/dz_k = -pi_k (log pi_k + H)
- kappa = <dH/dz, e_a - pi> = -pi_a (log pi_a + H) + sum_v pi_v^2 (log pi_v + H)

A gradient step that raises log pi_a with weight w changes z by eta * w * (e_a - pi) and H by
eta * w * kappa + O(eta^2). Rare tokens (log pi_a < -H, roughly) have kappa > 0: pushing them up raises
entropy, pushing them down lowers it.

Memory: the vocabulary dimension is processed in chunks of ``chunk_size`` tokens, each converted to
float32 on its own, so no float32 copy of the whole ``[tokens, vocab]`` tensor is made (under
``torch.no_grad``; with autograd the chunks' intermediates are kept for the backward pass).
"""

from __future__ import annotations

import torch
from torch import Tensor

from entroclip.objectives import LOG_RATIO_LIMIT, SurrogateOutput, broadcast_advantages


def _check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


#: Floor for log-probabilities so that tokens of probability 0 (logit -inf) add 0 * floor = 0, not NaN.
_LOGP_FLOOR = -1e30


def _chunk_log_softmax(chunk: Tensor, temperature: float) -> Tensor:
    """float32 log pi of one chunk of logits ``[n, V]``, floored at ``_LOGP_FLOOR``."""
    z = chunk.float()
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    if logp.requires_grad:
        return logp.clamp(min=_LOGP_FLOOR)
    return logp.clamp_(min=_LOGP_FLOOR)


def token_entropy(logits: Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Exact entropy (nats) of softmax(logits / temperature) for every position.

    Args:
        logits: ``[..., V]`` in any float dtype (bf16 is computed in float32 chunk by chunk).
    Returns:
        float32 ``[...]``. Differentiable w.r.t. ``logits``.
    """
    _check_temperature(temperature)
    _check_chunk(chunk_size)
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size):
        logp = _chunk_log_softmax(chunk, temperature)
        # torch.sum's cascaded summation keeps float32 error ~1e-5 relative at V = 150k (a plain dot
        # product accumulates ~20x more).
        out.append(-(logp.exp() * logp).sum(-1))
    result = torch.cat(out) if out else flat.new_zeros(0, dtype=torch.float32)
    return result.reshape(logits.shape[:-1])


@torch.no_grad()
def entropy_sensitivity(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Entropy and logit-space entropy sensitivity kappa of the sampled tokens, in one chunked pass.

    Args:
        logits: ``[..., V]``; tokens: int64 ``[...]`` (the sampled token at each position).
    Returns:
        ``(entropy, kappa)``, each float32 ``[...]``, no gradient.
    """
    _check_temperature(temperature)
    _check_chunk(chunk_size)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens must have shape {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1, 1).long()
    ents, kappas = [], []
    for chunk, tok in zip(flat.split(chunk_size), flat_tokens.split(chunk_size), strict=True):
        logp = _chunk_log_softmax(chunk, temperature)
        p = logp.exp()
        h = -(p * logp).sum(-1)
        p_sq = p.square_()  # p is not needed any more: reuse its memory
        # sum_v p_v^2 (log p_v + H) = sum_v p_v^2 log p_v + H sum_v p_v^2
        s2 = (p_sq * logp).sum(-1) + h * p_sq.sum(-1)
        logp_a = logp.gather(-1, tok).reshape(-1)
        kappas.append(-logp_a.exp() * (logp_a + h) + s2)
        ents.append(h)
    shape = logits.shape[:-1]
    if not ents:
        empty = flat.new_zeros(0, dtype=torch.float32).reshape(shape)
        return empty, empty.clone()
    return torch.cat(ents).reshape(shape), torch.cat(kappas).reshape(shape)


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
    mask = mask.bool()
    adv = broadcast_advantages(advantages, mask).float()
    log_ratio = (logp_new.detach().float() - logp_old.float()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.where(mask, log_ratio.exp(), torch.zeros_like(log_ratio))
    contribution = torch.where(mask, adv * ratio * out.token_scale * kappa.float(), torch.zeros_like(ratio))
    removed = out.clip_low | out.clip_high | out.dual | out.detached
    unclipped = mask & ~removed
    terms = torch.stack(
        [
            -contribution[out.clip_low].sum(),
            -contribution[out.clip_high].sum(),
            -contribution[out.dual].sum(),
            -contribution[out.detached].sum(),
            contribution[unclipped & (adv > 0)].sum(),
            contribution[unclipped & (adv < 0)].sum(),
        ]
    ).tolist()
    return dict(zip(EFFECT_KEYS, terms, strict=True))
