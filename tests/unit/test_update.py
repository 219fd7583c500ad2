"""run_update against an independent reference: PPO's min/clamp surrogate written out by hand on a float64
copy of the model, the clip fractions counted by hand, skipped steps, and the reduction of the step
statistics over ranks."""

import copy
from dataclasses import replace

import pytest
import torch

from entroclip.config import parse_config
from entroclip.control import ControlAction
from entroclip.policy.builtin import build_builtin
from entroclip.policy.sampling import sample
from entroclip.update import STEP_STATS, RunSettings, UpdateBatch, UpdateStats, run_update

PROMPTS = ["12+34=", "56+78=", "90+11=", "23+45="]  # one length: no left padding


@pytest.fixture(scope="module")
def rig():
    """A tiny model and an off-policy batch of 4 groups of 4 responses (old log-probs perturbed, so that
    ratios leave 1 and both clip sides act)."""
    model, tokenizer = build_builtin("tiny-0.1m", "0123456789+=", seed=0)
    tokenizer.padding_side = "left"
    prompts = [p for p in PROMPTS for _ in range(4)]
    rollout = sample(model, tokenizer, prompts, max_new_tokens=5, seed=1, return_logp=True)
    gen = torch.Generator().manual_seed(2)
    logp_old = (rollout.sampler_logp + 0.4 * torch.randn(rollout.sampler_logp.shape, generator=gen)) * (
        rollout.response_mask
    )
    advantages = torch.randn(len(prompts), generator=gen)
    return model, UpdateBatch(rollout, advantages, logp_old)


def one_step_settings(**changes) -> RunSettings:
    """One minibatch step over the whole batch, token-mean, no gradient clipping."""
    config = parse_config(
        {"rollout": {"max_new_tokens": 5}, "optim": {"epochs": 1, "minibatches": 1, "grad_clip": None}}
    )
    return replace(RunSettings.from_config(config), **changes)


