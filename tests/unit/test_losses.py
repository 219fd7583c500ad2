"""entroclip.losses against its peers' code, and its entropy ledger against autograd and a finite difference.

Peers, at the versions pinned in pyproject.toml:

- verl 0.9.1, ``verl.trainer.ppo.core_algos``: ``compute_policy_loss_vanilla`` (ppo),
  ``compute_policy_loss_gspo``, ``compute_policy_loss_cispo``, ``compute_policy_loss_sapo``, called as verl's
  actor calls them;
- TRL 1.16, ``GRPOTrainer._compute_loss`` with ``loss_type="grpo"`` and
  ``importance_sampling_level="sequence"`` (GSPO), ``loss_type="cispo"`` and ``loss_type="sapo"``. TRL has no
  pure loss function: the loss is written inline in this trainer method, so it is called unbound on a
  stand-in that has the attributes it reads;
- CE-GPPO: the authors' ``compute_gppo_loss_general_beta`` (github.com/Kwai-Klear/CE-GPPO at commit 10558fe,
  verl/trainer/ppo/core_algos.py), its formula written out in float64 below. TRL and verl ship no CE-GPPO.
"""

import pytest
import torch
import torch.nn.functional as F
from peers import TRLStandIn, trl_loss

from entroclip import losses
from entroclip.attribution import clip_attribution
from entroclip.entropy import entropy_sensitivity
from entroclip.objectives import AGGREGATIONS, importance_ratio, surrogate_terms

#: valid tokens per row: full, short, one-token and empty rows
LENGTHS = (9, 6, 2, 1, 0, 8, 9, 4, 7, 3, 9, 5, 9, 2, 6, 8)
#: the same without the empty row, for TRL's aggregations that average over all rows, empty ones included
LENGTHS_NONEMPTY = (9, 6, 2, 1, 5, 8, 9, 4, 7, 3, 9, 5, 9, 2, 6, 8)
#: peers and references are float32 computations of the same formulas in another order of operations
RTOL = 1e-6
MAX_LEN = 12  # the constant of seq-mean-token-sum-norm, unlike the padded length 9

# kind -> (loss, its keyword arguments, spread of the token log-ratios, spread of the rows' mean log-ratio,
# the events the data must produce). The bounds are narrow enough that every event fires on a few tokens.
CASES = {
    "ppo": (losses.ppo_loss, {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 2.0}, 0.5, 0.0, "low high dual"),
    "gspo": (losses.gspo_loss, {"eps_low": 0.05, "eps_high": 0.08}, 0.3, 0.2, "low high"),
    "gspo-published": (losses.gspo_loss, {}, 1e-3, 1e-3, "low high"),
    "cispo": (losses.cispo_loss, {"eps_low": 0.2, "eps_high": 0.28}, 0.3, 0.0, "low high"),
    "sapo": (losses.sapo_loss, {"tau_pos": 4.0, "tau_neg": 6.0}, 0.4, 0.0, "low high"),
    "cegppo": (
        losses.cegppo_loss,
        {"eps_low": 0.2, "eps_high": 0.2, "beta1": 0.75, "beta2": 1.0, "dual_clip": 2.0},
        0.5,
        0.0,
        "low high dual",
    ),
}
#: kinds whose aggregation is a parameter
AGGREGATED = ("ppo", "gspo", "gspo-published", "cispo", "cegppo")


def batch(gen, lengths=LENGTHS, spread=0.3, row_spread=0.0, length=9):
    """(logp_new with grad, logp_old, per-sequence advantages, bool mask); the padding holds finite junk."""
    rows = len(lengths)
    old = -3.0 * torch.rand(rows, length, generator=gen)
    log_ratio = spread * torch.randn(rows, length, generator=gen)
    log_ratio += row_spread * torch.randn(rows, 1, generator=gen)
    adv = torch.randn(rows, generator=gen)
    mask = torch.arange(length) < torch.tensor(lengths)[:, None]
    return (old + log_ratio).requires_grad_(), old, adv, mask


