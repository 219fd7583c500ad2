"""verl and TRL adapters: the same loss, metrics and controller inside the frameworks' trainers.

The verl loss is checked against verl's own ``vanilla`` loss when ``verl.trainer.ppo.core_algos`` imports,
and always against verl's documented vanilla formula with plain tensors. The TRL trainer is checked
against ``GRPOTrainer._compute_loss`` and by a few CPU training steps of a tiny local model.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from entroclip.config import ConfigError, ControlConfig
from entroclip.integrations import verl as ev
from entroclip.integrations.common import npg_kappa, weighted_advantages
from entroclip.objectives import clipped_surrogate

VERL_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]
ENTROCLIP_KEYS = {
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/dual_mean",
    "ratio/mean",
    "control/eps_low",
    "control/eps_high",
}


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


# ----- verl: against verl's own loss ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("global_info", [False, True])
def test_verl_loss_equals_verls_vanilla_loss(gen, mode, global_info):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig

    assert core_algos.get_policy_loss_fn(ev.LOSS_NAME) is ev.entroclip_policy_loss
    config = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=2,
        clip_ratio_low=0.1,
        clip_ratio_high=0.3,
        clip_ratio_c=1.5,
    )
    if global_info:
        info = {"dp_size": 2, "batch_num_tokens": 60, "global_batch_size": 12, "loss_scale_factor": 10}
        config.global_batch_info.update(info)
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


def test_verl_worker_loss_dispatches_to_entroclip(gen):
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
    for loss_mode in ("vanilla", ev.LOSS_NAME):
        policy_loss = PolicyLossConfig(loss_mode=loss_mode)
        config = ActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_micro_batch_size_per_gpu=2,
            clip_ratio_low=0.1,
            policy_loss=policy_loss,
        )
        loss, metrics = ppo_loss(config, {"log_probs": full.flatten()}, data)
        (grad,) = torch.autograd.grad(loss, full)
        results[loss_mode] = loss, grad, {key: metric.aggregate() for key, metric in metrics.items()}
    (theirs, their_grad, their_metrics), (ours, our_grad, our_metrics) = results.values()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)
    assert set(our_metrics) >= ENTROCLIP_KEYS
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


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_trl_loss_equals_grpo_trainers_loss(tiny_model_path, tmp_path, loss_type):
    from trl import GRPOTrainer

    trainer = trl_trainer(
        tiny_model_path,
        tmp_path,
        attribution="npg",
        loss_type=loss_type,
        beta=0.04,
        entropy_coef=0.01,
        epsilon_high=0.3,
        gradient_accumulation_steps=2,
    )
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 2
    batch = trainer._generate_and_score_completions([prompts()[i] for i in range(2)] * 4)
    noise = torch.Generator().manual_seed(1)
    shape = batch["completion_ids"].shape
    batch["old_per_token_logps"] = batch["ref_per_token_logps"] + 0.3 * torch.randn(shape, generator=noise)
    batch["ref_per_token_logps"] = batch["ref_per_token_logps"] + 0.1 * torch.randn(shape, generator=noise)
    results = []
    for compute_loss in (GRPOTrainer._compute_loss, type(trainer)._compute_loss):
        model.zero_grad()
        loss = compute_loss(trainer, model, batch)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results.append((loss.detach(), grad, logged))
    (theirs, their_grad, their_logs), (ours, our_grad, our_logs) = results
    torch.testing.assert_close(ours, theirs)
    assert their_grad.abs().max() > 0
    torch.testing.assert_close(our_grad, their_grad)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "kl"):
        assert our_logs[key] == pytest.approx(their_logs[key], rel=1e-5), key
    assert their_logs["clip_ratio/low_mean"] > 0 and their_logs["clip_ratio/high_mean"] > 0
    assert "entropy/npg_effect_low" in our_logs


def test_trl_trainer_rejects_what_it_does_not_reproduce(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="loss_type='cispo'"):
        trl_trainer(tiny_model_path, tmp_path, loss_type="cispo")
    with pytest.raises(ValueError, match="control.kind='kl_cov'"):
        trl_trainer(tiny_model_path, tmp_path, control=ControlConfig(kind="kl_cov"))
