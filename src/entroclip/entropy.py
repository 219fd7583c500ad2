"""Exact per-token log-prob, entropy and entropy sensitivity kappa from logits.

Notation per token: z = logits / temperature over the vocabulary, pi = softmax(z), sampled token a,
H = -sum_v pi_v log pi_v (nats).

- dH/dz_k = -pi_k (log pi_k + H)
- kappa = <dH/dz, e_a - pi> = -pi_a (log pi_a + H) + sum_v pi_v^2 (log pi_v + H)

A gradient step that raises log pi_a with weight w changes z by eta * w * (e_a - pi) and H by
eta * w * kappa + O(eta^2). Rare tokens (log pi_a < -H, roughly) have kappa > 0: pushing them up raises
entropy, pushing them down lowers it.

All three come from one pass over the vocabulary (:func:`token_stats`). The logits are shifted by their
row maximum and counted in bits, d = (z - max z) log2(e), so that e = 2^d (torch's CPU ``exp2`` is about
twice as fast as its ``exp``); with the row sums s0 = sum e, s1 = sum e d, s2 = sum e^2, s3 = sum e^2 d and
m = s1 / s0, in nats:

    log pi_a = ln2 (d_a - log2 s0),   H = ln2 (log2 s0 - m),
    sum_v pi_v^2 (log pi_v + H) = ln2 (s3 - s2 m) / s0^2.

Sums of e d rather than e z keep H free of cancellation when the logits are large. Memory: the rows are
processed in chunks, each converted to float32 on its own, so no float32 copy of the whole
``[tokens, vocab]`` tensor is made, with or without autograd: the backward pass keeps the input and
three floats per row, and recomputes pi chunk by chunk. Eagerly, a chunk takes a dozen passes over its
logits (one per torch operation); large inputs on a CPU instead take one pass compiled by torch.compile,
whose loop over a row computes every sum at once and keeps no ``[tokens, vocab]`` intermediate either.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from entroclip.attribution import EFFECT_KEYS, attribution_terms, clip_attribution
from entroclip.compiling import CompiledForLargeInputs

#: Floor for log-probabilities (and their base-2 counterparts) where a token of probability 0 (logit
#: -inf) would make 0 * -inf = NaN; 2^floor is exactly 0.
_LOGP_FLOOR = -1e30
_LN2 = math.log(2.0)
#: Logits per chunk when ``chunk_size`` is None, by device type: on a CPU the two float32 buffers of a
#: chunk (2 MiB each) stay in the cache; an accelerator gets large chunks and few kernel launches.
CHUNK_LOGITS_CPU = 2**19
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
    """Rows per chunk of the eager passes: ``chunk_size``, or by default a fixed number of logits per
    chunk for the device."""
    if chunk_size is None:
        cpu = logits.device.type == "cpu"
        budget = CHUNK_LOGITS_CPU if cpu else CHUNK_LOGITS_ACCELERATOR
        return max(1, budget // max(logits.shape[-1], 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _bits(chunk: Tensor, shift: Tensor, temperature: float, out: Tensor) -> Tensor:
    """``out = (chunk - shift) log2(e) / temperature``, float32 ``[n, V]``; ``shift``: ``[n, 1]``."""
    if chunk.dtype == torch.float32:
        torch.sub(chunk, shift, out=out)
    else:  # a mixed-dtype subtraction would take a slow path
        out.copy_(chunk).sub_(shift)
    return out.mul_(1.0 / (_LN2 * temperature))


def _workspace(logits: Tensor, rows: int, buffers: int) -> list[Tensor]:
    """``buffers`` float32 scratch tensors ``[rows, V]`` that every chunk reuses: fresh memory for each
    chunk would cost page faults. Separate tensors, not views of one: inside ``torch.compile`` writes
    through views of a shared base become selects over all of it in every element's arithmetic."""
    shape = (min(rows, logits.shape[0]), logits.shape[-1])
    return [logits.new_empty(shape, dtype=torch.float32) for _ in range(buffers)]