def case_batch(gen, kind, lengths=LENGTHS):
    loss, kwargs, spread, row_spread, _ = CASES[kind]
    return loss, kwargs, batch(gen, lengths, spread, row_spread)


def agg_kwargs(kind, agg):
    return {"agg": agg, "max_len": MAX_LEN} if kind in AGGREGATED else {}


def assert_events_fire(out, kind, events=None):
    """The data reach every event of the kind (or ``events``): the checks cover the clipped branches."""
    for name in (events or CASES[kind][4]).split():
        assert getattr(out, "clip_" + name if name != "dual" else name).any(), f"no {name} event for {kind}"


# ----- verl 0.9.1 ------------------------------------------------------------------------------------------

# kind -> (verl's function, its ActorConfig fields for CASES[kind]'s arguments)
VERL = {
    "ppo": (
        "compute_policy_loss_vanilla",
        {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 2.0},
    ),
    "gspo": ("compute_policy_loss_gspo", {"clip_ratio_low": 0.05, "clip_ratio_high": 0.08}),
    "gspo-published": ("compute_policy_loss_gspo", {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4}),
    "cispo": ("compute_policy_loss_cispo", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}),
    # verl's SAPO aggregates seq-mean-token-mean whatever loss_agg_mode says: every mode must match ours
    "sapo": ("compute_policy_loss_sapo", {"tau_pos": 4.0, "tau_neg": 6.0}),
}


