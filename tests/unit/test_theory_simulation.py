"""Theory lab, whole updates: the paper's claims on the realised entropy drift, phase diagram, balance.

Setting (the lab's default, at n = 100 for speed): PG on the logits, lr 1, one pass in 4 minibatches of
one group of 8, Bernoulli(0.5) rewards with GRPO advantages, a Zipf policy at 1 nat. In this setting the
drift of an update without clipping is zero within noise, so the drift is the clipping's doing; at other
learning rates and entropies the second-order drift of the noise itself is not (see the lab's docs).
Tolerances are in standard errors of the seed average; every run is seeded.
"""

import math

import pytest
import torch

from entroclip.theory.phase import balance_eps_low, largest_crossing, phase_diagram, search_runs
from entroclip.theory.policies import initial_logits
from entroclip.theory.simulation import estimate_drift, simulate_trajectory
from entroclip.theory.updates import NO_CLIP, ClipBounds, LabConfig

LOGITS = initial_logits("zipf", 100, 1, 1.0)


def drift(clip, seeds=12_000, **config):
    return estimate_drift(LOGITS, LabConfig(clip=clip, **config), seeds, torch.Generator().manual_seed(7))


def test_no_clipping_no_drift():
    estimate = drift(NO_CLIP)
    assert abs(estimate.first_order.mean) < 3 * estimate.first_order.stderr
    assert abs(estimate.drift.mean) < 3 * estimate.drift.stderr
    assert estimate.closed_form is not None and estimate.closed_form.mean == 0.0
    assert estimate.effect_low.mean == estimate.effect_high.mean == 0.0


def test_clip_high_only_lowers_entropy():
    estimate = drift(ClipBounds(None, 0.2))
    assert estimate.drift.mean < -3 * estimate.drift.stderr
    assert estimate.effect_high.mean < -3 * estimate.effect_high.stderr
    assert estimate.closed_form_high is not None and estimate.closed_form_high < 0


def test_clip_low_only_raises_entropy():
    estimate = drift(ClipBounds(0.2, None))
    assert estimate.drift.mean > 3 * estimate.drift.stderr
    assert estimate.effect_low.mean > 3 * estimate.effect_low.stderr
    assert estimate.closed_form_low is not None and estimate.closed_form_low > 0


def test_symmetric_clipping_lowers_entropy():
    """At eps_low = eps_high = 0.2 clip-high dominates (the paper's claim 2)."""
    estimate = drift(ClipBounds(0.2, 0.2))
    assert estimate.drift.mean < -3 * estimate.drift.stderr
    assert estimate.effect_low.mean > 0 > estimate.effect_high.mean
    assert estimate.effect_low.mean + estimate.effect_high.mean < 0
    # with one pass the closed form has the expectation of the first-order change
    assert estimate.closed_form is not None
    gap = estimate.first_order.mean - estimate.closed_form.mean
    assert abs(gap) < 3 * math.hypot(estimate.first_order.stderr, estimate.closed_form.stderr)
    assert estimate.sign_conditions.low.fraction > 0.9 and estimate.sign_conditions.high.fraction > 0.9


def test_closed_form_is_reported_only_where_it_applies():
    assert drift(ClipBounds(0.2, 0.2), seeds=50, passes=2).closed_form is None
    assert drift(ClipBounds(0.2, 0.2), seeds=50, optimiser="adam", lr=0.05).closed_form is None


def test_drift_rises_with_eps_high_and_falls_with_eps_low():
    """Common random numbers: every cell sees the same batches, so the monotone trend is not noise."""
    diagram = phase_diagram(
        LOGITS, LabConfig(), [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], 4000, torch.Generator().manual_seed(3)
    )
    assert (diagram.drift[:, 1:] > diagram.drift[:, :-1]).all(), diagram.drift
    assert (diagram.drift[1:, :] < diagram.drift[:-1, :]).all(), diagram.drift
    assert diagram.drift[1, 1] < 0  # (0.2, 0.2)
    assert diagram.clip_effect.shape == (3, 3)


