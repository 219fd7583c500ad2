"""verl and TRL adapters: the same loss, metrics and controller inside the frameworks' trainers.

The verl losses are checked against verl's own ``vanilla``, ``gspo``, ``cispo`` and ``sapo`` losses when
``verl.trainer.ppo.core_algos`` imports, and always against verl's documented vanilla formula with plain
tensors. The TRL trainer is checked against ``GRPOTrainer._compute_loss`` for every loss type it takes and
by a few CPU training steps of a tiny local model. The kinds' metrics are checked against entroclip's own
events and entropy ledger (:mod:`entroclip.losses`) on the same inputs.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from entroclip import losses
from entroclip.config import ConfigError, ControlConfig
from entroclip.entropy import entropy_sensitivity
from entroclip.integrations import verl as ev
from entroclip.integrations.common import npg_kappa, weighted_advantages
from entroclip.objectives import AGGREGATIONS, clipped_surrogate

VERL_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]
EVENT_KEYS = {
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/dual_mean",
    "ratio/mean",
}
ENTROCLIP_KEYS = EVENT_KEYS | {"control/eps_low", "control/eps_high"}
#: the ledger terms entroclip's trainer logs for the kinds of entroclip.losses (effect_cov is PPO's only: 0)
LEDGER_LOGGED = ("effect_low", "effect_high", "effect_dual", "effect_pos", "effect_neg", "effect_rescale")
#: peers' float32 computations of the same formulas in another order of operations
RTOL = 1e-6


def verl_batch(gen, batch=6, length=7, scale=0.5):
    """(old_log_prob, log_prob with grad, advantages, response_mask, rollout_is_weights) as verl passes."""
    old = -torch.rand(batch, length, generator=gen) * 4
    new = (old + scale * torch.randn(batch, length, generator=gen)).requires_grad_()
    adv = torch.randn(batch, length, generator=gen)
    mask = torch.rand(batch, length, generator=gen) < 0.8
    mask[0] = False  # a sequence without response tokens
    weights = torch.rand(batch, length, generator=gen) + 0.1
    return old, new, adv, mask, weights


def vanilla_reference(old, new, adv, mask, low, high, c, weights):
    """verl's documented vanilla loss (token-mean): PPO clip, then dual-clip at c for A < 0, weighted."""
    ratio = torch.exp((new - old).clamp(-20, 20))
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))
    per_token = torch.where(adv < 0, torch.minimum(-adv * c, clipped), clipped) * weights
    return (per_token * mask).sum() / mask.sum()


def actor_config(global_info=False, **fields):
    """verl's ActorConfig, built as verl's own tests build it; with ``global_info`` as on 2 ranks."""
    from verl.workers.config import ActorConfig

    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, **fields)
    if global_info:
        info = {"dp_size": 2, "batch_num_tokens": 60, "global_batch_size": 12, "loss_scale_factor": 10}
        config.global_batch_info.update(info)
    return config


def assert_ledger_logged(metrics, out, kappa, prefix, rel=1e-5):
    """The logged effects are entroclip's ledger of ``out`` (and effect_cov 0), the event fractions its
    events' (over ``out``'s valid tokens)."""
    ledger = losses.entropy_ledger(out, kappa)
    for key in LEDGER_LOGGED:
        assert metrics[prefix + key] == pytest.approx(ledger[key], rel=rel, abs=1e-9), key
    assert metrics[prefix + "effect_cov"] == 0.0
    valid = out.token_scale > 0
    for key, event in (
        ("clip_ratio/low_mean", out.clip_low),
        ("clip_ratio/high_mean", out.clip_high),
        ("clip_ratio/region_mean", out.clip_low | out.clip_high),
        ("clip_ratio/dual_mean", out.dual),
        ("ratio/mean", out.ratio),
    ):
        assert metrics[key] == pytest.approx(event[valid].float().mean().item(), rel=rel), key


@pytest.fixture
def verl_settings():
    """Restores the process-wide verl settings after a test."""
    yield ev.configure
    ev.configure(ev.VerlSettings())


# ----- shared pieces ----------------------------------------------------------------------------------------


