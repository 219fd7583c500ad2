"""Entropy, kappa and attribution against float64 references: dense formulas, autograd, finite differences."""

import math

import pytest
import torch

from entroclip.entropy import clip_attribution, entropy_sensitivity, token_entropy
from entroclip.objectives import AGGREGATIONS, clipped_surrogate


def dense_entropy64(logits, temperature=1.0):
    p = torch.softmax(logits.double() / temperature, -1)
    return -(p * p.log()).sum(-1)


@pytest.mark.parametrize("shape", [(7, 11), (2, 3, 50), (1, 1, 1, 300), (5, 2)])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_entropy_matches_dense_float64(gen, shape, temperature):
    logits = 3 * torch.randn(*shape, generator=gen)
    got = token_entropy(logits, temperature, chunk_size=3)
    assert got.shape == shape[:-1] and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), dense_entropy64(logits, temperature), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 13, 64, 10_000])
def test_chunking_does_not_change_the_result(gen, chunk_size):
    logits = torch.randn(4, 13, 97, generator=gen)
    ref = token_entropy(logits, chunk_size=4 * 13)
    torch.testing.assert_close(token_entropy(logits, chunk_size=chunk_size), ref, rtol=0, atol=2e-6)
    ent, kap = entropy_sensitivity(logits, torch.zeros(4, 13, dtype=torch.long), chunk_size=chunk_size)
    ent_ref, kap_ref = entropy_sensitivity(logits, torch.zeros(4, 13, dtype=torch.long), chunk_size=52)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(kap, kap_ref, rtol=0, atol=2e-6)


def test_bf16_large_vocab(gen):
    logits = (4 * torch.randn(6, 151_936, generator=gen)).to(torch.bfloat16)
    got = token_entropy(logits, chunk_size=4)
    assert got.dtype == torch.float32
    # the reference sees the same bf16-rounded logits, so only float32 summation error remains
    torch.testing.assert_close(got.double(), dense_entropy64(logits.float()), rtol=1e-4, atol=1e-4)
    ent, kappa = entropy_sensitivity(logits, torch.arange(6) * 1000, chunk_size=4)
    torch.testing.assert_close(ent, got)
    assert torch.isfinite(kappa).all()


def test_entropy_extremes_are_finite():
    logits = torch.tensor([[0.0, -math.inf, -math.inf], [1e4, 0.0, -1e4], [0.0, 0.0, 0.0]])
    got = token_entropy(logits)
    assert torch.isfinite(got).all()
    assert got[0].item() == 0.0
    assert got[2].item() == pytest.approx(math.log(3), rel=1e-6)


def test_entropy_is_differentiable(gen):
    logits = torch.randn(3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    token_entropy(logits).sum().backward()
    p = torch.softmax(logits.detach(), -1)
    h = dense_entropy64(logits.detach())
    expected = -p * (p.log() + h[:, None])  # dH/dz_k = -pi_k (log pi_k + H)
    torch.testing.assert_close(logits.grad, expected.float().double(), rtol=1e-5, atol=1e-6)


def kappa_by_autograd(logits, tokens):
    """<dH/dz, e_a - pi> with the entropy gradient from autograd in float64."""
    z = logits.double().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dense_entropy64(z).sum(), z)
    p = torch.softmax(z.detach(), -1)
    direction = torch.nn.functional.one_hot(tokens, logits.shape[-1]).double() - p
    return (grad * direction).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kappa_matches_autograd(gen, temperature):
    logits = 2 * torch.randn(5, 9, 40, generator=gen)
    tokens = torch.randint(0, 40, (5, 9), generator=gen)
    ent, kappa = entropy_sensitivity(logits, tokens, temperature, chunk_size=7)
    torch.testing.assert_close(ent.double(), dense_entropy64(logits, temperature), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        kappa.double(), kappa_by_autograd(logits / temperature, tokens), rtol=1e-4, atol=1e-6
    )


