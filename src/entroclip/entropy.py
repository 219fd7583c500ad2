"""Exact per-token log-prob, entropy and entropy sensitivity kappa from logits, and clip attribution.

Notation per token: z = logits / temperature over the vocabulary, pi = softmax(z), sampled token a,
H = -sum_v pi_v log pi_v (nats).

- dH/dz_k = -pi_k (log pi_k + H)
- kappa = <dH/dz, e_a - pi> = -pi_a (log pi_a + H) + sum_v pi_v^2 (log pi_v + H)

A gradient step that raises log pi_a with weight w changes z by eta * w * (e_a - pi) and H by
eta * w * kappa + O(eta^2). Rare tokens (log pi_a < -H, roughly) have kappa > 0: pushing them up raises
entropy, pushing them down lowers it.

All three come from one pass over the vocabulary (:func:`token_stats`): with d = z - max(z), e = exp(d)
and the row sums s0 = sum e, s1 = sum e d, s2 = sum e^2, s3 = sum e^2 d,

    log pi_a = d_a - log s0,   H = log s0 - s1 / s0,   sum_v pi_v^2 (log pi_v + H) = (s3 - s2 s1 / s0) / s0^2.

Sums of e d rather than e z keep H free of cancellation when the logits are large. Memory: the rows are
processed in chunks, each converted to float32 on its own, so no float32 copy of the whole
``[tokens, vocab]`` tensor is made, with or without autograd: the backward pass keeps the input and
three floats per row, and recomputes pi chunk by chunk.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from entroclip.objectives import LOG_RATIO_LIMIT, SurrogateOutput, broadcast_advantages

#: Floor for log-probabilities so that tokens of probability 0 (logit -inf) add 0 * floor = 0, not NaN.
_LOGP_FLOOR = -1e30
#: Logits per chunk when ``chunk_size`` is None, by device type: on a CPU the three float32 temporaries
#: of a chunk (1 MiB each) stay in the cache; an accelerator gets large chunks and few kernel launches.
CHUNK_LOGITS_CPU = 2**18
CHUNK_LOGITS_ACCELERATOR = 2**26


class TokenStats(NamedTuple):
    """float32 statistics per position ``[...]``; None where not requested.

    ``logp``: log pi of the given token (differentiable); ``entropy``: H in nats (differentiable);
    ``kappa``: entropy sensitivity of the given token (no gradient).
    """

    logp: Tensor | None
    entropy: Tensor | None
    kappa: Tensor | None


def _check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def chunk_rows(logits: Tensor, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size``, or by default a fixed number of logits per chunk for the device."""
    if chunk_size is None:
        cpu = logits.device.type == "cpu"
        budget = CHUNK_LOGITS_CPU if cpu else CHUNK_LOGITS_ACCELERATOR
        return max(1, budget // max(logits.shape[-1], 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _shifted(chunk: Tensor, shift: Tensor, temperature: float) -> Tensor:
    """A new float32 ``chunk / temperature - shift``, ``[n, V]``; ``shift``: float32 ``[n, 1]``."""
    z = chunk.to(torch.float32, copy=True)
    if temperature != 1.0:
        z.div_(temperature)
    return z.sub_(shift)


class _Chunk(NamedTuple):
    """What one chunk's forward pass gives, float32 ``[n]`` each: the row max of z and log s0 (kept for
    the backward pass), and the statistics."""

    shift: Tensor
    log_s0: Tensor
    logp: Tensor | None
    entropy: Tensor | None
    kappa: Tensor | None


def _chunk_forward(
    chunk: Tensor, tokens: Tensor | None, temperature: float, entropy: bool, kappa: bool
) -> _Chunk:
    """The statistics of one chunk of logits ``[n, V]`` (tokens ``[n, 1]``)."""
    shift = chunk.amax(-1, keepdim=True).float()
    if temperature != 1.0:
        shift = shift / temperature
    d = _shifted(chunk, shift, temperature)  # row max exactly 0
    picked = d.gather(-1, tokens).squeeze(-1) if tokens is not None else None
    if entropy or kappa:
        log_s0, h, spread = _entropy_sums(d.clamp_(min=_LOGP_FLOOR), kappa)
    else:
        log_s0, h, spread = d.exp_().sum(-1).log_(), None, None
    logp = picked - log_s0 if picked is not None else None
    k = None
    if spread is not None:
        assert logp is not None and h is not None
        logp_a = logp.clamp(min=_LOGP_FLOOR)
        k = -logp_a.exp() * (logp_a + h) + spread
    return _Chunk(shift.squeeze(-1), log_s0, logp, h, k)


def _entropy_sums(d: Tensor, kappa: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(log s0, H, sum_v pi_v^2 (log pi_v + H) or None)`` from shifted logits ``d`` ``[n, V]``."""
    e = d.exp()
    # torch.sum's cascaded summation keeps float32 error ~1e-5 relative at V = 150k (a plain dot
    # product accumulates ~20x more)
    work = e * d
    s0, s1 = e.sum(-1), work.sum(-1)
    log_s0, mean_d = s0.log(), s1 / s0
    if not kappa:
        return log_s0, log_s0 - mean_d, None
    s2 = torch.mul(e, e, out=work).sum(-1)
    s3 = work.mul_(d).sum(-1)
    return log_s0, log_s0 - mean_d, (s3 - s2 * mean_d) / s0.square()


def _chunk_backward(
    chunk: Tensor,
    tokens: Tensor | None,
    saved: tuple[Tensor, Tensor, Tensor | None],
    grad_logp: Tensor | None,
    grad_h: Tensor | None,
    temperature: float,
) -> Tensor:
    """float32 gradient w.r.t. one chunk of logits ``[n, V]``, g_logp (e_a - pi) - g_H pi (log pi + H)
    divided by the temperature, with log pi recomputed from ``saved = (shift, log_s0, H)``."""
    shift, log_s0, h = saved
    logp = _shifted(chunk, shift.unsqueeze(-1), temperature).sub_(log_s0.unsqueeze(-1))
    grad = logp.exp()
    if grad_h is None:
        assert grad_logp is not None
        grad.mul_(-grad_logp.unsqueeze(-1))
    else:
        assert h is not None
        coef = logp.clamp_(min=_LOGP_FLOOR).add_(h.unsqueeze(-1)).mul_(grad_h.unsqueeze(-1))
        if grad_logp is not None:
            coef.add_(grad_logp.unsqueeze(-1))
        grad.mul_(coef).neg_()
    if grad_logp is not None:
        assert tokens is not None
        grad.scatter_add_(-1, tokens, grad_logp.unsqueeze(-1))
    return grad.div_(temperature) if temperature != 1.0 else grad


def _rows(t: Tensor | None, rows: slice) -> Tensor | None:
    return t[rows] if t is not None else None


class _TokenStatsFunction(torch.autograd.Function):
    """``(logp_a, H, kappa)`` of flat logits ``[N, V]`` chunk by chunk; see :func:`token_stats`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        tokens: Tensor | None,
        temperature: float,
        rows: int,
        entropy: bool,
        kappa: bool,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        parts = [  # at least one chunk, so that empty inputs give empty outputs
            _chunk_forward(
                logits[i : i + rows], _rows(tokens, slice(i, i + rows)), temperature, entropy, kappa
            )
            for i in range(0, max(logits.shape[0], 1), rows)
        ]
        shift, log_s0, logp, h, k = (
            torch.cat(col) if col[0] is not None else None for col in zip(*parts, strict=True)
        )
        ctx.save_for_backward(logits, tokens, shift, log_s0, h)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.set_materialize_grads(False)
        if k is not None:
            ctx.mark_non_differentiable(k)
        return logp, h, k

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logp: Tensor | None, grad_h: Tensor | None, _grad_kappa: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        none = (None,) * 5
        if (grad_logp is None and grad_h is None) or not ctx.needs_input_grad[0]:
            return (None, *none)
        logits, tokens, shift, log_s0, h = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            rows = slice(start, start + ctx.rows)
            grad[rows] = _chunk_backward(
                logits[rows],
                _rows(tokens, rows),
                (shift[rows], log_s0[rows], _rows(h, rows)),
                _rows(grad_logp, rows),
                _rows(grad_h, rows),
                ctx.temperature,
            )
        return (grad, *none)


def token_stats(
    logits: Tensor,
    tokens: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    *,
    entropy: bool = True,
    kappa: bool = False,
) -> TokenStats:
    """Log-prob of ``tokens``, entropy and kappa of softmax(logits / temperature) in one chunked pass.

    Args:
        logits: ``[..., V]`` in any float dtype (bf16 is computed in float32 chunk by chunk); every row
            needs a finite maximum (-inf logits are tokens of probability 0).
        tokens: int64 ``[...]``, the sampled token at each position; None: no ``logp`` and no ``kappa``.
        chunk_size: rows per chunk; None: see :func:`chunk_rows`.
        entropy: compute H (always computed when ``kappa`` is).
        kappa: compute kappa (needs ``tokens``).
    Returns:
        :class:`TokenStats` of float32 ``[...]`` tensors. ``logp`` and ``entropy`` are differentiable
        w.r.t. ``logits``; a token of probability 0 has ``logp = -inf`` (its kappa is finite).
    """
    _check_temperature(temperature)
    rows = chunk_rows(logits, chunk_size)
    shape = logits.shape[:-1]
    if tokens is not None and tokens.shape != shape:
        raise ValueError(f"tokens must have shape {tuple(shape)}, got {tuple(tokens.shape)}")
    if kappa and tokens is None:
        raise ValueError("kappa needs the sampled tokens")
    flat_tokens = tokens.reshape(-1, 1).long() if tokens is not None else None
    flat = logits.reshape(-1, logits.shape[-1])
    out = _TokenStatsFunction.apply(flat, flat_tokens, temperature, rows, entropy or kappa, kappa)
    return TokenStats(*(t.reshape(shape) if t is not None else None for t in out))


def token_entropy(logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Exact entropy (nats) of softmax(logits / temperature) for every position.

    Args:
        logits: ``[..., V]`` in any float dtype (bf16 is computed in float32 chunk by chunk).
    Returns:
        float32 ``[...]``. Differentiable w.r.t. ``logits``.
    """
    entropy = token_stats(logits, None, temperature, chunk_size).entropy
    assert entropy is not None
    return entropy


@torch.no_grad()
def entropy_sensitivity(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Entropy and logit-space entropy sensitivity kappa of the sampled tokens, in one chunked pass.

    Args:
        logits: ``[..., V]``; tokens: int64 ``[...]`` (the sampled token at each position).
    Returns:
        ``(entropy, kappa)``, each float32 ``[...]``, no gradient.
    """
    _, entropy, kappa = token_stats(logits, tokens, temperature, chunk_size, kappa=True)
    assert entropy is not None and kappa is not None
    return entropy, kappa


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