def test_weighted_advantages_scale_the_loss_and_keep_clip_events(gen):
    old, new, adv, mask, weights = verl_batch(gen)
    plain = clipped_surrogate(new, old, adv, mask, 0.1, 0.3, agg="token-mean")
    weighted = clipped_surrogate(new, old, weighted_advantages(adv, mask, weights), mask, 0.1, 0.3)
    assert torch.equal(plain.clip_low, weighted.clip_low) and torch.equal(plain.clip_high, weighted.clip_high)
    expected = vanilla_reference(old, new, adv, mask, 0.1, 0.3, math.inf, weights)
    torch.testing.assert_close(weighted.loss, expected)
    per_sequence = weighted_advantages(adv, mask, weights[:, :1])
    torch.testing.assert_close(per_sequence, adv * weights[:, :1])


def test_npg_kappa_is_the_natural_gradient_entropy_change():
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0], dtype=torch.float64)
    p = torch.softmax(logits, -1)
    entropy = -(p * p.log()).sum()
    for token in range(4):
        eta = 1e-6  # natural-gradient step of log pi_a: delta z = eta * e_a / p_a
        step = torch.zeros(4, dtype=torch.float64)
        step[token] = eta / p[token]
        q = torch.softmax(logits + step, -1)
        change = -(q * q.log()).sum() - entropy
        logp = p[token].log().reshape(1, 1)
        kappa = npg_kappa(logp, torch.ones(1, 1, dtype=torch.bool), entropy.reshape(1, 1))
        assert change.item() / eta == pytest.approx(kappa.item(), rel=1e-4)
    # without the entropy, H is the mean of -log pi over the valid tokens
    logp = torch.tensor([[-1.0, -3.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(npg_kappa(logp, mask), torch.tensor([[-1.0, 1.0, 0.0]]))


# ----- verl: the documented signature with plain tensors ----------------------------------------------------


def test_verl_loss_follows_the_documented_vanilla_loss(gen):
    old, new, adv, mask, weights = verl_batch(gen)
    config = {"clip_ratio": 0.2, "clip_ratio_low": 0.1, "clip_ratio_high": 0.3, "clip_ratio_c": 1.5}
    loss, metrics = ev.entroclip_policy_loss(
        old_log_prob=old,
        log_prob=new,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode="token-mean",
        config=config,
        rollout_is_weights=weights,
    )
    torch.testing.assert_close(loss, vanilla_reference(old, new, adv, mask, 0.1, 0.3, 1.5, weights))
    assert ENTROCLIP_KEYS | {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)
    assert {f"entropy/npg_effect_{k}" for k in ("low", "high", "dual", "pos", "neg")} <= set(metrics)
    assert metrics["control/eps_low"] == 0.1 and metrics["control/eps_high"] == 0.3
    ratio = torch.exp(new - old).detach()
    low = ((adv < 0) & (ratio < 0.9) & mask).sum() / mask.sum()
    dual = ((adv < 0) & (ratio > 1.5) & mask).sum() / mask.sum()
    assert metrics["clip_ratio/low_mean"] == pytest.approx(low.item())
    assert metrics["actor/pg_clipfrac_lower"] == metrics["clip_ratio/dual_mean"] == pytest.approx(dual.item())
    assert metrics["entropy/rollout_mc"] == pytest.approx((-(old * mask).sum() / mask.sum()).item())
    # verl's unset clip_ratio_low / clip_ratio_high fall back to clip_ratio
    _, defaults = ev.entroclip_policy_loss(old, new, adv, mask, "token-mean", {"clip_ratio": 0.25})
    assert defaults["control/eps_low"] == defaults["control/eps_high"] == 0.25


def test_verl_loss_is_this_ranks_share_of_the_global_batch_loss(gen):
    old, new, adv, mask, _ = verl_batch(gen)
    info = {"dp_size": 4, "batch_num_tokens": 100, "global_batch_size": 24, "loss_scale_factor": 16}
    config = {"clip_ratio": 0.2, "global_batch_info": info}
    local, _ = ev.entroclip_policy_loss(old, new, adv, mask, "token-mean", {"clip_ratio": 0.2})
    token_mean, _ = ev.entroclip_policy_loss(old, new, adv, mask, "token-mean", config)
    torch.testing.assert_close(token_mean, local * mask.sum() * 4 / 100)
    per_seq, _ = ev.entroclip_policy_loss(old, new, adv, mask, "seq-mean-token-sum", config)
    norm, _ = ev.entroclip_policy_loss(old, new, adv, mask, "seq-mean-token-sum-norm", config)
    torch.testing.assert_close(norm, per_seq / 16)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ev.entroclip_policy_loss(old, new, adv, mask, "token-max", config)


def test_verl_controller_acts_once_per_step(gen, verl_settings):
    control = ControlConfig(kind="clip_low", target=6.0, kp=1.0, ki=0.0, eps_low_min=0.02)
    verl_settings(ev.VerlSettings(control=control, updates_per_step=2))
    # 2 ranks, 8 sequences per update: 4 per rank, micro-batches of 2 -> an update every 2 calls
    config = {"clip_ratio": 0.2, "global_batch_info": {"dp_size": 2, "global_batch_size": 8}}
    eps_lows = []
    for call in range(6):
        old, new, adv, mask, _ = verl_batch(gen, batch=2)
        if call == 1:  # a forward without gradient (log-prob recomputation) is not a training call
            ev.entroclip_policy_loss(old, new.detach(), adv, mask, "token-mean", config)
        _, metrics = ev.entroclip_policy_loss(old, new, adv, mask, "token-mean", config)
        eps_lows.append(metrics["control/eps_low"])
    assert eps_lows[:4] == [0.2] * 4  # the configured bound until the first step ends
    assert eps_lows[4] == eps_lows[5] < 0.2  # entropy below target: eps_low goes down
    assert ev._Runtime.control is not None and ev._Runtime.control.step == 1
    assert metrics["control/target"] == 6.0


def test_verl_settings_file_and_environment(tmp_path, monkeypatch, verl_settings):
    settings = ev.load_settings("configs/verl_entroclip.yaml")
    assert settings.control.kind == "clip_low" and settings.updates_per_step == 8
    monkeypatch.setenv(ev.CONFIG_ENV, str(Path("configs/verl_entroclip.yaml").resolve()))
    assert verl_settings() is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text("control: {kind: kl_cov}\n")
    with pytest.raises(ConfigError, match="not available in the verl loss"):
        ev.load_settings(bad)
    bad.write_text("updates_per_step: 0\n")
    with pytest.raises(ConfigError, match="updates_per_step"):
        ev.load_settings(bad)


def test_verl_module_registers_only_with_verl():
    assert (importlib.util.find_spec("verl") is not None) == ev.REGISTERED
    assert set(ev.POLICY_LOSSES) == {ev.LOSS_NAME, "entroclip_gspo", "entroclip_cispo", "entroclip_sapo"}


def test_verl_kind_losses_refuse_the_clip_low_controller(gen, verl_settings):
    verl_settings(ev.VerlSettings(control=ControlConfig(kind="clip_low", target=6.0)))
    old, new, adv, mask, _ = verl_batch(gen)
    with pytest.raises(ValueError, match="control.kind='clip_low' .* needs loss_mode='entroclip'"):
        ev.POLICY_LOSSES["entroclip_gspo"](old, new, adv, mask, "token-mean", {"clip_ratio": 0.2})


# ----- verl: against verl's own loss ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("global_info", [False, True])
def test_verl_loss_equals_verls_vanilla_loss(gen, mode, global_info):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    assert core_algos.get_policy_loss_fn(ev.LOSS_NAME) is ev.entroclip_policy_loss
    config = actor_config(global_info, clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=1.5)
    old, new, adv, mask, weights = verl_batch(gen)
    theirs, their_metrics = core_algos.compute_policy_loss_vanilla(old, new, adv, mask, mode, config, weights)
    (their_grad,) = torch.autograd.grad(theirs, new)
    ours, metrics = ev.entroclip_policy_loss(old, new, adv, mask, mode, config, weights)
    (our_grad,) = torch.autograd.grad(ours, new)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)
    for key, value in their_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert metrics["actor/pg_clipfrac"] == pytest.approx(
        metrics["clip_ratio/low_mean"] + metrics["clip_ratio/high_mean"]
    )


# entroclip's verl loss -> (verl's loss function, its ActorConfig fields, entroclip's loss with the same
# parameters). The bounds are narrow enough that every event of the kind fires on a few tokens.
VERL_KINDS = {
    "entroclip_gspo": (
        "compute_policy_loss_gspo",
        {"clip_ratio_low": 0.05, "clip_ratio_high": 0.08},
        losses.gspo_loss,
        {"eps_low": 0.05, "eps_high": 0.08},
    ),
    "entroclip_cispo": (
        "compute_policy_loss_cispo",
        {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28},
        losses.cispo_loss,
        {"eps_low": 0.2, "eps_high": 0.28},
    ),
    "entroclip_sapo": (
        "compute_policy_loss_sapo",
        {"tau_pos": 4.0, "tau_neg": 6.0},
        losses.sapo_loss,
        {"tau_pos": 4.0, "tau_neg": 6.0},
    ),
}


@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("name", list(VERL_KINDS))
def test_verl_kind_losses_equal_verls(gen, name, mode, global_info):
    """Loss, gradient and verl's metrics as verl's own loss of the same name; the events and the ledger as
    entroclip's kind, where the call is the whole batch in one of entroclip's aggregations (verl's sapo
    always aggregates seq-mean-token-mean)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    verl_name, fields, loss, kwargs = VERL_KINDS[name]
    old, new, adv, mask, weights = verl_batch(gen, batch=12, length=9)
    args = {
        "old_log_prob": old,
        "log_prob": new,
        "advantages": adv,
        "response_mask": mask,
        "loss_agg_mode": mode,
        "config": actor_config(global_info, **fields),
        "rollout_is_weights": weights,
    }
    theirs, their_metrics = getattr(core_algos, verl_name)(**args)
    (their_grad,) = torch.autograd.grad(theirs, new)
    ours, metrics = core_algos.get_policy_loss_fn(name)(**args)
    (our_grad,) = torch.autograd.grad(ours, new)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(our_grad, their_grad, rtol=RTOL, atol=1e-12)
    for key, value in their_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert {"entropy/npg_" + key for key in LEDGER_LOGGED} | EVENT_KEYS <= set(metrics)
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    if name == "entroclip_sapo":  # no bounds in force
        assert "control/eps_low" not in metrics and "control/eps_high" not in metrics
    else:
        assert (metrics["control/eps_low"], metrics["control/eps_high"]) == (
            kwargs["eps_low"],
            kwargs["eps_high"],
        )
    agg = "seq-mean-token-mean" if name == "entroclip_sapo" else mode
    if global_info or agg not in AGGREGATIONS:
        return
    kappa = npg_kappa(new, mask)
    out = loss(
        new, old, weighted_advantages(adv, mask, weights), mask, **kwargs, agg=agg, max_len=mask.shape[-1]
    )
    assert_ledger_logged(metrics, out, kappa, "entropy/npg_")
    assert (metrics["entropy/npg_effect_rescale"] != 0.0) == (name != "entroclip_cispo")
    # the effects of the tokens without an event, from verl's own gradient: w = -d loss / d logp
    rest = mask & ~(out.clip_low | out.clip_high)
    taken = (-their_grad * kappa)[rest].sum().item()
    assert metrics["entropy/npg_effect_pos"] + metrics["entropy/npg_effect_neg"] == pytest.approx(
        taken, rel=1e-5
    )


@pytest.mark.parametrize(
    ("verl_mode", "loss_mode"),
    [("vanilla", ev.LOSS_NAME), *[(name.removeprefix("entroclip_"), name) for name in VERL_KINDS]],
)
def test_verl_worker_loss_dispatches_to_entroclip(gen, verl_mode, loss_mode):
    """verl's engine-level ppo_loss picks the loss by policy_loss.loss_mode and aggregates its metrics."""
    pytest.importorskip("verl.trainer.ppo.core_algos")
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig, PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    batch, prompt, response = 4, 3, 5
    old, new, adv, mask, _ = verl_batch(gen, batch=batch, length=response)
    mask[0, :2] = True
    # the model's per-token log-probs over prompt + response, unpadded; position t predicts token t + 1
    full = torch.zeros(batch, prompt + response)
    full[:, prompt - 1 : -1] = new.detach()
    full.requires_grad_()
    fields = {
        "prompts": torch.ones(batch, prompt, dtype=torch.long),
        "responses": torch.ones(batch, response, dtype=torch.long),
        "attention_mask": torch.ones(batch, prompt + response, dtype=torch.long),
        "response_mask": mask.float(),
        "old_log_probs": old,
        "advantages": adv,
    }
    data = TensorDict(fields, batch_size=[batch])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=batch)
    results = {}
    for mode in (verl_mode, loss_mode):
        policy_loss = PolicyLossConfig(loss_mode=mode)
        config = ActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_micro_batch_size_per_gpu=2,
            clip_ratio_low=0.1,
            policy_loss=policy_loss,
        )
        loss, metrics = ppo_loss(config, {"log_probs": full.flatten()}, data)
        (grad,) = torch.autograd.grad(loss, full)
        results[mode] = loss, grad, {key: metric.aggregate() for key, metric in metrics.items()}
    (theirs, their_grad, their_metrics), (ours, our_grad, our_metrics) = results.values()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)
    assert set(our_metrics) >= (EVENT_KEYS if verl_mode == "sapo" else ENTROCLIP_KEYS)
    assert ("entropy/npg_effect_rescale" in our_metrics) == (verl_mode != "vanilla")
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/pg_loss"):
        assert our_metrics[key] == pytest.approx(their_metrics[key], abs=1e-6), key