def test_balance_point_holds_entropy():
    # two passes: at lr 1 with one pass the drift peaks near 0 (it falls again below eps_low ~ 0.1, where
    # clip-low stops the first steps' updates), so the sign change would rest on noise
    balance = balance_eps_low(
        LOGITS, LabConfig(passes=2), 0.2, 16_000, torch.Generator().manual_seed(11), tolerance=2e-3
    )
    assert 0.0 < balance.eps_low < 0.2  # more clip-low than the standard 0.2 is needed
    drifts = dict(balance.evaluations)
    assert drifts[0.2] < 0 < drifts[0.1]
    # the check runs on fresh batches; the root also carries the search's error, of the same size
    assert abs(balance.check.mean) < 3 * math.sqrt(2) * balance.check.stderr
    # power: the standard setting's drift is far from zero on the same scale
    assert drifts[0.2] < -3 * math.sqrt(2) * balance.check.stderr


def test_balance_standard_error_matches_the_spread_of_independent_searches():
    """Eight searches on independent batches: the spread of their roots against the standard error each
    reports (delta method). With 8 roots the sample standard deviation is within [0.5, 2] of the true one
    unless a 1-in-100 event happens; a standard error off by a factor of sqrt(2) or more shows."""
    config = LabConfig(passes=2)
    searches = [
        balance_eps_low(LOGITS, config, 0.2, 2_000, torch.Generator().manual_seed(100 + i), tolerance=1e-3)
        for i in range(8)
    ]
    roots = torch.tensor([b.eps_low for b in searches])
    reported = math.sqrt(sum(b.eps_low_stderr**2 for b in searches) / len(searches))
    assert 0.5 < roots.std().item() / reported < 2.0, (roots.tolist(), reported)
    assert all(dict(b.evaluations)[b.eps_low] == pytest.approx(0.0, abs=1e-3) for b in searches)


@pytest.mark.parametrize(
    ("drift", "root", "slope"),
    [
        (lambda x: 0.3 - x, 0.3, -1.0),
        # positive only on (0.134, 0.166), between two scan points: the peak search finds it
        (lambda x: 0.01 - 40 * (x - 0.15) ** 2, 0.15 + math.sqrt(0.01 / 40), None),
    ],
    ids=["monotone", "hidden-peak"],
)
def test_largest_crossing_of_known_functions(drift, root, slope):
    calls = []

    def counted(x):
        calls.append(x)
        return drift(x)

    crossing = largest_crossing(counted, tolerance=1e-4)
    assert crossing.root == pytest.approx(root, abs=1e-4)
    assert crossing.slope < 0 and (slope is None or crossing.slope == pytest.approx(slope))
    assert len(calls) <= search_runs(11, 1e-4)


def test_largest_crossing_reports_the_highest_value_when_there_is_none():
    with pytest.raises(ValueError, match=r"does not change sign .* highest -0\.2 at eps_low=0\.2"):
        largest_crossing(lambda x: -0.2 - 10 * (x - 0.2) ** 2)


def test_balance_reports_a_missing_sign_change():
    with pytest.raises(ValueError, match=r"does not change sign.*highest -[0-9.e-]+ at eps_low=0\.5\b"):
        balance_eps_low(LOGITS, LabConfig(), 0.2, 200, torch.Generator().manual_seed(0), bracket=(0.5, 1.0))


