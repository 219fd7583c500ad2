"""entroclip.levers: EntroPIC's token-weight term against the authors' formula and a finite difference, and
the high-entropy mask (the 80/20 rule) against TRL 1.16's own code.

- EntroPIC: ``compute_policy_loss_entropic`` of github.com/yk7333/EntroPIC (commit 2470730,
  core_algos.py) adds ``control_alpha * agg_loss(-ratio * |A|, response_mask * (log_prob > log 0.95))``;
  written out in float64 below (it needs a patched verl to import).
- TRL: ``GRPOTrainer.get_high_entropy_mask`` and ``_compute_loss`` with ``top_entropy_quantile`` < 1 (see
  tests/peers.py).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from peers import TRLStandIn, trl_loss

from entroclip.entropy import entropy_sensitivity
from entroclip.levers import high_entropy_mask, likely_tokens, token_weight_effect, token_weight_term
from entroclip.objectives import AGGREGATIONS, aggregation_scale, importance_ratio, surrogate_terms

RTOL = 1e-6
LENGTHS = (9, 6, 2, 1, 5, 8, 9, 4, 7, 3, 9, 5, 9, 2, 6, 8)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


def batch(gen, lengths=LENGTHS, length=9, dtype=torch.float32):
    """Log-probs with a share of likely tokens (p > 0.95), log-ratios of spread 0.3, advantages [B], mask."""
    rows = len(lengths)
    likely = torch.rand(rows, length, generator=gen) < 0.4
    p = torch.where(
        likely,
        0.955 + 0.04 * torch.rand(rows, length, generator=gen),
        torch.rand(rows, length, generator=gen) * 0.9 + 0.02,
    )
    new = p.log().to(dtype).requires_grad_()
    old = new.detach() - 0.3 * torch.randn(rows, length, generator=gen, dtype=dtype)
    adv = torch.randn(rows, generator=gen, dtype=dtype)
    mask = torch.arange(length) < torch.tensor(lengths)[:, None]
    return new, old, adv, mask


def entropic_adjustment(new, old, adv, mask, alpha, threshold=0.95):
    """The authors' term in float64: alpha * masked_mean(-ratio * |A|, mask & (log_prob > log threshold))
    (their ``agg_loss`` in token-mean mode)."""
    new, old = new.double(), old.double()
    ratio = torch.exp(torch.clamp(new - old, -20.0, 20.0))
    prob_mask = (mask & (new > math.log(threshold))).double()
    values = -ratio * adv.double().abs()[:, None]
    return alpha * (values * prob_mask).sum() / prob_mask.sum()


def test_token_weight_term_equals_entropic(gen):
    new, old, adv, mask = batch(gen)
    term, likely, _ = token_weight_term(new, old, adv, mask, 0.95)
    assert 0 < likely.sum() < mask.sum()
    ours = 0.37 * term
    (our_grad,) = torch.autograd.grad(ours, new)
    new64 = new.detach().double().requires_grad_()
    theirs = entropic_adjustment(new64, old, adv, mask, 0.37)
    (their_grad,) = torch.autograd.grad(theirs, new64)
    torch.testing.assert_close(ours.double(), theirs, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(our_grad.double(), their_grad, rtol=RTOL, atol=1e-12)


def test_token_weights_scale_the_likely_tokens_push_by_sign(gen):
    """With the surrogate (no clip, token-mean over the likely tokens alone) the weight is 1 + alpha on
    A > 0 and 1 - alpha on A < 0: alpha > 0 sharpens, alpha < 0 holds the likely tokens back."""
    new, old, adv, mask = batch(gen)
    likely = likely_tokens(new, mask, 0.95)
    alpha = 0.5
    out, _ = surrogate_terms(new, old, adv, likely, None, None)
    term, _, _ = token_weight_term(new, old, adv, likely, 0.95)
    (grad,) = torch.autograd.grad(out.loss + alpha * term, new, retain_graph=True)
    (plain,) = torch.autograd.grad(out.loss, new)
    sign = torch.sign(adv)[:, None].expand_as(new)
    expected = torch.where(likely, plain * (1 + alpha * sign), torch.zeros_like(plain))
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_token_weight_effect_against_a_finite_difference(gen, agg):
    """A tabular softmax: one gradient step of size eta on every token's own logits along the token-weight
    term changes the entropy by eta times ``token_weight_effect`` (to first order)."""
    lengths, length, vocab = (8, 5, 2, 1, 6, 8, 6, 3, 8, 7, 4, 8, 2, 6, 8, 5), 8, 5
    rows = len(lengths)
    logits = 3.0 * torch.randn(rows * length, vocab, generator=gen, dtype=torch.float64)
    logits[:, 0] += 4.0  # a share of the sampled tokens above 0.95
    logits.requires_grad_()
    tokens = torch.multinomial(F.softmax(logits.detach(), -1), 1, generator=gen)
    new = F.log_softmax(logits, -1).gather(-1, tokens).view(rows, length)
    old = new.detach() - 0.2 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(rows, generator=gen, dtype=torch.float64)
    mask = torch.arange(length) < torch.tensor(lengths)[:, None]
    _, kappa = entropy_sensitivity(logits.detach(), tokens.squeeze(-1))
    alpha = -0.8

    term, likely, scale = token_weight_term(new, old, adv, mask, 0.95, agg, max_len=10)
    assert likely.sum() > 5
    (grad,) = torch.autograd.grad(alpha * term, logits)
    eta = 1e-6
    entropy = lambda z: -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum()  # noqa: E731
    finite_difference = ((entropy(logits.detach() - eta * grad) - entropy(logits.detach())) / eta).item()
    ratio = importance_ratio(new.detach(), old, mask)
    effect = token_weight_effect(alpha, adv, ratio, likely, scale, kappa.view(rows, length)).item()
    assert effect > 0  # alpha < 0 holds likely tokens back: entropy rises
    # the effects are 3e-4 to 3e-3 nats; the second-order term (eta/2 |grad|^2 O(1), ~1e-9) and float32
    # rounding of kappa (~1e-7 relative) are far below 1e-6, a wrong weight or token set far above it
    assert finite_difference == pytest.approx(effect, abs=1e-6)


def test_high_entropy_mask_equals_trls(gen):
    pytest.importorskip("trl.trainer.grpo_trainer")
    from trl.trainer.grpo_trainer import GRPOTrainer

    new, _, _, mask = batch(gen)
    entropies = torch.rand(new.shape, generator=gen) * 3
    for quantile in (0.0, 0.2, 0.5, 1.0):
        stand_in = TRLStandIn("grpo", "token", new)
        theirs = GRPOTrainer.get_high_entropy_mask(stand_in, entropies, mask.float(), 1 - quantile)
        ours = high_entropy_mask(entropies, mask, quantile)
        assert torch.equal(ours, theirs), quantile
    assert high_entropy_mask(entropies, mask, 0.2).sum() == pytest.approx(0.2 * mask.sum().item(), abs=2)


@pytest.mark.parametrize(("loss_type", "agg"), [("grpo", "seq-mean-token-mean"), ("dapo", "token-mean")])
def test_surrogate_with_the_high_entropy_mask_equals_trls_loss(gen, loss_type, agg):
    """The policy loss kept on the top 20% of tokens by entropy: loss and gradient equal TRL's
    ``_compute_loss`` with ``top_entropy_quantile=0.2``."""
    pytest.importorskip("trl.trainer.grpo_trainer")
    new, old, adv, mask = batch(gen)
    entropies = torch.rand(new.shape, generator=gen) * 3
    stand_in = TRLStandIn(loss_type, "token", new, entropies=entropies, top_entropy_quantile=0.2)
    theirs = trl_loss(stand_in, old, adv, mask)
    (their_grad,) = torch.autograd.grad(theirs, new)
    keep = high_entropy_mask(entropies, mask, 0.2)
    out, _ = surrogate_terms(new, old, adv, mask, 0.2, 0.2, agg=agg, keep=keep)
    (our_grad,) = torch.autograd.grad(out.loss, new)
    torch.testing.assert_close(out.loss, theirs, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(our_grad, their_grad, rtol=RTOL, atol=1e-12)
    # the dropped tokens that no clip removed are reported as detached; none of them has a gradient
    clipped = out.clip_low | out.clip_high
    assert torch.equal(out.detached, mask & ~keep & ~clipped)
    assert (our_grad[mask & ~keep] == 0).all()


def test_token_weight_term_on_no_likely_token_is_zero(gen):
    new, old, adv, mask = batch(gen)
    term, likely, scale = token_weight_term(new, old, adv, mask, 0.999)
    assert likely.sum() == 0 and term.item() == 0.0 and scale.sum() == 0
    assert torch.equal(aggregation_scale(likely), scale)