def sgd_update(model, batch, settings, action):
    """A copy of ``model`` after run_update with SGD of lr 1 (parameters move by exactly -grad)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats, skips = run_update(model, optimizer, scheduler, batch, settings, action, shuffle_seed=0)
    return model, stats, skips


def reference_loss(model, batch, eps_low, eps_high, entropy_coef=0.0):
    """PPO's surrogate as usually written, -min(r A, clamp(r, 1 - eps_low, 1 + eps_high) A), token-mean,
    with a plain forward pass and log_softmax (no entroclip code), minus the entropy bonus."""
    r = batch.rollout
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, r.prompt_len - 1 : -1]
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, r.responses[..., None])[..., 0]
    mask = r.response_mask.to(logp.dtype)
    ratio = torch.exp(logp - batch.logp_old.to(logp.dtype))
    adv = batch.advantages.to(logp.dtype)[:, None]
    low = 1 - eps_low if eps_low is not None else 0.0
    high = 1 + eps_high if eps_high is not None else float("inf")
    per_token = -torch.min(ratio * adv, ratio.clamp(low, high) * adv)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    n = mask.sum()
    return (per_token * mask).sum() / n - entropy_coef * (entropy * mask).sum() / n


@pytest.mark.parametrize(
    ("eps_low", "eps_high", "entropy_coef"),
    [(0.2, 0.2, 0.0), (0.1, None, 0.0), (None, 0.28, 0.0), (0.2, 0.28, 0.05)],
)
def test_one_step_moves_the_parameters_by_the_reference_gradient(rig, eps_low, eps_high, entropy_coef):
    model, batch = rig
    updated, stats, skips = sgd_update(
        model, batch, one_step_settings(), ControlAction(eps_low, eps_high, entropy_coef)
    )
    reference = copy.deepcopy(model).double()
    loss = reference_loss(reference, batch, eps_low, eps_high, entropy_coef)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    assert skips == 0 and stats.optimizer_steps == 1
    # float32 forward and backward against float64: ~1e-6 relative per operation over a few dozen layers'
    # worth of operations; the largest gradient entries are ~1e-1
    for (name, before), after, grad in zip(
        model.named_parameters(), updated.parameters(), grads, strict=True
    ):
        torch.testing.assert_close((before - after).double(), grad, rtol=1e-4, atol=2e-6, msg=name)


def test_clip_fractions_are_the_sign_gated_events_counted_by_hand(rig):
    model, batch = rig
    _, stats, _ = sgd_update(model, batch, one_step_settings(), ControlAction(0.2, 0.2, 0.0))
    metrics = stats.metrics()
    r = batch.rollout
    with torch.no_grad():
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[
            :, r.prompt_len - 1 : -1
        ]
        logp = torch.log_softmax(logits.double(), -1).gather(-1, r.responses[..., None])[..., 0]
    ratio = torch.exp(logp - batch.logp_old.double())
    mask, adv = r.response_mask, batch.advantages[:, None].expand_as(ratio)
    low = int((mask & (adv < 0) & (ratio < 0.8)).sum()) / int(mask.sum())
    high = int((mask & (adv > 0) & (ratio > 1.2)).sum()) / int(mask.sum())
    assert 0 < float(low) < 1 and 0 < float(high) < 1  # the batch exercises both sides
    assert metrics["clip_ratio/low_mean"] == pytest.approx(float(low), abs=1e-12)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(float(high), abs=1e-12)
    assert metrics["ratio/min"] == pytest.approx(float(ratio[mask].min()), rel=1e-5)
    assert metrics["ratio/max"] == pytest.approx(float(ratio[mask].max()), rel=1e-5)


def test_a_non_finite_step_is_skipped_and_changes_nothing(rig):
    model, batch = rig
    poisoned = replace(batch, advantages=torch.full_like(batch.advantages, float("nan")))
    updated, stats, skips = sgd_update(model, poisoned, one_step_settings(), ControlAction(0.2, 0.2, 0.0))
    assert skips == 1 and stats.skipped_steps == 1 and stats.optimizer_steps == 0
    for a, b in zip(model.parameters(), updated.parameters(), strict=True):
        assert torch.equal(a, b)


def test_consecutive_skips_count_on_across_updates_and_reset_on_a_good_step(rig):
    model, batch = rig
    poisoned = replace(batch, advantages=torch.full_like(batch.advantages, float("nan")))
    settings = one_step_settings(epochs=2)
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    action = ControlAction(0.2, 0.2, 0.0)
    _, skips = run_update(model, optimizer, scheduler, poisoned, settings, action, 0, consecutive_skips=3)
    assert skips == 5
    _, skips = run_update(model, optimizer, scheduler, batch, settings, action, 0, consecutive_skips=skips)
    assert skips == 0


class TwoRanks:
    """A stand-in for a two-rank DistContext whose other rank reports ``other`` for every statistic."""

    enabled = True

    def __init__(self, other: float) -> None:
        self.other = other

    def sum(self, values):
        return [v + self.other for v in values]

    def min(self, values):
        return [min(v, self.other) for v in values]

    def max(self, values):
        return [max(v, self.other) for v in values]


def test_statistics_are_reduced_over_ranks_by_their_own_reduction():
    stats = UpdateStats()
    stats.add({key: 2.0 for key in STEP_STATS})
    stats.add({key: 3.0 for key in STEP_STATS})
    reduced = stats.reduced(TwoRanks(10.0))
    for key, reduction in STEP_STATS.items():
        expected = {"sum": 2.0 + 3.0 + 10.0, "min": 2.0, "max": 10.0}[reduction]
        assert reduced.totals[key] == expected, key
    assert {STEP_STATS["ratio_min"], STEP_STATS["ratio_max"]} == {"min", "max"}


@pytest.mark.parametrize("kind", ["gspo", "cispo", "sapo", "ce_gppo"])
def test_each_loss_kind_steps_by_its_own_gradient(rig, kind):
    """With ``loss.kind``, the update's step is the gradient of that kind's loss (entroclip.losses, on a
    plain float64 forward pass), and its events are the update's clip statistics."""
    from entroclip.losses import PolicyLossKind

    model, batch = rig
    settings = one_step_settings(policy_loss=PolicyLossKind(kind))
    action = ControlAction(0.2, 0.2, 0.0)
    updated, stats, _ = sgd_update(model, batch, settings, action)
    reference = copy.deepcopy(model).double()
    r = batch.rollout
    logits = reference(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[
        :, r.prompt_len - 1 : -1
    ]
    logp = torch.log_softmax(logits, -1).gather(-1, r.responses[..., None])[..., 0]
    out = PolicyLossKind(kind)(
        logp, batch.logp_old.double(), batch.advantages, r.response_mask, 0.2, 0.2, None, "token-mean", 5
    )
    grads = torch.autograd.grad(out.loss, list(reference.parameters()))
    for (name, before), after, grad in zip(
        model.named_parameters(), updated.parameters(), grads, strict=True
    ):
        torch.testing.assert_close((before - after).double(), grad, rtol=1e-4, atol=2e-6, msg=name)
    metrics = stats.metrics()
    n = int(r.response_mask.sum())
    assert metrics["clip_ratio/low_mean"] == pytest.approx(int(out.clip_low.sum()) / n, abs=1e-12)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(int(out.clip_high.sum()) / n, abs=1e-12)
    assert "entropy/effect_rescale" in metrics