def test_step_along_e_a_minus_pi_changes_entropy_by_eta_w_kappa(gen):
    """Finite difference: H(z + eta w (e_a - pi)) - H(z) = eta w kappa + O(eta^2)."""
    logits = torch.randn(64, 30, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 30, (64,), generator=gen)
    w = torch.randn(64, generator=gen, dtype=torch.float64)
    _, kappa = entropy_sensitivity(logits, tokens)
    direction = torch.nn.functional.one_hot(tokens, 30).double() - torch.softmax(logits, -1)
    errors = []
    for eta in [1e-1, 5e-2, 2.5e-2, 1.25e-2]:
        moved = logits + eta * w[:, None] * direction
        actual = dense_entropy64(moved) - dense_entropy64(logits)
        errors.append((actual - eta * w * kappa.double()).abs().max().item())
    # kappa is float32 (rel. error ~1e-7); the float64 second-order error dominates at these eta
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert all(3.5 < r < 4.5 for r in ratios), ratios  # halving eta quarters the error


def reference_attribution(adv, logp_new, logp_old, mask, kappa, eps_low, eps_high, agg):
    out = {"effect_low": 0.0, "effect_high": 0.0, "effect_pos": 0.0, "effect_neg": 0.0}
    rows = [b for b in range(mask.shape[0]) if mask[b].any()]
    n_tok = int(mask.sum())
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            a, r = float(adv[b, t]), math.exp(float(logp_new[b, t] - logp_old[b, t]))
            norm = n_tok if agg == "token-mean" else len(rows) * int(mask[b].sum())
            term = a * r / norm * float(kappa[b, t])
            if a < 0 and r < 1 - eps_low:
                out["effect_low"] -= term
            elif a > 0 and r > 1 + eps_high:
                out["effect_high"] -= term
            elif a > 0:
                out["effect_pos"] += term
            elif a < 0:
                out["effect_neg"] += term
    return out


@pytest.mark.parametrize("agg", AGGREGATIONS[:2])
def test_attribution_matches_reference(gen, agg):
    logits = 2 * torch.randn(6, 10, 25, generator=gen)
    tokens = torch.randint(0, 25, (6, 10), generator=gen)
    logp_new = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    logp_old = logp_new + 0.4 * torch.randn(6, 10, generator=gen)
    adv = torch.randn(6, 10, generator=gen)
    mask = torch.rand(6, 10, generator=gen) < 0.8
    out = clipped_surrogate(logp_new, logp_old, adv, mask, 0.2, 0.2, agg=agg)
    _, kappa = entropy_sensitivity(logits, tokens)
    got = clip_attribution(out, kappa, adv, logp_new, logp_old, mask)
    ref = reference_attribution(adv, logp_new, logp_old, mask, kappa, 0.2, 0.2, agg)
    assert out.clip_low.any() and out.clip_high.any()
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert got["effect_dual"] == 0.0


def test_attribution_sums_to_first_order_entropy_change_of_unclipped_step(gen):
    """With no clipping, effect_pos + effect_neg is d/d eta of the sum of entropies after a logit step."""
    logits = torch.randn(4, 6, 12, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 12, (4, 6), generator=gen)
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    z = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0]
    out = clipped_surrogate(logp, logp.detach(), adv, mask, None, None)
    (grad,) = torch.autograd.grad(out.loss, z)
    eta = 1e-4
    delta = (dense_entropy64(logits - eta * grad) - dense_entropy64(logits)).sum().item() / eta
    _, kappa = entropy_sensitivity(logits, tokens)
    got = clip_attribution(out, kappa, adv, logp, logp, mask)
    assert got["effect_pos"] + got["effect_neg"] == pytest.approx(delta, rel=1e-3)


def test_input_validation():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_entropy(torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        token_entropy(torch.zeros(2, 3), chunk_size=0)
    with pytest.raises(ValueError, match="tokens must have shape"):
        entropy_sensitivity(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
