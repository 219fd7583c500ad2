"""End-to-end runs of the RLVR trainer on the built-in tiny model."""

import math
from itertools import combinations

import pytest
import torch
from support import SMALL, rows, train, without_timings
from typer.testing import CliRunner

from entroclip.cli import app
from entroclip.config import load_config
from entroclip.policy.loading import load_policy
from entroclip.rl.evaluate import pass_at_k
from entroclip.trainer import Trainer

EXPECTED = {
    "entropy/rollout",
    "entropy/probe_before",
    "entropy/probe_after",
    "entropy/probe_delta",
    "entropy/effect_low",
    "entropy/effect_high",
    "entropy/effect_pos",
    "entropy/effect_neg",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/dual_mean",
    "reward/mean",
    "reward/errors",
    "response/length_mean",
    "ratio/mean",
    "ratio/max",
    "grad/norm",
    "control/eps_low",
    "time/rollout_s",
    "time/update_s",
}


def test_run_folder_metrics_and_learning(tmp_path):
    run = train(tmp_path, "run.steps=3", "run.tensorboard=true")
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "probe.safetensors",
        "checkpoints/step_000003/model.safetensors",
    ):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    metrics = rows(run)
    assert [r["step"] for r in metrics] == [1, 2, 3]
    assert set(metrics[0]) >= EXPECTED
    for r in metrics:
        assert 0 <= r["clip_ratio/low_mean"] <= 1 and 0 <= r["clip_ratio/high_mean"] <= 1
        assert r["entropy/probe_delta"] == pytest.approx(r["entropy/probe_after"] - r["entropy/probe_before"])
    assert metrics[1]["entropy/probe_before"] == metrics[0]["entropy/probe_after"]
    # the parameters moved away from the initial model
    init, _ = load_policy(run / "init_model")
    final = load_config(run / "config.yaml")
    assert final.run.steps == 3
    from safetensors.torch import load_file

    trained = load_file(str(run / "checkpoints/step_000003/model.safetensors"))
    moved = [not torch.equal(trained[k], v) for k, v in init.state_dict().items() if k in trained]
    assert all(moved)


def test_same_seed_same_metrics(tmp_path):
    a = train(tmp_path, "run.steps=3", name="a")
    b = train(tmp_path, "run.steps=3", name="b")
    c = train(tmp_path, "run.steps=3", "run.seed=1", name="c")
    assert without_timings(rows(a)) == without_timings(rows(b))
    assert without_timings(rows(a)) != without_timings(rows(c))


def test_resume_continues_exactly(tmp_path):
    full = train(tmp_path, "run.steps=4", name="full")
    part = train(tmp_path, "run.steps=2", name="part")
    cfg = load_config(part / "config.yaml", ["run.steps=4"])
    with (part / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/mean": 0.1}\n{"step": 4, "rew')  # rows of a crashed continuation
    Trainer(cfg, resume=True).train(show_progress=False)
    assert without_timings(rows(part)) == without_timings(rows(full))


def test_ppo_with_value_head_kl_and_counterfactual(tmp_path):
    run = train(
        tmp_path,
        "run.steps=2",
        "advantage.kind=gae",
        "loss.kl.coef=0.05",
        "diagnostics.counterfactual_every=1",
        "loss.entropy_coef=0.01",
        "loss.dual_clip=3",
    )
    metrics = rows(run)
    for key in ("loss/value", "value/mean", "kl/ref", "entropy/cf_effect_low", "entropy/cf_effect_high"):
        assert key in metrics[-1] and math.isfinite(metrics[-1][key]), key
    assert metrics[-1]["kl/ref"] > 0  # the policy moved away from the reference


def test_kl_in_reward_and_rloo(tmp_path):
    run = train(tmp_path, "run.steps=2", "advantage.kind=rloo", "loss.kl.coef=0.1", "loss.kl.in_reward=true")
    assert "kl/ref" in rows(run)[-1]


def test_eval_pass_at_k(tmp_path):
    run = train(tmp_path, "run.steps=2", "eval.every=2", "eval.prompts=4", "eval.k=4")
    last = rows(run)[-1]
    assert 0 <= last["eval/pass@1"] <= last["eval/pass@k"] <= 1 and last["eval/k"] == 4


@pytest.mark.parametrize(("n", "c", "k"), [(4, 0, 1), (4, 1, 1), (4, 2, 2), (5, 3, 4), (8, 8, 8), (6, 1, 3)])
def test_pass_at_k_is_the_subset_probability(n, c, k):
    """pass@k = P(a random k-subset of the n samples holds a correct one), by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_on_policy_config_warns(tmp_path, capsys):
    train(tmp_path, "run.steps=1", "optim.epochs=1", "optim.minibatches=1")
    assert "every update is on-policy" in capsys.readouterr().err


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "loss.eps_low=2"], "loss.eps_low"),
        (["--set", "optim.epochs=0"], "optim.epochs"),
        (["--set", "model.builtin=null", "--set", "model.path=/nonexistent"], "model.path"),
        (["--set", "task.name=nope"], "task"),
        (["--set", "reward.name=nope"], "reward"),
        (["--set", "run.bogus=1"], "run.bogus"),
        (["--set", "rollout.backend=vllm"], "rollout.backend=vllm"),
    ],
)
def test_cli_bad_config_exits_2_without_run_folder(tmp_path, args, message):
    out = tmp_path / "never"
    result = runner.invoke(app, ["train", "configs/quick.yaml", "--out", str(out), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_cli_refuses_existing_run_folder(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    result = runner.invoke(app, ["train", "configs/quick.yaml", "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output


def test_a_trace_task_run_logs_where_the_entropy_sits(tmp_path):
    """entropy/trace and entropy/answer are the rollout entropy over the two parts: their token-weighted
    mean is entropy/rollout, so it lies between them."""
    from support import SMALL, rows

    from entroclip.config import load_config
    from entroclip.trainer import Trainer

    overrides = [*SMALL, "task.name=addition_trace", "reward.name=trace_answer", "reward.options={}"]
    overrides += ["rollout.max_new_tokens=24", "eval.reward=trace_answer"]
    config = load_config("configs/quick.yaml", [*overrides, "run.steps=2", f"run.out_dir={tmp_path / 'run'}"])
    Trainer(config).train(show_progress=False)
    for row in rows(tmp_path / "run"):
        low, high = sorted((row["entropy/trace"], row["entropy/answer"]))
        assert low - 1e-9 <= row["entropy/rollout"] <= high + 1e-9


@pytest.mark.parametrize("kind", ["gspo", "cispo", "sapo", "ce_gppo"])
def test_each_loss_kind_trains_and_logs_its_ledger(tmp_path, kind):
    """``entroclip train configs/quick.yaml --set loss.kind=K`` runs (with the counterfactual probe) and logs
    the clip events and the generalised first-order ledger."""
    run = tmp_path / kind
    overrides = [*SMALL, f"loss.kind={kind}", "run.steps=2", "diagnostics.counterfactual_every=1"]
    result = runner.invoke(
        app,
        [
            "train",
            "configs/quick.yaml",
            *[a for o in overrides for a in ("--set", o)],
            "--out",
            str(run),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    last = rows(run)[-1]
    for key in (
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "entropy/effect_low",
        "entropy/effect_high",
        "entropy/effect_pos",
        "entropy/effect_neg",
        "entropy/effect_rescale",
        "entropy/cf_effect_low",
    ):
        assert key in last and math.isfinite(last[key]), key
    assert load_config(run / "config.yaml").loss.kind == kind
