"""clipped_surrogate and kl_penalty against plain float64 references written token by token."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entroclip.objectives import AGGREGATIONS, KL_KINDS, aggregate, clipped_surrogate, kl_penalty


def reference_surrogate(logp_new, logp_old, adv, mask, eps_low, eps_high, dual_clip, agg, max_len):
    """Loop over tokens in float64: textbook min/clip formula and the aggregation written out."""
    batch, length = len(mask), len(mask[0])
    lo = -math.inf if eps_low is None else 1.0 - eps_low
    hi = math.inf if eps_high is None else 1.0 + eps_high
    per_token = [[0.0] * length for _ in range(batch)]
    weight = [[0.0] * length for _ in range(batch)]  # d loss / d logp_new
    low = [[False] * length for _ in range(batch)]
    high = [[False] * length for _ in range(batch)]
    dual = [[False] * length for _ in range(batch)]
    seqs = [b for b in range(batch) if any(mask[b])]
    n_tokens = sum(sum(1 for t in range(length) if mask[b][t]) for b in range(batch))
    for b in range(batch):
        n_b = sum(1 for t in range(length) if mask[b][t])
        for t in range(length):
            if not mask[b][t]:
                continue
            a = float(adv[b][t])
            r = math.exp(float(logp_new[b][t]) - float(logp_old[b][t]))
            unclipped = r * a
            clipped = min(max(r, lo), hi) * a
            value = min(unclipped, clipped)
            grad_active = unclipped <= clipped  # the r*A branch is the min
            if a < 0 and r < lo:
                low[b][t], grad_active = True, False
            if a > 0 and r > hi:
                high[b][t], grad_active = True, False
            if dual_clip is not None and a < 0 and r > dual_clip:
                value, dual[b][t], grad_active = dual_clip * a, True, False
            if agg == "token-mean":
                norm = n_tokens
            elif agg == "seq-mean-token-mean":
                norm = len(seqs) * n_b
            elif agg == "seq-mean-token-sum":
                norm = len(seqs)
            else:
                norm = len(seqs) * max_len
            per_token[b][t] = -value / norm
            weight[b][t] = (-a * r / norm) if grad_active else 0.0
    return sum(map(sum, per_token)), weight, low, high, dual


def random_batch(gen, batch, length, scale=0.4, per_seq=False):
    logp_old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 4
    logp_new = logp_old + scale * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    shape = (batch,) if per_seq else (batch, length)
    adv = torch.randn(*shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) < 0.8
    mask[0] = False  # an empty row must be ignored by every mode
    mask[1, 0] = True
    return logp_new, logp_old, adv, mask


BOUNDS = [(0.2, 0.2), (0.2, 0.28), (None, 0.2), (0.2, None), (None, None), (0.05, 0.2), (1.0, 0.3)]


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("shape", [(3, 5), (8, 17), (2, 1)])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("per_seq", [False, True])
def test_matches_reference(gen, agg, bounds, shape, dual_clip, per_seq):
    eps_low, eps_high = bounds
    logp_new, logp_old, adv, mask = random_batch(gen, *shape, scale=0.6, per_seq=per_seq)
    logp_new.requires_grad_(True)
    out = clipped_surrogate(logp_new, logp_old, adv, mask, eps_low, eps_high, dual_clip, agg, max_len=20)
    out.loss.backward()
    adv_tok = adv[:, None].expand_as(mask) if per_seq else adv
    ref_loss, ref_w, low, high, dual = reference_surrogate(
        logp_new.detach().tolist(),
        logp_old.tolist(),
        adv_tok.tolist(),
        mask.tolist(),
        eps_low,
        eps_high,
        dual_clip,
        agg,
        20,
    )
    # float32 ratios: relative error ~1e-7 per token, sums of <= 136 tokens.
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert out.clip_low.tolist() == low
    assert out.clip_high.tolist() == high
    assert out.dual.tolist() == dual
    torch.testing.assert_close(logp_new.grad, torch.tensor(ref_w, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_gradient_exactly_zero_on_clipped_tokens(gen):
    logp_new, logp_old, adv, mask = random_batch(gen, 16, 32, scale=1.0)
    logp_new.requires_grad_(True)
    out = clipped_surrogate(logp_new, logp_old, adv, mask, 0.2, 0.2, dual_clip=2.0)
    out.loss.backward()
    clipped = out.clip_low | out.clip_high | out.dual
    assert clipped.sum() > 10 and out.dual.sum() > 0
    assert (logp_new.grad[clipped] == 0).all()
    assert (logp_new.grad[~mask] == 0).all()
    assert (logp_new.grad[mask & ~clipped & (adv != 0)] != 0).all()


def test_masks_are_sign_gated():
    logp_old = torch.zeros(1, 4)
    logp_new = torch.log(torch.tensor([[0.5, 0.5, 1.5, 1.5]]))
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0]])
    out = clipped_surrogate(logp_new, logp_old, adv, torch.ones(1, 4), 0.2, 0.2)
    assert out.clip_low.tolist() == [[True, False, False, False]]
    assert out.clip_high.tolist() == [[False, False, True, False]]
    assert out.stats["clip_ratio/low_mean"] == 0.25
    assert out.stats["clip_ratio/region_mean"] == 0.5
    assert out.stats["ratio/min"] == pytest.approx(0.5)
    assert out.stats["ratio/max"] == pytest.approx(1.5)


def test_eps_low_one_equals_none(gen):
    logp_new, logp_old, adv, mask = random_batch(gen, 6, 9, scale=3.0)
    a = clipped_surrogate(logp_new, logp_old, adv, mask, eps_low=1.0, eps_high=0.2)
    b = clipped_surrogate(logp_new, logp_old, adv, mask, eps_low=None, eps_high=0.2)
    assert a.loss.item() == b.loss.item()
    assert not a.clip_low.any()
    assert a.stats == b.stats


def test_unclipped_is_importance_weighted_pg(gen):
    logp_new, logp_old, adv, mask = random_batch(gen, 5, 7, scale=2.0)
    out = clipped_surrogate(logp_new, logp_old, adv, mask, None, None)
    ratio = torch.exp(logp_new - logp_old)
    expected = -(adv * ratio)[mask].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_empty_mask_is_zero_not_nan():
    logp = torch.full((2, 3), -math.inf, requires_grad=True)
    out = clipped_surrogate(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.isfinite(logp.grad).all()
    assert out.stats["clip_ratio/low_mean"] == 0.0 and out.stats["ratio/max"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps_low": -0.1}, "eps_low must be in [0, 1]"),
        ({"eps_low": 1.5}, "eps_low must be in [0, 1]"),
        ({"eps_high": -0.01}, "eps_high must be >= 0"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"agg": "mean"}, "agg must be one of"),
        ({"agg": "seq-mean-token-sum-norm"}, "max_len must be a positive int"),
    ],
)
def test_validation(kwargs, message):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        clipped_surrogate(x, x, torch.ones(2), torch.ones(2, 3), **kwargs)


def test_shape_validation():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shapes must agree"):
        clipped_surrogate(x, torch.zeros(2, 4), torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="advantages must have shape"):
        clipped_surrogate(x, x, torch.ones(3), torch.ones(2, 3))


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_estimators_match_formulas(gen, kind):
    logp = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    logp_ref = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    got = kl_penalty(logp, logp_ref, kind)
    positions = torch.cartesian_prod(torch.arange(4), torch.arange(6)).tolist()
    for (b, t), value in zip(positions, got.flatten(), strict=True):
        p, q = math.exp(logp[b, t]), math.exp(logp_ref[b, t])
        expected = {
            "k1": math.log(p / q),
            "k2": 0.5 * math.log(p / q) ** 2,
            "k3": q / p - math.log(q / p) - 1,
        }[kind]
        assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_k3_is_unbiased_for_kl():
    """E_{a~pi}[k3] = KL(pi || pi_ref) exactly, summed over a small vocabulary."""
    pi = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 2.0], dtype=torch.float64), -1)
    ref = torch.softmax(torch.tensor([0.0, 0.5, 0.1, 1.0], dtype=torch.float64), -1)
    k3 = kl_penalty(pi.log()[None], ref.log()[None], "k3")[0]
    k1 = kl_penalty(pi.log()[None], ref.log()[None], "k1")[0]
    exact = (pi * (pi.log() - ref.log())).sum()
    assert (pi * k3).sum().item() == pytest.approx(exact.item(), rel=1e-6)
    assert (pi * k1).sum().item() == pytest.approx(exact.item(), rel=1e-6)


def test_kl_and_entropy_terms_in_loss(gen):
    logp_new, logp_old, adv, mask = random_batch(gen, 4, 5)
    logp_ref = logp_old - 0.1
    entropy = torch.rand(4, 5, generator=gen, dtype=torch.float64)
    base = clipped_surrogate(logp_new, logp_old, adv, mask, agg="seq-mean-token-mean")
    full = clipped_surrogate(
        logp_new,
        logp_old,
        adv,
        mask,
        agg="seq-mean-token-mean",
        entropy=entropy,
        entropy_coef=0.01,
        logp_ref=logp_ref,
        kl_coef=0.05,
        kl_kind="k2",
    )
    kl = aggregate(kl_penalty(logp_new, logp_ref, "k2"), mask, "seq-mean-token-mean")
    ent = aggregate(entropy, mask, "seq-mean-token-mean")
    expected = base.loss + 0.05 * kl - 0.01 * ent
    assert full.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert full.stats["kl/ref"] == pytest.approx(kl.item(), rel=1e-6)


extreme = st.sampled_from([0.0, -1e-8, -0.5, -5.0, -30.0, -100.0, -1e4])
advs = st.sampled_from([0.0, 1.0, -1.0, 1e6, -1e6, 1e-9, -3.5])


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(st.tuples(extreme, extreme, advs, st.booleans()), min_size=6, max_size=6),
    agg=st.sampled_from(AGGREGATIONS),
    eps_low=st.sampled_from([None, 0.0, 0.2, 1.0]),
    eps_high=st.sampled_from([None, 0.0, 0.28, 10.0]),
    dual_clip=st.sampled_from([None, 1.5, 3.0]),
)
def test_extreme_inputs_stay_finite(data, agg, eps_low, eps_high, dual_clip):
    new, old, adv, valid = (torch.tensor(col).reshape(2, 3) for col in zip(*data, strict=True))
    mask = valid.bool()
    # invalid positions may hold -inf log-probs (padding)
    new = torch.where(mask, new.float(), torch.tensor(-math.inf)).requires_grad_(True)
    old = torch.where(mask, old.float(), torch.tensor(-math.inf))
    out = clipped_surrogate(
        new, old, adv.float(), mask, eps_low, eps_high, dual_clip, agg, max_len=3, logp_ref=old, kl_coef=0.1
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(new.grad).all()
    assert not (out.clip_low & out.clip_high).any()
    assert not (out.clip_low & out.dual).any() and not (out.clip_high & out.dual).any()
    for key, value in out.stats.items():
        assert math.isfinite(value), key
        if key.startswith("clip_ratio/"):
            assert 0.0 <= value <= 1.0