# ----- TRL --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    pytest.importorskip("trl")
    from entroclip.policy.builtin import save_builtin

    return save_builtin("tiny-0.1m", "0123456789+=", 0, tmp_path_factory.mktemp("tiny"))


def prompts():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"{i}+{j}=" for i in range(4) for j in range(4)]})


def count_ones(completions, **kwargs):
    """A verifiable toy reward: the number of '1's, minus a length penalty."""
    return [c.count("1") - len(c) / 16 for c in completions]


def trl_trainer(path, out, control=None, attribution="exact", **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from entroclip.integrations.trl import EntroclipGRPOTrainer

    options = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        num_iterations=2,  # the second pass over each generation batch has ratios away from 1
        learning_rate=3e-2,
        epsilon=0.1,
        epsilon_high=0.1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    args = GRPOConfig(**{**options, **overrides})
    model = AutoModelForCausalLM.from_pretrained(path)
    return EntroclipGRPOTrainer(
        model=model,
        reward_funcs=count_ones,
        args=args,
        train_dataset=prompts(),
        processing_class=AutoTokenizer.from_pretrained(path),
        control=control,
        attribution=attribution,
    )


def test_trl_trainer_trains_and_logs_entroclip_metrics(tiny_model_path, tmp_path):
    control = ControlConfig(kind="clip_low", target=3.0, kp=0.5, ki=0.05)
    trainer = trl_trainer(
        tiny_model_path, tmp_path, control, max_steps=4, save_strategy="steps", save_steps=4
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "clip_ratio/low_mean" in entry]
    assert len(logs) == 4
    effects = {f"entropy/effect_{k}" for k in ("low", "high", "dual", "pos", "neg")}
    assert ENTROCLIP_KEYS | effects | {"control/target", "loss/pg"} <= set(logs[0])
    assert "entropy/rollout" in logs[0]  # measured once per generation batch, before its updates
    assert max(entry["clip_ratio/region_mean"] for entry in logs) > 0  # ratios left 1
    assert any(entry["entropy/effect_low"] != 0 for entry in logs)
    assert all(entry["control/eps_low"] < 0.1 for entry in logs)  # entropy below target: eps_low lowered
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    checkpoint = tmp_path / "checkpoint-4"
    state = json.loads((checkpoint / "entroclip_control.json").read_text())
    assert state["step"] == trainer.entroclip_step == 2 and state["action"]["eps_low"] < 0.1
    resumed = trl_trainer(tiny_model_path, tmp_path / "resumed", control, max_steps=4)
    resumed.create_optimizer_and_scheduler(num_training_steps=4)
    resumed._load_optimizer_and_scheduler(str(checkpoint))
    assert resumed.entroclip_step == 2 and resumed.entroclip_action == trainer.entroclip_action
    assert resumed.entroclip_controller.state_dict() == trainer.entroclip_controller.state_dict()


def trl_batch(trainer):
    """A generation batch of 8 completions for a trainer in train mode with 2 accumulation steps: old and
    reference log-probs moved off the policy (ratios leave 1) and one row without completion tokens (as
    ``mask_truncated_completions`` leaves a truncated one; TRL's grpo, dr_grpo and sapo count it). The
    comparisons run in float32 (``bf16=False``): bf16 autocast would round the gradients' differences away."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    batch = trainer._generate_and_score_completions([prompts()[i] for i in range(2)] * 4)
    noise = torch.Generator().manual_seed(1)
    shape = batch["completion_ids"].shape
    batch["old_per_token_logps"] = batch["ref_per_token_logps"] + 0.3 * torch.randn(shape, generator=noise)
    batch["ref_per_token_logps"] = batch["ref_per_token_logps"] + 0.1 * torch.randn(shape, generator=noise)
    batch["completion_mask"][0] = 0
    return batch


def trl_and_entroclip_losses(trainer, batch):
    """(loss, flat parameter gradient, last logged metrics) of ``GRPOTrainer._compute_loss`` and of the
    trainer's own on ``batch``, in that order."""
    from trl import GRPOTrainer

    results = []
    for compute_loss in (GRPOTrainer._compute_loss, type(trainer)._compute_loss):
        trainer.model.zero_grad()
        loss = compute_loss(trainer, trainer.model, batch)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results.append((loss.detach(), grad, logged))
    assert results[0][1].abs().max() > 0
    return results


def assert_losses_close(ours, theirs, batch):
    """Within RTOL of the peer's loss, relative to the size of its terms: GRPO's advantages sum to 0 over a
    group, so the loss is a difference of per-token terms of size |A| (float32 rounding of those shows)."""
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=RTOL * batch["advantages"].abs().mean().item())


