"""Config validation: every bad value is an error that names the field."""

import pytest

from entroclip.config import ConfigError, apply_overrides, dump_config, load_config, parse_config

BAD = [
    ({"loss": {"eps_low": 1.5}}, "loss.eps_low"),
    ({"loss": {"eps_low": -0.1}}, "loss.eps_low"),
    ({"loss": {"eps_high": -1}}, "loss.eps_high"),
    ({"loss": {"dual_clip": 1.0}}, "loss.dual_clip"),
    ({"loss": {"agg": "mean"}}, "loss.agg"),
    ({"loss": {"kl": {"kind": "k4"}}}, "loss.kl.kind"),
    ({"optim": {"epochs": 0}}, "optim.epochs"),
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"minibatches": 1000}}, "optim.minibatches"),
    ({"optim": {"minibatches": 20}, "task": {"prompts_per_step": 16}}, "optim.minibatches"),
    ({"rollout": {"group_size": 1}}, "rollout.group_size"),
    ({"rollout": {"temperature": 0}}, "rollout.temperature"),
    ({"rollout": {"top_p": 1.5}}, "rollout.top_p"),
    ({"task": {"prompts_per_step": 0}}, "task.prompts_per_step"),
    ({"model": {"builtin": "tiny-0.1m", "path": "x"}}, "model"),
    ({"run": {"steps": 0}}, "run.steps"),
    ({"run": {"sed": 1}}, "run.sed: unknown key"),
    ({"lossy": {}}, "lossy: unknown key"),
    ({"advantage": {"kind": "ppo"}}, "advantage.kind"),
    ({"advantage": {"kind": "gae", "lam": 2}}, "advantage.lam"),
    ({"reward": {"timeout_s": 0}}, "reward.timeout_s"),
]


@pytest.mark.parametrize(("data", "field"), BAD)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value)
    assert "\n" not in str(err.value)


def test_minibatches_of_single_responses_may_outnumber_the_prompts():
    data = {"optim": {"minibatches": 20, "group_minibatches": False}, "task": {"prompts_per_step": 16}}
    assert parse_config(data).optim.minibatches == 20


def test_group_size_one_is_fine_without_std_normalisation():
    cfg = parse_config(
        {"rollout": {"group_size": 1}, "advantage": {"kind": "drgrpo"}, "optim": {"minibatches": 1}}
    )
    assert cfg.rollout.group_size == 1


def test_overrides_parse_yaml_values():
    data = apply_overrides(
        {}, ["loss.eps_low=none", "loss.eps_high=0.28", "run.out_dir=runs/x", "optim.epochs=2"]
    )
    cfg = parse_config(data)
    assert cfg.loss.eps_low is None and cfg.loss.eps_high == 0.28
    assert cfg.run.out_dir == "runs/x" and cfg.optim.epochs == 2


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["loss.eps_low"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config("configs/quick.yaml", ["loss.eps_low=0.1"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_on_policy_detection():
    assert parse_config({"optim": {"epochs": 1, "minibatches": 1}}).on_policy
    assert not parse_config({}).on_policy
