"""Theory lab, exact parts: softmax state, initial policies, advantages, sampler, Theorems 1 and 2.

Monte-Carlo tolerances are 3 standard errors (a false alarm about once in 370 independent checks; every
check is seeded, so a pass is reproducible) and each such test also asserts that the effect it compares
is many standard errors away from zero, so that a wrong formula cannot pass by being lost in the noise.
"""

import functools
import math

import pytest
import torch

from entroclip import compiling
from entroclip.advantages import group_advantages
from entroclip.compiling import COMPILE_FROM, CompiledForLargeInputs
from entroclip.entropy import entropy_sensitivity, token_entropy
from entroclip.theory import softmax, updates
from entroclip.theory.policies import initial_logits, temper_to_entropy
from entroclip.theory.rewards import RandomReward
from entroclip.theory.simulation import check_step
from entroclip.theory.softmax import SoftmaxState
from entroclip.theory.theorems import (
    PathTheory,
    closed_form_step,
    entropy_directional_derivative,
)
from entroclip.theory.updates import (
    DEFAULT_LR,
    NO_CLIP,
    ClipBounds,
    LabConfig,
    ascend,
    make_optimiser,
    sample_batch,
    surrogate_weights,
)

# ---------------------------------------------------------------------------------------------------------
# Softmax state


def test_entropy_and_its_gradient_agree_with_the_core(gen):
    logits = 2 * torch.randn(3, 4, 50, generator=gen, dtype=torch.float64)
    state = SoftmaxState.from_logits(logits)
    torch.testing.assert_close(state.entropy(), token_entropy(logits).double(), rtol=0, atol=2e-6)
    tokens = torch.randint(50, (3, 4), generator=gen)
    _, kappa = entropy_sensitivity(logits, tokens)
    # kappa(a) = <dH/dz, e_a - pi> = E_pi[Q] - Q(a), with Q = -dH/dz
    q = -state.entropy_gradient()
    expected = (state.probs * q).sum(-1) - q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(kappa.double(), expected, rtol=0, atol=2e-6)
    # the gradient is the derivative: a finite difference along a random direction
    direction = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    h = 1e-6
    plus = SoftmaxState.from_logits(logits + h * direction).entropy()
    minus = SoftmaxState.from_logits(logits - h * direction).entropy()
    torch.testing.assert_close((plus - minus) / (2 * h), (state.entropy_gradient() * direction).sum(-1))