def assert_gradients_close(ours, theirs):
    """Elementwise within RTOL of the peer's, and of its largest element for those near 0 (a sum of
    ~100 float32 terms that cancel)."""
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=RTOL * theirs.abs().max().item())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_trl_loss_equals_grpo_trainers_loss(tiny_model_path, tmp_path, loss_type):
    trainer = trl_trainer(
        tiny_model_path,
        tmp_path,
        attribution="npg",
        loss_type=loss_type,
        beta=0.04,
        entropy_coef=0.01,
        epsilon_high=0.3,
        gradient_accumulation_steps=2,
        bf16=False,
    )
    batch = trl_batch(trainer)
    (theirs, their_grad, their_logs), (ours, our_grad, our_logs) = trl_and_entroclip_losses(trainer, batch)
    assert_losses_close(ours, theirs, batch)
    assert_gradients_close(our_grad, their_grad)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "kl"):
        assert our_logs[key] == pytest.approx(their_logs[key], rel=1e-5), key
    assert their_logs["clip_ratio/low_mean"] > 0 and their_logs["clip_ratio/high_mean"] > 0
    assert "entropy/npg_effect_low" in our_logs


# TRL's options -> (entroclip's loss and its arguments, the events the data must produce). GSPO is TRL's
# sequence level of each PPO-clip loss type; TRL's cispo has no lower bound and caps the ratio itself at
# epsilon_high.
GSPO_BOUNDS = {"epsilon": 0.05, "epsilon_high": 0.08}
TRL_KINDS = {
    "gspo-grpo": (
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "use_bias_correction_kl": True},
        losses.gspo_loss,
        {"eps_low": 0.05, "eps_high": 0.08, "agg": "seq-mean-token-mean"},
        "low high",
    ),
    "gspo-bnpo": (
        {"loss_type": "bnpo", "importance_sampling_level": "sequence"},
        losses.gspo_loss,
        {"eps_low": 0.05, "eps_high": 0.08, "agg": "token-mean"},
        "low high",
    ),
    "gspo-dr_grpo": (
        {"loss_type": "dr_grpo", "importance_sampling_level": "sequence"},
        losses.gspo_loss,
        {"eps_low": 0.05, "eps_high": 0.08, "agg": "seq-mean-token-sum-norm", "max_len": 8},
        "low high",
    ),
    "gspo-dapo": (
        {"loss_type": "dapo", "importance_sampling_level": "sequence"},
        losses.gspo_loss,
        {"eps_low": 0.05, "eps_high": 0.08, "agg": "token-mean"},
        "low high",
    ),
    "cispo": (
        {"loss_type": "cispo", "epsilon_high": 1.2, "use_bias_correction_kl": True},
        losses.cispo_loss,
        {"eps_low": None, "eps_high": 1.2 - 1.0, "agg": "token-mean"},
        "high",
    ),
    "sapo": (
        {"loss_type": "sapo", "sapo_temperature_pos": 8.0, "sapo_temperature_neg": 6.0},
        losses.sapo_loss,
        {"tau_pos": 8.0, "tau_neg": 6.0},
        "low high",
    ),
}