def test_trajectory_statistics_and_determinism():
    config = LabConfig(clip=ClipBounds(0.2, 0.2))

    def run():
        return simulate_trajectory(
            LOGITS, config, 6, 300, torch.Generator().manual_seed(5), track_theory=True
        )

    result = run()
    assert result.entropy_mean.shape == (7,) and result.entropy_ci.shape == result.entropy_band.shape == (
        7,
        2,
    )
    assert result.clip_fractions.shape == (6, 3) and result.final_entropy.shape == (300,)
    assert result.entropy_mean[0].item() == pytest.approx(1.0, abs=1e-5)
    assert (result.entropy_ci[:, 0] <= result.entropy_mean).all() and (
        result.entropy_mean <= result.entropy_ci[:, 1]
    ).all()
    assert (result.entropy_band[1:, 0] < result.entropy_ci[1:, 0]).all()
    torch.testing.assert_close(result.entropy_mean[-1], result.final_entropy.mean())
    assert result.first_order is not None and result.closed_form is not None
    signs = result.sign_conditions
    assert signs is not None and signs.low.total > 0 and signs.high.total > 0
    assert 0.5 < signs.low.fraction <= 1 and 0.5 < signs.high.fraction <= 1
    again = run()
    assert torch.equal(result.entropy_mean, again.entropy_mean)
    assert torch.equal(result.final_entropy, again.final_entropy)
    subset = simulate_trajectory(
        LOGITS, config, 6, 300, torch.Generator().manual_seed(5), track_theory=True, theory_seeds=30
    )
    assert torch.equal(subset.entropy_mean, result.entropy_mean)  # tracking does not touch the dynamics
    assert subset.sign_conditions is not None and 0 < subset.sign_conditions.high.total < signs.high.total


def test_adam_trajectory_keeps_its_optimiser_state():
    result = simulate_trajectory(
        LOGITS, LabConfig(optimiser="adam", lr=0.05), 3, 50, torch.Generator().manual_seed(1)
    )
    assert torch.isfinite(result.entropy_mean).all() and result.closed_form is None
    assert result.entropy_mean[-1] != result.entropy_mean[0]


def test_divergence_is_reported():
    """float32 logits overflow when a natural-gradient step of 1e36 / pi_a lands on them."""
    logits = LOGITS.float()
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        simulate_trajectory(
            logits, LabConfig(optimiser="npg", lr=1e36), 3, 20, torch.Generator().manual_seed(0)
        )


def test_the_lab_runs_each_loss_kind_with_its_own_weights():
    """--loss: each sample is one action, so GSPO's sequence ratio is the token ratio and GSPO weights the
    samples as PPO does with the same bounds; CISPO without bounds is the unclipped policy gradient; SAPO's
    weight is A f'(r) r with its gate f."""
    import math

    import torch

    from entroclip.losses import SAPO_HALF_SLOPE, PolicyLossKind
    from entroclip.theory.updates import ClipBounds, surrogate_weights

    gen = torch.Generator().manual_seed(0)
    logp_old = torch.log(torch.rand(3, 40, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    logp_new = logp_old + 0.3 * torch.randn(3, 40, generator=gen, dtype=torch.float64)
    adv = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    bounds = ClipBounds(0.2, 0.28)
    ppo, ppo_fractions = surrogate_weights(logp_new, logp_old, adv, bounds)
    gspo, gspo_fractions = surrogate_weights(logp_new, logp_old, adv, bounds, loss=PolicyLossKind("gspo"))
    torch.testing.assert_close(gspo, ppo, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gspo_fractions, ppo_fractions)
    assert float(ppo_fractions[0]) > 0 and float(ppo_fractions[1]) > 0  # both sides clip somewhere
    unclipped, _ = surrogate_weights(logp_new, logp_old, adv, ClipBounds(None, None))
    cispo, _ = surrogate_weights(
        logp_new, logp_old, adv, ClipBounds(None, None), loss=PolicyLossKind("cispo")
    )
    torch.testing.assert_close(cispo, unclipped, rtol=1e-6, atol=1e-9)
    sapo, _ = surrogate_weights(logp_new, logp_old, adv, bounds, loss=PolicyLossKind("sapo"))
    r = torch.exp(logp_new.float() - logp_old.float()).double()  # the ratio in float32, as the losses take it
    tau = torch.where(adv > 0, 1.0, 1.05)
    sigma = torch.sigmoid(tau * (r - 1.0))
    # weights are per seed's mean over its 40 samples, as PPO's are
    expected = adv * 4.0 * sigma * (1.0 - sigma) * r / 40
    torch.testing.assert_close(sapo, expected, rtol=1e-5, atol=1e-7)
    assert pytest.approx(math.log(3 + 2 * math.sqrt(2))) == SAPO_HALF_SLOPE