def test_refresh_and_sparse_updates_keep_the_state_exact(gen):
    logits = torch.randn(5, 3, 40, generator=gen, dtype=torch.float64)
    state = SoftmaxState.from_logits(logits)
    state.logits.add_(0.7 * torch.randn(logits.shape, generator=gen, dtype=torch.float64))
    state.refresh()
    reference = SoftmaxState.from_logits(state.logits)
    torch.testing.assert_close(state.log_norm, reference.log_norm, rtol=0, atol=1e-13)
    torch.testing.assert_close(state.probs, reference.probs, rtol=0, atol=1e-13)
    # sparse: repeated entries add up, the normaliser follows without a dense pass
    contexts = torch.tensor([[0, 0, 2, 1]]).expand(5, -1)
    flat = contexts * 40 + torch.tensor([[7, 7, 3, 39]])
    deltas = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 3
    expected = state.logits.clone()
    for i in range(4):
        expected.view(5, -1)[torch.arange(5), flat[:, i]] += deltas[:, i]
    state.add_at(flat, contexts, deltas)
    reference = SoftmaxState.from_logits(expected)
    torch.testing.assert_close(state.logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(state.log_norm, reference.log_norm, rtol=0, atol=1e-13)
    assert state.norm_error.all()  # the sparse sums' rounding bound, until the entropy's pass resums
    torch.testing.assert_close(state.entropy(), reference.entropy(), rtol=0, atol=1e-12)
    assert not state.norm_error.any()
    torch.testing.assert_close(state.log_norm, reference.log_norm, rtol=0, atol=1e-15)
    # the sparse path sums densely, the reference takes the dense pass's sums: both against the definition
    exact = -(expected.softmax(-1) * expected.log_softmax(-1)).sum(-1)
    for entropy in (state.entropy(), reference.entropy()):
        torch.testing.assert_close(entropy, exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("jump", [1e3, -1e3, 1e5])
def test_sparse_updates_survive_steps_that_overflow_exp(gen, jump):
    """A natural-gradient step on a rare action can move its logit by thousands of nats."""
    logits = torch.randn(2, 1, 30, generator=gen, dtype=torch.float64)
    state = SoftmaxState.from_logits(logits)
    flat = torch.tensor([[4, 9], [4, 4]])
    deltas = torch.tensor([[jump, 0.5], [jump / 2, jump / 2]], dtype=torch.float64)
    state.add_at(flat, torch.zeros_like(flat), deltas)
    reference = SoftmaxState.from_logits(state.logits)
    assert torch.isfinite(state.log_norm).all()
    torch.testing.assert_close(state.log_norm, reference.log_norm, rtol=1e-15, atol=1e-12)
    torch.testing.assert_close(state.probs, reference.probs, rtol=0, atol=1e-12)


def test_sparse_update_that_removes_almost_all_the_mass(gen):
    """Pushing down an action that held all but e^-40 of the mass: 1 - sum pi_u is pure rounding, so the
    row's normaliser has to be summed densely."""
    logits = torch.randn(3, 2, 30, generator=gen, dtype=torch.float64)
    logits[:, :, 0] = 40.0
    state = SoftmaxState.from_logits(logits)
    flat = torch.tensor([[0], [30], [5]])  # seed 0, context 0; seed 1, context 1; seed 2: a rare action
    state.add_at(flat, flat // 30, torch.full((3, 1), -60.0, dtype=torch.float64))
    reference = SoftmaxState.from_logits(state.logits)
    torch.testing.assert_close(state.log_norm, reference.log_norm, rtol=0, atol=1e-12)


def test_dense_step_along_pi_is_one_exact_pass(gen):
    """logits += c * pi and the refresh, in one pass; rows past REBASE are shifted back on the way."""
    logits = torch.randn(6, 2, 50, generator=gen, dtype=torch.float64)
    logits[0, 1] += 45.0  # log normaliser past REBASE
    state = SoftmaxState.from_logits(logits)
    coefficient = 3 * torch.randn(6, 2, generator=gen, dtype=torch.float64)
    expected = SoftmaxState.from_logits(state.logits + coefficient.unsqueeze(-1) * state.probs)
    state.step_along_probs(coefficient)
    assert state.log_norm.abs().max() <= softmax.REBASE
    torch.testing.assert_close(state.probs, expected.probs, rtol=0, atol=1e-13)
    torch.testing.assert_close(state.weights, state.logits.exp(), rtol=1e-15, atol=0)
    torch.testing.assert_close(state.entropy(), expected.entropy(), rtol=0, atol=1e-12)
    moved = logits + coefficient.unsqueeze(-1) * logits.softmax(-1)
    exact = -(moved.softmax(-1) * moved.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(state.entropy(), exact, rtol=0, atol=1e-12)


def test_sparse_updates_keep_the_normaliser_exact_over_many_steps(gen):
    """Runs of large steps on a few actions, with repeats, that move most of the mass back and forth: the
    normaliser's error bound, carried from step to step, sends rows to a dense sum before their
    accumulated rounding error shows; reading the weights sums every row densely again."""
    state = SoftmaxState.from_logits(2 * torch.randn(50, 2, 12, generator=gen, dtype=torch.float64))
    for _ in range(15):
        for scale in (0.3, 3.0, 50.0, 1000.0):
            contexts = torch.randint(2, (50, 8), generator=gen)
            flat = contexts * 12 + torch.randint(3, (50, 8), generator=gen)
            state.add_at(flat, contexts, scale * torch.randn(50, 8, generator=gen, dtype=torch.float64))
            reference = SoftmaxState.from_logits(state.logits)
            torch.testing.assert_close(state.log_norm, reference.log_norm, rtol=0, atol=2e-8)
        torch.testing.assert_close(state.weights, state.logits.exp(), rtol=1e-15, atol=0)
        torch.testing.assert_close(state.log_norm, reference.log_norm, rtol=0, atol=1e-13)
        assert not state.norm_error.any()


def test_compiled_and_eager_dense_passes_agree(gen, monkeypatch):
    logits = torch.randn(7, 3, 40, generator=gen, dtype=torch.float64)
    factor = torch.randn(7, 3, 1, generator=gen, dtype=torch.float64)
    shift = torch.randn(7, 3, 1, generator=gen, dtype=torch.float64)
    compiled = CompiledForLargeInputs(softmax._step_and_exponentiate, "the theory lab")
    outputs = []
    for run in (functools.partial(compiled, COMPILE_FROM), softmax._step_and_exponentiate):
        state = (logits.clone(), logits.exp())
        outputs.append((run(*state, factor, shift), *state))
    assert compiled.compiled is not None
    for got, expected in zip(*outputs, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("policy_size", [0, COMPILE_FROM], ids=["eager", "compiled"])
@pytest.mark.parametrize(
    "clip", [ClipBounds(0.2, 0.2), ClipBounds(0.1, None, 3.0), NO_CLIP], ids=["both", "low+dual", "none"]
)
def test_surrogate_weights_match_the_closed_form(gen, policy_size, clip):
    """w = A r / B where the sample is not clipped and 0 where it is, per seed (rows), and the fractions
    of clipped samples, from the masks written out here."""
    logp_old = torch.randn(64, 8, generator=gen, dtype=torch.float64) - 3
    logp_new = logp_old + 0.3 * torch.randn(64, 8, generator=gen, dtype=torch.float64)
    advantages = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    weights, fractions = surrogate_weights(logp_new, logp_old, advantages, clip, policy_size)
    ratio = (logp_new - logp_old).exp()
    low = (advantages < 0) & (ratio < 1 - clip.eps_low) if clip.eps_low is not None else ratio < 0
    high = (advantages > 0) & (ratio > 1 + clip.eps_high) if clip.eps_high is not None else ratio < 0
    dual = (advantages < 0) & (ratio > clip.dual_clip) if clip.dual_clip is not None else ratio < 0
    expected = torch.where(low | high | dual, 0.0, advantages * ratio / 8)
    # the core computes the surrogate in float32: relative rounding of about 1e-7 per operation
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    expected_fractions = torch.stack([mask.double().mean() for mask in (low, high, dual)])
    torch.testing.assert_close(fractions.double(), expected_fractions, rtol=0, atol=1e-7)
    assert clip == NO_CLIP or expected_fractions.sum() > 0


def test_dense_passes_run_eagerly_where_torch_compile_fails(gen, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    dense_pass = CompiledForLargeInputs(softmax._shift_and_exponentiate, "the theory lab")
    logits = torch.randn(3, 1, 20, generator=gen, dtype=torch.float64)
    weights = torch.empty_like(logits)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        total = dense_pass(COMPILE_FROM, logits, weights, torch.zeros(3, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(total, logits.exp().sum(-1, keepdim=True))
    assert not dense_pass.compiles


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_adam_steps_are_torch_adam_on_the_logits(gen, monkeypatch, compiled):
    """The lab's fused Adam pass against torch.optim.Adam on a leaf tensor of logits, whose gradient is
    autograd's of -sum_i w_i log pi(a_i): repeated actions, two contexts, a row past REBASE."""
    if compiled:
        monkeypatch.setattr(compiling, "COMPILE_FROM", 1)
    seeds, contexts_n, n = 4, 2, 30
    logits = torch.randn(seeds, contexts_n, n, generator=gen, dtype=torch.float64)
    logits[1, 0] += 40.0
    state = SoftmaxState.from_logits(logits)
    config = LabConfig(optimiser="adam", lr=0.05)
    adam = make_optimiser(state, config)
    reference = logits.clone().requires_grad_(True)
    torch_adam = torch.optim.Adam([reference], lr=config.lr, foreach=False)
    for _ in range(5):
        contexts = torch.randint(contexts_n, (seeds, 6), generator=gen)
        flat = contexts * n + torch.randint(4, (seeds, 6), generator=gen)
        weights = torch.randn(seeds, 6, generator=gen, dtype=torch.float64)
        ascend(state, contexts, flat, weights, config, adam)
        torch_adam.zero_grad()
        picked = reference.log_softmax(-1).view(seeds, -1).gather(1, flat)
        (-(weights * picked).sum()).backward()
        torch_adam.step()
        torch.testing.assert_close(state.log_probs(), reference.detach().log_softmax(-1), rtol=0, atol=1e-12)
        torch.testing.assert_close(state.weights, state.logits.exp(), rtol=1e-15, atol=0)
    assert state.log_norm.abs().max() <= softmax.REBASE
    assert (adam.sparse_gradient == 0).all()
    assert not compiled or updates._adam_pass.compiled is not None


@pytest.mark.parametrize("optimiser", ["pg", "adam"])
def test_a_step_at_the_sampling_policy_moves_only_the_sampled_logits(gen, optimiser):
    """At the policy that drew the samples every ratio is 1 and the weights A_i / B sum to zero in each
    group, so the gradient has no part along pi: the logits of actions nobody sampled stay bitwise the
    same (summing the float32 weights instead would move every logit by their rounding, ~1e-8 pi, which
    Adam's first step turned into steps of up to lr / 5 on likely actions). Later steps, at a moved
    policy, move every logit."""
    config = LabConfig(optimiser=optimiser, lr=DEFAULT_LR[optimiser], minibatches=2, prompts=4)
    logits = initial_logits("zipf", 50, 3, 1.5, dtype=torch.float64)
    state = SoftmaxState.from_logits(logits.expand(200, -1, -1))
    batch = sample_batch(state, config, gen)
    adam = make_optimiser(state, config)
    before = state.logits.clone()
    first, second = list(batch.minibatches(config.minibatches))
    for minibatch, moved_alone in ((first, True), (second, False)):
        untouched = torch.ones(200, 3 * 50, dtype=torch.bool).scatter_(1, minibatch.flat_actions, False)
        logp_new = state.log_probs_at(minibatch.flat_actions, minibatch.contexts)
        weights, _ = surrogate_weights(logp_new, minibatch.logp_old, minibatch.advantages, config.clip)
        unmoved = torch.equal(logp_new, minibatch.logp_old)
        assert unmoved == moved_alone
        ascend(state, minibatch.contexts, minibatch.flat_actions, weights, config, adam, unmoved=unmoved)
        changed = state.logits.view(200, -1) != before.view(200, -1)
        assert changed[untouched].any() != moved_alone
        before = state.logits.clone()
    reference = SoftmaxState.from_logits(state.logits)
    torch.testing.assert_close(state.log_norm, reference.log_norm, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------
# Initial policies and advantages


@pytest.mark.parametrize("kind", ["zipf", "dirichlet"])
@pytest.mark.parametrize("entropy", [0.3, 1.0, 3.5])
def test_initial_policy_has_the_requested_entropy(gen, kind, entropy):
    logits = initial_logits(kind, 200, contexts=3, entropy=entropy, generator=gen)
    assert logits.shape == (3, 200) and logits.dtype == torch.float64
    measured = SoftmaxState.from_logits(logits[None]).entropy()
    torch.testing.assert_close(measured, torch.full_like(measured, entropy), rtol=0, atol=1e-5)


def test_initial_policy_rejects_impossible_entropies():
    assert torch.equal(initial_logits("uniform", 10), torch.zeros(1, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="entropy must be in"):
        initial_logits("zipf", 10, entropy=math.log(10))
    with pytest.raises(ValueError, match="uniform"):
        initial_logits("uniform", 10, entropy=1.0)
    with pytest.raises(ValueError, match="constant logits"):
        temper_to_entropy(torch.zeros(2, 5, dtype=torch.float64), 1.0)


@pytest.mark.parametrize(
    "reward",
    [
        RandomReward("bernoulli", 0.5, "grpo"),
        RandomReward("bernoulli", 0.2, "grpo"),
        RandomReward("bernoulli", 0.3, "drgrpo"),
        RandomReward("gaussian", 0.5, "grpo"),
        RandomReward("gaussian", 0.5, "drgrpo"),
        RandomReward("gaussian", 0.5, "rloo"),
    ],
)
def test_positive_part_of_the_advantage_matches_monte_carlo(gen, reward):
    advantages = reward.sample_advantages((20_000, 8), 8, gen, torch.float64).reshape(-1)
    positive = advantages.clamp_min(0)
    stderr = positive.std().item() / math.sqrt(positive.numel())
    # advantages of a group are dependent, so this standard error is approximate: 4 of them
    assert abs(positive.mean().item() - reward.positive_part_mean(8)) < 4 * stderr
    assert abs(advantages.mean().item()) < 4 * advantages.std().item() / math.sqrt(advantages.numel())


@pytest.mark.parametrize("advantage", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bernoulli_advantages_are_the_cores_estimator(advantage, dtype):
    """Looked up by the number of successes in a group, they equal the core's on the same rewards."""
    reward = RandomReward("bernoulli", 0.3, advantage)
    advantages = reward.sample_advantages((500, 4), 8, torch.Generator().manual_seed(5), dtype)
    draws = torch.rand((500, 4, 8), generator=torch.Generator().manual_seed(5), dtype=dtype)
    rewards = (draws < 0.3).to(dtype).reshape(-1)
    expected = group_advantages(rewards, 8, advantage).view(500, 4, 8).to(dtype)
    assert torch.equal(advantages, expected)


def test_sampler_draws_each_context_from_its_own_policy(gen):
    logits = torch.stack([torch.linspace(0, 3, 6), torch.linspace(2, -2, 6)]).double()
    policy = SoftmaxState.from_logits(logits.expand(4000, 2, 6))
    config = LabConfig(prompts=6, group_size=5, minibatches=1)
    batch = sample_batch(policy, config, gen)
    contexts = batch.flat_actions // 6
    assert torch.equal(contexts, batch.contexts.unsqueeze(-1).expand_as(contexts))
    for context in range(2):
        actions = batch.flat_actions[contexts == context] % 6
        frequency = torch.bincount(actions, minlength=6).double() / actions.numel()
        p = policy.probs[0, context]
        z = (frequency - p) / (p * (1 - p) / actions.numel()).sqrt()
        assert z.abs().max() < 4.0, z
    expected_logp = policy.log_probs().view(4000, -1).gather(1, batch.flat_actions.view(4000, -1))
    torch.testing.assert_close(batch.logp_old.view(4000, -1), expected_logp)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampler_draws_the_exact_probabilities_and_never_a_weight_of_zero(gen, dtype):
    # exp(-800) is 0 in both dtypes: actions 1 and 4 (the last) have no mass and must never be drawn
    logits = torch.tensor([[0.0, -800.0, 1.5, -3.0, -800.0], [-2.0, 0.0, 0.0, 2.0, -1.0]], dtype=dtype)
    policy = SoftmaxState.from_logits(logits.expand(3000, 2, 5))
    draws = policy.sample(40, gen)
    assert draws.shape == (3000, 2, 40) and draws.dtype == torch.int64
    for context in range(2):
        counts = torch.bincount(draws[:, context].reshape(-1), minlength=5).double()
        p = logits[context].double().softmax(-1)
        assert torch.equal(counts == 0, p == 0)
        # Pearson's chi-square over the actions of positive mass: 4 - 1 or 5 - 1 degrees of freedom,
        # the 1e-4 upper quantile is below 25
        expected = p * counts.sum()
        chi_square = ((counts - expected) ** 2 / expected)[p > 0].sum()
        assert chi_square < 25.0, chi_square


def test_compiled_inverse_cdf_is_searchsorted(gen):
    """The binary search finds what torch.searchsorted finds: zero weights (equal running sums), n a power
    of two or not, uniforms of 0 and next to 1. Ten sizes in four ranges between powers of two take four
    graphs: more than torch.compile's 8 recompiles would end in the eager fallback."""
    torch._dynamo.reset()
    compiled = CompiledForLargeInputs(softmax._inverse_cdf, "the theory lab", softmax._searchsorted)
    for n in [1, 2, 3, 5, 7, 257, 300, 301, 400, 511]:
        weights = torch.rand(40, n, generator=gen, dtype=torch.float64)
        weights[weights < 0.3] = 0.0
        weights[:, 0] += 1e-3  # every row has mass
        cumulative = weights.cumsum(-1)
        uniforms = torch.rand(40, 9, generator=gen, dtype=torch.float64)
        uniforms[:, 0], uniforms[:, 1] = 0.0, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
        found = compiled(COMPILE_FROM, cumulative, uniforms)
        assert compiled.compiles, n
        assert torch.equal(found, softmax._searchsorted(cumulative, uniforms)), n
        assert torch.equal(softmax._inverse_cdf(cumulative, uniforms), found), n
        assert (weights.gather(1, found) > 0).all(), n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampler_in_chunks_draws_what_one_search_over_all_rows_draws(gen, monkeypatch, dtype):
    """Chunks of 3 rows (the last one shorter), compiled, against one searchsorted over every row on the
    same uniforms."""
    monkeypatch.setattr(compiling, "COMPILE_FROM", 1)
    monkeypatch.setattr(softmax, "SAMPLE_CHUNK", 3 * 50)
    logits = torch.randn(4, 5, 50, generator=gen, dtype=dtype)
    policy = SoftmaxState.from_logits(logits)
    seed = int(torch.randint(1 << 30, (1,), generator=gen))
    draws = policy.sample(6, torch.Generator().manual_seed(seed))
    uniforms = torch.rand(20, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = softmax._searchsorted(policy.weights.view(20, 50).double().cumsum(-1), uniforms)
    assert torch.equal(draws, expected.view(4, 5, 6))


# ---------------------------------------------------------------------------------------------------------
# Theorems 1 and 2


def perturbed_pair(n, contexts, scale, gen, entropy=1.0):
    """A start policy and an iterate that has moved: clip events of both kinds are present."""
    old = initial_logits("zipf", n, contexts, entropy)
    return old, old + scale * torch.randn(old.shape, generator=gen, dtype=old.dtype)


@pytest.mark.parametrize("optimiser", ["pg", "npg"])
@pytest.mark.parametrize(("n", "contexts", "dual_clip"), [(5, 2, None), (300, 3, None), (300, 1, 1.5)])
def test_closed_form_is_the_derivative_of_the_entropy(gen, optimiser, n, contexts, dual_clip):
    old, current = perturbed_pair(n, contexts, 0.5, gen)
    config = LabConfig(clip=ClipBounds(0.2, 0.2, dual_clip), optimiser=optimiser)
    old_state, state = SoftmaxState.from_logits(old[None]), SoftmaxState.from_logits(current[None])
    form = closed_form_step(
        old_state,
        state,
        config.clip,
        geometry=optimiser,
        lr=1.0,
        positive_part=config.reward.positive_part_mean(8),
    )
    assert (form.p_low > 0).any() and (form.p_high > 0).any()
    if dual_clip is not None:
        assert (form.p_dual > 0).any()
    derivative = entropy_directional_derivative(old_state, state, config)
    # the expected gradient goes through the core's float32 surrogate: relative error ~1e-7 per term;
    # the central difference adds O(step^2) ~ 1e-8
    torch.testing.assert_close(derivative, form.total.mean(-1), rtol=1e-5, atol=1e-9)


MC_SETTINGS = [
    # optimiser, n, contexts, lr, perturbation, replicates
    ("pg", 5, 1, 0.5, 1.0, 20_000),
    ("pg", 1000, 2, 1.0, 0.4, 2_000),
    ("npg", 5, 2, 0.02, 0.5, 20_000),
    ("npg", 200, 1, 0.002, 0.3, 6_000),
]


@pytest.mark.parametrize(("optimiser", "n", "contexts", "lr", "scale", "replicates"), MC_SETTINGS)
def test_closed_form_matches_monte_carlo(gen, optimiser, n, contexts, lr, scale, replicates):
    old, current = perturbed_pair(n, contexts, scale, gen)
    config = LabConfig(optimiser=optimiser, lr=lr, clip=ClipBounds(0.2, 0.2))
    check = check_step(old, current, config, replicates, gen)
    for predicted, estimate in (
        (check.closed_form_low, check.effect_low),
        (check.closed_form_high, check.effect_high),
        (check.closed_form, check.first_order),
    ):
        assert abs(estimate.mean - predicted) < 3 * estimate.stderr, (predicted, estimate)
    # the paired effects resolve each clip: a wrong sign or scale would be far outside the tolerance
    assert abs(check.closed_form_low) > 8 * check.effect_low.stderr
    assert abs(check.closed_form_high) > 8 * check.effect_high.stderr


def test_no_clipping_means_no_first_order_drift(gen):
    old, current = perturbed_pair(50, 1, 0.5, gen)
    unclipped = check_step(old, current, LabConfig(clip=NO_CLIP), 20_000, gen)
    assert unclipped.closed_form == 0.0
    assert abs(unclipped.first_order.mean) < 3 * unclipped.first_order.stderr
    # the same samples with clip-high on move entropy by many standard errors: the test has power
    clipped = check_step(old, current, LabConfig(clip=ClipBounds(None, 0.2)), 20_000, gen)
    assert abs(clipped.first_order.mean) > 5 * unclipped.first_order.stderr


@pytest.mark.parametrize("optimiser", ["pg", "npg"])
def test_each_clip_has_the_sign_of_the_paper_where_ineq_7_holds(gen, optimiser):
    old, current = perturbed_pair(500, 4, 0.4, gen)
    states = SoftmaxState.from_logits(old[None]), SoftmaxState.from_logits(current[None])

    def form(clip):
        return closed_form_step(*states, clip, geometry=optimiser, lr=1.0, positive_part=0.4)

    both = form(ClipBounds(0.2, 0.2))
    assert (both.gap_low > 0).all() and (both.gap_high > 0).all()  # Ineq. 7 holds at this iterate
    assert (form(ClipBounds(None, 0.2)).total < 0).all()
    assert (form(ClipBounds(0.2, None)).total > 0).all()
    assert (form(NO_CLIP).total == 0).all()


def test_counterexample_where_clip_high_raises_entropy(gen):
    """From the uniform policy, the action pushed above 1 + eps_high is the most likely one: there
    Q(a) > E[Q], Ineq. 7 fails on the clip-high side and clip-high raises the entropy."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    current = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()
    config = LabConfig(clip=ClipBounds(None, 0.2), lr=0.5)
    form = closed_form_step(
        SoftmaxState.from_logits(old[None]),
        SoftmaxState.from_logits(current[None]),
        config.clip,
        geometry="pg",
        lr=0.5,
        positive_part=config.reward.positive_part_mean(8),
    )
    assert form.p_high.item() == pytest.approx(0.5) and form.gap_high.item() < 0
    assert form.effect_high.item() > 0
    check = check_step(old, current, config, 20_000, gen)
    assert check.effect_high.mean > 5 * check.effect_high.stderr
    assert abs(check.effect_high.mean - check.closed_form_high) < 3 * check.effect_high.stderr


def test_path_theory_finds_the_counterexample():
    old = torch.zeros(1, 3, dtype=torch.float64)
    current = SoftmaxState.from_logits(torch.tensor([[[0.5, 0.25, 0.25]]], dtype=torch.float64).log())
    theory = PathTheory(SoftmaxState.from_logits(old[None]), LabConfig(clip=ClipBounds(0.2, 0.2)))
    theory.before_step(current)
    assert theory.signs.high.total == 1 and theory.signs.high.holds == 0
    assert theory.counterexample is not None and theory.counterexample.side == "high"
    torch.testing.assert_close(theory.counterexample.log_probs, current.log_probs()[0, 0])