@torch.no_grad()
def policy_terms(trainer, batch):
    """(TRL's log-probs of the completion tokens, their logit-space kappa, the loss mask), ``[B, T]``."""
    completion_ids = batch["completion_ids"]
    ids = torch.cat([batch["prompt_ids"], completion_ids], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    length = completion_ids.shape[1]
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, length)
    logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -length - 1 : -1]
    _, kappa = entropy_sensitivity(logits, completion_ids, temperature=trainer.temperature)
    return logps, kappa, batch["completion_mask"].bool()


@pytest.mark.parametrize("case", list(TRL_KINDS))
def test_trl_kind_losses_equal_grpo_trainers_loss(tiny_model_path, tmp_path, case):
    """Loss and gradient as TRL's for the options; the logged events and ledger as entroclip's kind on the
    same log-probs, advantages and kappa."""
    options, loss, kwargs, events = TRL_KINDS[case]
    trainer = trl_trainer(
        tiny_model_path,
        tmp_path,
        beta=0.04,
        entropy_coef=0.01,
        gradient_accumulation_steps=2,
        bf16=False,
        **{**GSPO_BOUNDS, **options},
    )
    batch = trl_batch(trainer)
    (theirs, their_grad, their_logs), (ours, our_grad, our_logs) = trl_and_entroclip_losses(trainer, batch)
    assert_losses_close(ours, theirs, batch)
    assert_gradients_close(our_grad, their_grad)
    for key in ("entropy", "kl"):
        assert our_logs[key] == pytest.approx(their_logs[key], rel=1e-5), key
    logps, kappa, mask = policy_terms(trainer, batch)
    out = loss(logps, batch["old_per_token_logps"], batch["advantages"], mask, **kwargs)
    assert_ledger_logged(our_logs, out, kappa, "entropy/")
    for event in events.split():
        assert our_logs[f"clip_ratio/{event}_mean"] > 0, event
    assert (our_logs["entropy/effect_rescale"] != 0.0) == (case != "cispo")
    for key in ("eps_low", "eps_high"):  # the bounds in force, in entroclip's meaning; SAPO has none
        assert our_logs.get(f"control/{key}") == kwargs.get(key), key