class _Sums(NamedTuple):
    """Float32 ``[n]`` row sums of one chunk (see the module docstring); None where not needed."""

    shift: Tensor
    picked: Tensor | None
    s0: Tensor
    s1: Tensor | None
    s2: Tensor | None
    s3: Tensor | None


def _chunk_sums(
    chunk: Tensor, tokens: Tensor | None, temperature: float, moments: int, work: list[Tensor]
) -> _Sums:
    """Row sums of one chunk of logits ``[n, V]`` (tokens ``[n, 1]``): s0 only (``moments=0``), up to s1
    (1) or up to s3 (2); ``shift`` is the row maximum of the logits and ``picked`` d at the tokens.
    ``work``: scratch, see :func:`_workspace` (two buffers unless ``moments=0``)."""
    n = chunk.shape[0]
    shift = chunk.amax(-1, keepdim=True).float()
    d = _bits(chunk, shift, temperature, work[0][:n])
    picked = d.gather(-1, tokens).squeeze(-1) if tokens is not None else None
    if moments == 0:
        return _Sums(shift.squeeze(-1), picked, d.exp2_().sum(-1), None, None, None)
    # A token of probability 0 (d = -inf) would make e d = 0 * -inf NaN: the floor keeps d finite, with
    # exp2(d) still exactly 0 (a NaN logit stays NaN and makes s0 NaN). A plain sum then vectorises where
    # nansum would not (inductor tests each lane for NaN).
    e = torch.exp2(d.clamp_(min=_LOGP_FLOOR), out=work[1][:n])
    # in place from here on: d becomes e d, then e^2 d, and e becomes e^2. torch's cascaded summation
    # keeps float32 error ~1e-5 relative at V = 150k (a plain dot product accumulates ~20x more).
    s0, s1 = e.sum(-1), d.mul_(e).sum(-1)
    if moments == 1:
        return _Sums(shift.squeeze(-1), picked, s0, s1, None, None)
    s3 = d.mul_(e).sum(-1)
    return _Sums(shift.squeeze(-1), picked, s0, s1, e.square_().sum(-1), s3)


def _join(parts: tuple[Tensor | None, ...]) -> Tensor | None:
    """The chunks' ``[n]`` values of one sum as one ``[N]`` tensor (None if not computed)."""
    tensors = [t for t in parts if t is not None]
    if not tensors:
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _rows(t: Tensor | None, rows: slice) -> Tensor | None:
    return t[rows] if t is not None else None


#: Inside torch.compile a row is summed in blocks of this many logits, then over the blocks. A compiled
#: sum over a whole row adds V / w terms in each of its w vector lanes (w = 8 or 16), in float32 10-50x
#: less accurate than torch's cascaded eager sum at V = 150k; in blocks a lane adds 128 / w terms, and the
#: V / 128 block sums are added in a second loop.
_SUM_BLOCK = 128