def verl_config(fields):
    """An ActorConfig built as verl's own tests build it; the norm mode's constant goes through
    global_batch_info (verl's actor puts loss_scale_factor there)."""
    from verl.workers.config import ActorConfig

    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, **fields)
    config.global_batch_info.update({"loss_scale_factor": MAX_LEN})
    return config


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kind", list(VERL))
def test_loss_and_gradient_equal_verls(gen, kind, agg, per_token):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    name, fields = VERL[kind]
    loss, kwargs, (new, old, adv, mask) = case_batch(gen, kind)
    if per_token:
        adv = adv[:, None] + 0.5 * torch.randn(mask.shape, generator=gen)
    # verl takes per-token advantages and a float response mask
    verl_adv = adv if per_token else adv[:, None].expand_as(mask)
    theirs, _ = getattr(core_algos, name)(old, new, verl_adv, mask.float(), agg, verl_config(fields))
    (their_grad,) = torch.autograd.grad(theirs, new)
    out = loss(new, old, adv, mask, **kwargs, **agg_kwargs(kind, agg))
    (our_grad,) = torch.autograd.grad(out.loss, new)
    assert_events_fire(out, kind)
    torch.testing.assert_close(out.loss, theirs, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(our_grad, their_grad, rtol=RTOL, atol=1e-12)


# ----- TRL 1.16 --------------------------------------------------------------------------------------------


# kind -> (TRL's stand-in arguments after the log-probs, our arguments, the rows' lengths, the events that
# fire). TRL's "grpo" and "sapo" average the per-sequence token means over all rows, an empty one included:
# verl (and we) average over the non-empty rows, so these two get no empty row. TRL's CISPO caps r at
# epsilon_high and has no lower bound.
TRL = {
    "gspo": (
        ("grpo", "sequence", {"epsilon": 0.05, "epsilon_high": 0.08}),
        {"eps_low": 0.05, "eps_high": 0.08, "agg": "seq-mean-token-mean"},
        LENGTHS_NONEMPTY,
        "low high",
    ),
    "cispo": (
        ("cispo", "token", {"epsilon_high": 1.28}),
        {"eps_low": None, "eps_high": 0.28, "agg": "token-mean"},
        LENGTHS,
        "high",
    ),
    "sapo": (
        ("sapo", "token", {"tau_pos": 4.0, "tau_neg": 6.0}),
        {"tau_pos": 4.0, "tau_neg": 6.0},
        LENGTHS_NONEMPTY,
        "low high",
    ),
}


@pytest.mark.parametrize("kind", list(TRL))
def test_loss_and_gradient_equal_trls(gen, kind):
    pytest.importorskip("trl.trainer.grpo_trainer")
    (loss_type, level, options), ours, lengths, events = TRL[kind]
    loss, _, (new, old, adv, mask) = case_batch(gen, kind, lengths)
    theirs = trl_loss(TRLStandIn(loss_type, level, new, **options), old, adv, mask)
    (their_grad,) = torch.autograd.grad(theirs, new)
    out = loss(new, old, adv, mask, **ours)
    (our_grad,) = torch.autograd.grad(out.loss, new)
    assert_events_fire(out, kind, events)
    torch.testing.assert_close(out.loss, theirs, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(our_grad, their_grad, rtol=RTOL, atol=1e-12)


# ----- CE-GPPO: the authors' formula ------------------------------------------------------------------------


def authors_cegppo(new, old, adv, eps_low, eps_high, c, beta1, beta2):
    """Per-token losses of compute_gppo_loss_general_beta (Kwai-Klear/CE-GPPO @ 10558fe), float64: the
    clipped tokens' -beta * bound / sg(r) * r * A, -r A elsewhere, then dual-clip min(., -c A) for A < 0."""
    ratio = torch.exp(new - old)
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    kept = ratio / ratio.detach()
    losses1 = torch.where(low, -beta1 * (1 - eps_low) * kept * adv, -ratio * adv)
    losses1 = torch.where(high, -beta2 * (1 + eps_high) * kept * adv, losses1)
    return torch.where(adv < 0, torch.minimum(-adv * c, losses1), losses1)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_cegppo_equals_the_authors_formula(gen, agg):
    """Per-token losses against the authors' formula; the aggregate with verl 0.9.1's agg_loss (the
    authors' older agg_loss counts empty rows in the seq-mean modes and divides the norm mode's sum by the
    padded length only; token-mean, their recipes' mode, is the same in both)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    _, kwargs, (new, old, adv, mask) = case_batch(gen, "cegppo")
    new64 = new.detach().double().requires_grad_()
    adv64 = adv.double()[:, None].expand_as(mask)
    args = [kwargs[k] for k in ("eps_low", "eps_high", "dual_clip", "beta1", "beta2")]
    per_token = authors_cegppo(new64, old.double(), adv64, *args)
    norm = {"loss_scale_factor": MAX_LEN} if agg == "seq-mean-token-sum-norm" else {}
    theirs = core_algos.agg_loss(per_token, mask.double(), agg, **norm)
    (their_grad,) = torch.autograd.grad(theirs, new64)
    out = losses.cegppo_loss(new, old, adv, mask, **kwargs, agg=agg, max_len=MAX_LEN)
    (our_grad,) = torch.autograd.grad(out.loss, new)
    assert_events_fire(out, "cegppo")
    torch.testing.assert_close(
        out.token_loss.double(), torch.where(mask, per_token, 0.0), rtol=RTOL, atol=1e-9
    )
    torch.testing.assert_close(out.loss.double(), theirs, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(our_grad.double(), their_grad, rtol=RTOL, atol=1e-12)


def test_ppo_kind_is_entroclips_ppo(gen):
    _, kwargs, (new, old, adv, mask) = case_batch(gen, "ppo")
    out = losses.ppo_loss(new, old, adv, mask, **kwargs, agg="seq-mean-token-sum")
    reference, _ = surrogate_terms(new, old, adv, mask, **kwargs, agg="seq-mean-token-sum")
    for name in ("clip_low", "clip_high", "dual", "ratio", "token_scale"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), rtol=0.0, atol=0.0)
    torch.testing.assert_close(out.loss, reference.loss)
    torch.testing.assert_close(
        torch.autograd.grad(out.loss, new)[0], torch.autograd.grad(reference.loss, new)[0]
    )


# ----- the ledger ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kind", list(CASES))
def test_weight_is_minus_the_gradient(gen, kind, agg):
    loss, kwargs, (new, old, adv, mask) = case_batch(gen, kind)
    out = loss(new, old, adv, mask, **kwargs, **agg_kwargs(kind, agg))
    (grad,) = torch.autograd.grad(out.loss, new)
    assert_events_fire(out, kind)
    torch.testing.assert_close(out.weight, -grad, rtol=RTOL, atol=1e-12)
    (pg_grad,) = torch.autograd.grad(
        -(out.advantages * importance_ratio(new, old, mask) * out.token_scale).sum(), new
    )
    torch.testing.assert_close(out.pg_weight, -pg_grad, rtol=RTOL, atol=1e-12)


def test_ppo_ledger_equals_clip_attribution(gen):
    _, kwargs, (new, old, adv, mask) = case_batch(gen, "ppo")
    kappa = torch.where(mask, torch.randn(mask.shape, generator=gen), torch.nan)  # padding's kappa is junk
    for agg in AGGREGATIONS:
        ledger = losses.entropy_ledger(
            losses.ppo_loss(new, old, adv, mask, **kwargs, agg=agg, max_len=MAX_LEN), kappa
        )
        reference, _ = surrogate_terms(new, old, adv, mask, **kwargs, agg=agg, max_len=MAX_LEN)
        theirs = clip_attribution(reference, kappa, adv, new, old, mask)
        for key in ("effect_low", "effect_high", "effect_dual", "effect_pos", "effect_neg"):
            assert ledger[key] == pytest.approx(theirs[key], rel=RTOL, abs=1e-9), (agg, key)
        assert ledger["effect_dual"] != 0.0 and ledger["effect_rescale"] == 0.0


def row_entropy(logits):
    return -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)


#: step size of the finite difference on the logits
ETA = 1e-6
#: |finite difference - prediction|: the second-order term, eta/2 * w^2 * O(|d^2 H / dz^2|) <= 1e-8 with
#: weights w <= 0.1, and float64 rounding of the entropy differences (~1e-9) are below the float32 rounding
#: of kappa and of the weights, ~1e-7 relative of ~100 terms of ~1e-3: ~1e-8 (seen: <= 1e-8 at eta = 1e-6
#: and 1e-5 alike). The effects are 1e-4 to 1e-2; a wrong weight or group shows at >= 1e-5.
FD_ATOL = 1e-7


@pytest.mark.parametrize("kind", list(CASES))
def test_ledger_against_a_finite_difference(gen, kind):
    """A tabular softmax: every token has its own logits [V]; one gradient step of size eta on the logits,
    with the gradient kept on one group of tokens, changes the entropy by eta times that group's effect."""
    loss, kwargs, spread, row_spread, _ = CASES[kind]
    lengths, length, vocab = (8, 5, 2, 1, 0, 8, 6, 3, 8, 7, 4, 8, 2, 6, 8, 5), 8, 11
    rows = len(lengths)
    logits = (1.5 * torch.randn(rows * length, vocab, generator=gen, dtype=torch.float64)).requires_grad_()
    tokens = torch.multinomial(F.softmax(logits.detach(), -1), 1, generator=gen)
    new = F.log_softmax(logits, -1).gather(-1, tokens).view(rows, length)
    log_ratio = spread * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    old = new.detach() - log_ratio - row_spread * torch.randn(rows, 1, generator=gen, dtype=torch.float64)
    adv = torch.randn(rows, generator=gen, dtype=torch.float64)
    mask = torch.arange(length) < torch.tensor(lengths)[:, None]
    _, kappa = entropy_sensitivity(logits.detach(), tokens.squeeze(-1))

    out = loss(new, old, adv, mask, **kwargs)
    assert_events_fire(out, kind)
    pg_loss = -(out.advantages * importance_ratio(new, old, mask) * out.token_scale).sum()
    (step,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
    (change,) = torch.autograd.grad(out.loss - pg_loss, logits)  # -(w - w_pg) (e_a - pi) per token
    ledger = losses.entropy_ledger(out, kappa.view(rows, length))

    rest = mask & ~(out.clip_low | out.clip_high | out.dual)
    groups = {
        "effect_low": (change, out.clip_low),
        "effect_high": (change, out.clip_high),
        "effect_dual": (change, out.dual),
        "effect_rescale": (change, rest),
        "effect_pos": (step, rest & (out.advantages > 0)),
        "effect_neg": (step, rest & (out.advantages < 0)),
        "effect_total": (step, mask),
    }
    h0 = row_entropy(logits.detach())
    for key, (grad, tokens_kept) in groups.items():
        moved = logits.detach() - ETA * grad * tokens_kept.reshape(-1, 1)
        finite_difference = ((row_entropy(moved) - h0).sum() / ETA).item()
        assert finite_difference == pytest.approx(ledger[key], abs=FD_ATOL), key
    pg_change = (out.pg_weight * torch.where(mask, kappa.view(rows, length), 0.0)).sum().item()
    removed = ledger["effect_low"] + ledger["effect_high"] + ledger["effect_dual"] + ledger["effect_rescale"]
    assert ledger["effect_total"] == pytest.approx(removed + pg_change, abs=1e-7)


def expected_events(kind, kwargs, new, old, adv, mask):
    """(low, high, dual) from the definitions in entroclip.losses' docstring, in float64."""
    log_ratio = torch.where(mask, new.detach().double() - old.double(), 0.0)
    r = log_ratio.exp()
    a = adv.double()[:, None].expand_as(mask)
    low, high = 1 - kwargs["eps_low"], 1 + kwargs["eps_high"]
    if kind == "cispo":  # whatever the sign of A
        return mask & (r < low), mask & (r > high), torch.zeros_like(mask)
    if kind == "gspo":  # the sequence ratio on each of its tokens
        r = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).exp().expand_as(mask)
    dual = mask & (a < 0) & (r > (kwargs.get("dual_clip") or torch.inf))
    return mask & (a < 0) & (r < low), mask & (a > 0) & (r > high), dual


@pytest.mark.parametrize("kind", ["gspo", "cispo", "cegppo"])
def test_events_follow_their_definitions(gen, kind):
    loss, kwargs, (new, old, adv, mask) = case_batch(gen, kind)
    out = loss(new, old, adv, mask, **kwargs)
    expected = expected_events(kind, kwargs, new, old, adv, mask)
    for name, ours, theirs in zip(
        ("low", "high", "dual"), (out.clip_low, out.clip_high, out.dual), expected, strict=True
    ):
        assert torch.equal(ours, theirs), name


def test_sapo_events_are_where_the_gate_slope_halves(gen):
    _, kwargs, (new, old, adv, mask) = case_batch(gen, "sapo")
    out = losses.sapo_loss(new, old, adv, mask, **kwargs)
    r, a = out.ratio.double(), out.advantages
    tau = torch.where(a > 0, kwargs["tau_pos"], kwargs["tau_neg"]).double()
    sigma = torch.sigmoid(tau * (r - 1))
    slope = 4 * sigma * (1 - sigma)  # d f / d r, 1 at r = 1
    for event, side in ((out.clip_low, mask & (a < 0) & (r < 1)), (out.clip_high, mask & (a > 0) & (r > 1))):
        assert event.any() and (event & ~side).sum() == 0
        assert (slope[event] < 0.5).all() and (slope[side & ~event] >= 0.5).all()


@pytest.mark.parametrize(
    ("loss", "kwargs"),
    [
        (losses.sapo_loss, {"tau_pos": 0.0}),
        (losses.cegppo_loss, {"beta1": -0.1}),
        (losses.cegppo_loss, {"beta1": 4.0, "dual_clip": 3.0}),
        (losses.gspo_loss, {"eps_low": 1.5}),
        (losses.cispo_loss, {"eps_high": -0.1}),
    ],
)
def test_bad_parameters_are_rejected(gen, loss, kwargs):
    new, old, adv, mask = batch(gen)
    with pytest.raises(ValueError):
        loss(new, old, adv, mask, **kwargs)