def test_trl_kind_trains_and_logs_its_ledger(tiny_model_path, tmp_path):
    trainer = trl_trainer(
        tiny_model_path,
        tmp_path,
        control=ControlConfig(kind="entropy_bonus", target=3.0),
        max_steps=2,
        loss_type="sapo",
        sapo_temperature_pos=4.0,
        sapo_temperature_neg=6.0,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "clip_ratio/low_mean" in entry]
    assert len(logs) == 2
    ledger = {"entropy/" + key for key in (*LEDGER_LOGGED, "effect_cov")}
    assert EVENT_KEYS | ledger | {"loss/pg", "control/target", "entropy/rollout"} <= set(logs[0])
    assert not {"control/eps_low", "control/eps_high"} & set(logs[0])
    assert any(entry["entropy/effect_rescale"] != 0 for entry in logs)


def test_trl_trainer_rejects_what_it_does_not_reproduce(tiny_model_path, tmp_path):
    refused = [
        (
            {"loss_type": "vespo"},
            None,
            "loss_type='vespo' (use one of ['bnpo', 'cispo', 'dapo', 'dr_grpo', 'grpo', 'sapo'])",
        ),
        (
            {"loss_type": "sapo", "importance_sampling_level": "sequence"},
            None,
            "importance_sampling_level='sequence' with loss_type='sapo' (GSPO: use one of ('grpo', 'bnpo', "
            "'dr_grpo', 'dapo'))",
        ),
        (
            {"loss_type": "cispo"},
            None,
            "loss_type='cispo' with epsilon_high=0.1 (the cap on the ratio: use >= 1)",
        ),
        (
            {"importance_sampling_level": "sequence"},
            ControlConfig(kind="clip_low", target=3.0),
            "control.kind='clip_low' with loss_type='dapo', importance_sampling_level='sequence' (use static "
            "or entropy_bonus)",
        ),
        ({}, ControlConfig(kind="kl_cov"), "control.kind='kl_cov'"),
    ]
    for options, control, message in refused:
        with pytest.raises(ValueError) as error:
            trl_trainer(tiny_model_path, tmp_path, control=control, **options)
        assert "\n" not in str(error.value) and message in str(error.value), options
