"""Initial policies for the lab: uniform, Zipf-like and random Dirichlet logits at a chosen entropy.

All builders return logits ``[K, n]`` (K contexts, n actions); the lab broadcasts them over seeds, so
every seed starts from the same policy and seed-to-seed differences come from sampling alone.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from entroclip.entropy import token_entropy

PolicyKind = Literal["uniform", "zipf", "dirichlet"]
POLICY_KINDS: tuple[str, ...] = get_args(PolicyKind)


def temper_to_entropy(logits: Tensor, entropy: float) -> Tensor:
    """Scale each row of ``logits`` ``[..., n]`` by 1 / temperature so that its entropy equals ``entropy``.

    The entropy of softmax(z / T) rises monotonically with T from the entropy of the arg-max set to
    log n, so the temperature is found by bisection on log T in [-30, 30], row by row (60 halvings, in
    float64). The entropy is measured with :func:`entroclip.entropy.token_entropy` (float32), so the
    target is met to about 1e-6 nats.
    """
    n = logits.shape[-1]
    if not 0.0 < entropy < math.log(n):
        raise ValueError(f"entropy must be in (0, log n = {math.log(n):.4f}), got {entropy}")
    spread = logits.amax(-1) - logits.amin(-1)
    if not bool((spread > 0).all()):
        raise ValueError("a row of constant logits is uniform at every temperature: its entropy is log n")
    wide = logits.double()
    lo = torch.full(logits.shape[:-1], -30.0, dtype=torch.float64)
    hi = torch.full(logits.shape[:-1], 30.0, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        too_cold = token_entropy(wide / mid.exp().unsqueeze(-1)) < entropy
        lo = torch.where(too_cold, mid, lo)
        hi = torch.where(too_cold, hi, mid)
    return (wide / ((lo + hi) / 2).exp().unsqueeze(-1)).to(logits.dtype)


def zipf_logits(n: int, exponent: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Zipf-like logits ``-exponent * log(rank)``, ``[n]``: pi_a proportional to 1 / a^exponent."""
    return -exponent * torch.log(torch.arange(1, n + 1, dtype=dtype))


def initial_logits(
    kind: PolicyKind,
    n: int,
    contexts: int = 1,
    entropy: float | None = None,
    *,
    dirichlet_alpha: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Logits ``[contexts, n]`` of an initial policy.

    - ``uniform``: every action 1/n (entropy log n; ``entropy`` must be None or log n).
    - ``zipf``: pi_a proportional to 1/a, the same in every context.
    - ``dirichlet``: an independent Dirichlet(alpha) draw per context (needs ``generator`` for
      reproducibility).

    With ``entropy`` set, zipf and dirichlet policies are tempered to exactly that entropy (nats).
    """
    if kind not in POLICY_KINDS:
        raise ValueError(f"kind must be one of {POLICY_KINDS}, got {kind!r}")
    if n < 2 or contexts < 1:
        raise ValueError(f"need n >= 2 actions and contexts >= 1, got n={n}, contexts={contexts}")
    if kind == "uniform":
        if entropy is not None and not math.isclose(entropy, math.log(n), rel_tol=1e-9):
            raise ValueError(f"the uniform policy has entropy log n = {math.log(n):.4f}, got {entropy}")
        return torch.zeros(contexts, n, dtype=dtype)
    if kind == "zipf":
        logits = zipf_logits(n, dtype=dtype).expand(contexts, n).clone()
    else:
        if not dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
        alpha = torch.full((contexts, n), dirichlet_alpha, dtype=dtype)
        gamma = torch._standard_gamma(alpha, generator=generator)
        logits = gamma.clamp_min(torch.finfo(dtype).tiny).log()
    return logits if entropy is None else temper_to_entropy(logits, entropy)