def _blocked_row_sum(t: Tensor) -> Tensor:
    """Sum of ``[n, V]`` over the last dimension in blocks of ``_SUM_BLOCK`` (for compiled code: eagerly
    the slice would be copied), ``[n]``."""
    n, vocab = t.shape
    whole = vocab - vocab % _SUM_BLOCK
    blocks = t[:, :whole].reshape(n, whole // _SUM_BLOCK, _SUM_BLOCK).sum(-1).sum(-1)
    return blocks + t[:, whole:].sum(-1)


def _fused_bits(logits: Tensor, shift: Tensor, temperature: float) -> Tensor:
    """:func:`_bits` without an output buffer, for compiled passes: ``[N, V]``; ``shift``: ``[N, 1]``."""
    return (logits.float() - shift) * (1.0 / (_LN2 * temperature))


def _fused_sums(logits: Tensor, tokens: Tensor | None, *, temperature: float, moments: int) -> _Sums:
    """The row sums of :func:`_chunk_sums` for all rows of ``logits`` ``[N, V]`` at once, written for
    torch.compile: one loop over the vocabulary per row, no ``[N, V]`` intermediate."""
    shift = logits.amax(-1, keepdim=True).float()
    d = _fused_bits(logits, shift, temperature)
    picked = d.gather(-1, tokens).squeeze(-1) if tokens is not None else None
    if moments == 0:
        return _Sums(shift.squeeze(-1), picked, _blocked_row_sum(torch.exp2(d)), None, None, None)
    d = d.clamp(min=_LOGP_FLOOR)  # as in _chunk_sums: e d must not be 0 * -inf
    e = torch.exp2(d)
    s0, s1 = _blocked_row_sum(e), _blocked_row_sum(e * d)
    if moments == 1:
        return _Sums(shift.squeeze(-1), picked, s0, s1, None, None)
    squared = e * e
    return _Sums(shift.squeeze(-1), picked, s0, s1, _blocked_row_sum(squared), _blocked_row_sum(squared * d))


def _chunked_sums(
    logits: Tensor, tokens: Tensor | None, *, temperature: float, moments: int, rows: int | None = None
) -> _Sums:
    """The row sums of flat ``logits`` ``[N, V]`` chunk by chunk (``rows`` per chunk, by default
    :func:`chunk_rows`'s) on reused scratch buffers."""
    rows = chunk_rows(logits, rows)
    work = _workspace(logits, rows, 2 if moments else 1)
    parts = [  # at least one chunk, so that empty inputs give empty outputs
        _chunk_sums(logits[i : i + rows], _rows(tokens, slice(i, i + rows)), temperature, moments, work)
        for i in range(0, max(logits.shape[0], 1), rows)
    ]
    return _Sums._make(_join(col) for col in zip(*parts, strict=True))


#: Eagerly, large inputs on a CPU take one compiled pass: twice as fast as the chunks with kappa (an eager
#: chunk takes a dozen passes over its logits), and as exact (blocked sums). The vocabulary size is static
#: (a symbolic one fails to lower the blocked sums); the number of rows is dynamic.
_fused_pass = CompiledForLargeInputs(_fused_sums, "token_stats", eager=_chunked_sums, dynamic=False)


def _one_pass(
    passes: CompiledForLargeInputs[..., Any],
    chunk_size: int | None,
    logits: Tensor,
    *per_row: Tensor | None,
    **options: Any,
) -> Any:
    """One pass of ``passes`` over flat ``logits`` ``[N, V]`` and their per-row companions (``[N]`` or
    ``[N, 1]``): inside torch.compile its compilable function, traced into the caller's graph; eagerly, on
    a CPU with ``chunk_size`` None, through ``passes`` (compiled for large inputs); else its eager chunks,
    ``chunk_size`` rows each. A compiled pass gets its tensors detached (dynamo would read ``.grad`` of a
    non-leaf input, with a warning) and their rows marked dynamic (a graph serves every number of rows)."""
    if torch.compiler.is_compiling():
        return passes.function(logits, *per_row, **options)
    if chunk_size is None and logits.device.type == "cpu":
        tensors = [t.detach() if t is not None else None for t in (logits, *per_row)]
        for t in tensors:
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return passes(logits.numel(), *tensors, **options)
    return passes.eager(logits, *per_row, **options, rows=chunk_size)


def _statistics(sums: _Sums) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(log2 s0, logp_a, H, kappa)`` from the row sums of all rows, float32 ``[N]`` each."""
    log2_s0 = sums.s0.log2()
    logp = (sums.picked - log2_s0).mul_(_LN2) if sums.picked is not None else None
    if sums.s1 is None:
        return log2_s0, logp, None, None
    mean = sums.s1 / sums.s0
    h = (log2_s0 - mean).mul_(_LN2)
    if sums.s2 is None or sums.s3 is None or logp is None:
        return log2_s0, logp, h, None
    logp_a = logp.clamp(min=_LOGP_FLOOR)
    spread = (sums.s3 - sums.s2 * mean).mul_(_LN2).div_(sums.s0.square())
    return log2_s0, logp, h, spread - logp_a.exp() * (logp_a + h)


def _chunk_backward(
    chunk: Tensor,
    tokens: Tensor | None,
    saved: tuple[Tensor, Tensor, Tensor | None],
    grads: tuple[Tensor | None, Tensor | None],
    temperature: float,
    out: Tensor,
    scratch: Tensor,
) -> Tensor:
    """``out`` = the float32 gradient w.r.t. one chunk of logits ``[n, V]``,
    g_logp (e_a - pi) - g_H pi (log pi + H) divided by the temperature, with log2 pi recomputed from
    ``saved = (shift, log2 s0, H)``; ``grads = (g_logp, g_H)``; ``scratch``: ``[n, V]`` (used with g_H)."""
    shift, log2_s0, h = saved
    grad_logp, grad_h = grads
    log2_p = _bits(chunk, shift.unsqueeze(-1), temperature, out).sub_(log2_s0.unsqueeze(-1))
    if grad_h is None:
        assert grad_logp is not None
        log2_p.exp2_().mul_(-grad_logp.unsqueeze(-1))
    else:
        assert h is not None
        p = torch.exp2(log2_p, out=scratch)
        coef = log2_p.clamp_(min=_LOGP_FLOOR).mul_(_LN2).add_(h.unsqueeze(-1)).mul_(grad_h.unsqueeze(-1))
        if grad_logp is not None:
            coef.add_(grad_logp.unsqueeze(-1))
        coef.mul_(p).neg_()
    if grad_logp is not None:
        assert tokens is not None
        out.scatter_add_(-1, tokens, grad_logp.unsqueeze(-1))
    return out.div_(temperature) if temperature != 1.0 else out


def _fused_gradient(
    logits: Tensor,
    tokens: Tensor | None,
    shift: Tensor,
    log2_s0: Tensor,
    h: Tensor | None,
    grad_logp: Tensor | None,
    grad_h: Tensor | None,
    *,
    temperature: float,
) -> Tensor:
    """The gradient of :func:`_chunk_backward` for all rows of ``logits`` ``[N, V]`` at once, in the
    logits' dtype, written for torch.compile: one loop over the rows (the sampled token's term is a select;
    a scatter into the result ran twice as slow in some of the graphs)."""
    log2_p = _fused_bits(logits, shift.unsqueeze(-1), temperature) - log2_s0.unsqueeze(-1)
    p = torch.exp2(log2_p)
    if grad_h is None:
        assert grad_logp is not None
        grad = -grad_logp.unsqueeze(-1) * p
    else:
        assert h is not None
        coef = (log2_p.clamp(min=_LOGP_FLOOR) * _LN2 + h.unsqueeze(-1)) * grad_h.unsqueeze(-1)
        if grad_logp is not None:
            coef = coef + grad_logp.unsqueeze(-1)
        grad = -(coef * p)
    if grad_logp is not None:
        assert tokens is not None
        sampled = torch.arange(logits.shape[-1], device=logits.device) == tokens
        grad = grad + torch.where(sampled, grad_logp.unsqueeze(-1), 0.0)
    return (grad / temperature).to(logits.dtype)


def _chunked_gradient(
    logits: Tensor,
    tokens: Tensor | None,
    shift: Tensor,
    log2_s0: Tensor,
    h: Tensor | None,
    grad_logp: Tensor | None,
    grad_h: Tensor | None,
    *,
    temperature: float,
    rows: int | None = None,
) -> Tensor:
    """The gradient w.r.t. flat ``logits`` ``[N, V]``, in their dtype, chunk by chunk (``rows`` per chunk,
    by default :func:`chunk_rows`'s): computed in place in the gradient when it is float32."""
    rows = chunk_rows(logits, rows)
    grad = torch.empty_like(logits)
    direct = grad.dtype == torch.float32
    work = _workspace(logits, rows, 2 - direct)
    for start in range(0, logits.shape[0], rows):
        part = slice(start, start + rows)
        n = logits[part].shape[0]
        out = _chunk_backward(
            logits[part],
            _rows(tokens, part),
            (shift[part], log2_s0[part], _rows(h, part)),
            (_rows(grad_logp, part), _rows(grad_h, part)),
            temperature,
            grad[part] if direct else work[1][:n],
            work[0][:n],
        )
        if not direct:
            grad[part] = out
    return grad


_gradient_pass = CompiledForLargeInputs(
    _fused_gradient, "token_stats", eager=_chunked_gradient, dynamic=False
)


class _TokenStatsFunction(torch.autograd.Function):
    """``(logp_a, H, kappa)`` of flat logits ``[N, V]`` chunk by chunk; see :func:`token_stats`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        tokens: Tensor | None,
        temperature: float,
        chunk_size: int | None,
        moments: int,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        sums = _one_pass(_fused_pass, chunk_size, logits, tokens, temperature=temperature, moments=moments)
        log2_s0, logp, h, kappa = _statistics(sums)
        ctx.save_for_backward(logits, tokens, sums.shift, log2_s0, h)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)
        if kappa is not None:
            ctx.mark_non_differentiable(kappa)
        return logp, h, kappa

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logp: Tensor | None, grad_h: Tensor | None, _grad_kappa: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        none = (None,) * 4
        if (grad_logp is None and grad_h is None) or not ctx.needs_input_grad[0]:
            return (None, *none)
        logits, tokens, shift, log2_s0, h = ctx.saved_tensors
        grad = _one_pass(
            _gradient_pass,
            ctx.chunk_size,
            logits,
            tokens,
            shift,
            log2_s0,
            h,
            grad_logp,
            grad_h,
            temperature=ctx.temperature,
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
    """Log-prob of ``tokens``, entropy and kappa of softmax(logits / temperature) in one pass.

    Args:
        logits: ``[..., V]`` in any float dtype (bf16 is computed in float32 chunk by chunk); every row
            needs a finite maximum (-inf logits are tokens of probability 0).
        tokens: int64 ``[...]``, the sampled token at each position; None: no ``logp`` and no ``kappa``.
        chunk_size: rows per chunk of the eager passes. None: on a CPU, inputs of at least
            :data:`entroclip.compiling.COMPILE_FROM` logits take one pass forward and one backward,
            compiled by torch.compile (the eager chunks where it cannot build); smaller ones and other
            devices take chunks of :func:`chunk_rows`'s default size. Inside ``torch.compile`` the
            passes are traced into the caller's graph as single loops over the rows (a Python loop of
            chunks on reused scratch buffers compiles into copies of them).
        entropy: compute H (always computed when ``kappa`` is).
        kappa: compute kappa (needs ``tokens``).
    Returns:
        :class:`TokenStats` of float32 ``[...]`` tensors. ``logp`` and ``entropy`` are differentiable
        w.r.t. ``logits``; a token of probability 0 has ``logp = -inf`` (its kappa is finite).
    """
    _check_temperature(temperature)
    chunk_rows(logits, chunk_size)  # checks chunk_size
    shape = logits.shape[:-1]
    if tokens is not None and tokens.shape != shape:
        raise ValueError(f"tokens must have shape {tuple(shape)}, got {tuple(tokens.shape)}")
    if kappa and tokens is None:
        raise ValueError("kappa needs the sampled tokens")
    flat_tokens = tokens.reshape(-1, 1).long() if tokens is not None else None
    flat = logits.reshape(-1, logits.shape[-1])
    moments = 2 if kappa else int(entropy)
    out = _TokenStatsFunction.apply(flat, flat_tokens, temperature, chunk_size, moments)
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


#: the clip attribution lives in entroclip.attribution; these names stay importable from here (public API)
__all__ = [
    "EFFECT_KEYS",
    "TokenStats",
    "attribution_terms",
    "chunk_rows",
    "clip_attribution",
    "entropy_sensitivity",
    "token_entropy",
    "token_stats",
]
