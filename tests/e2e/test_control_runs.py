"""Every entropy controller in real runs of the trainer, and its state across a resume."""

import pytest


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["control.kind=clip_low", "control.target_ratio=1.2"], {"control/eps_low", "control/integral"}),
        (["control.kind=clip", "control.target_ratio=1.2"], {"control/output", "control/saturated"}),
        (["control.kind=entropy_bonus", "control.target=3.0"], {"control/coef", "control/entropy_coef"}),
        (
            ["control.kind=clip_cov", "control.cov_fraction=0.05", "control.cov_lower=-100"],
            {"clip_ratio/cov_mean"},
        ),
        (["control.kind=kl_cov", "control.cov_fraction=0.05"], {"clip_ratio/cov_mean"}),
        (
            ["control.kind=token_weight", "control.target_ratio=1.2", "control.high_prob=0.02"],
            {"control/token_weight", "token_weight/likely_mean", "entropy/effect_weight"},
        ),
        (
            ["control.kind=cascade", "control.target_ratio=1.5", "control.kp=20", "control.high_prob=0.02"],
            {"control/active", "control/token_weight", "control/coef", "entropy/effect_weight"},
        ),
        (["control.kind=entropy_bonus", "control.coef_rule=pi", "control.target=3.0"], {"control/coef"}),
        (["control.kind=adaptive_entropy", "control.target=3.0"], {"control/coef"}),
        (["loss.top_entropy_quantile=0.2"], {"entropy/effect_cov"}),
    ],
)
def test_trainer_runs_each_controller(tmp_path, overrides, keys):
    from support import rows, train

    metrics = rows(train(tmp_path, "run.steps=2", *overrides))
    assert keys <= set(metrics[-1])
    if "control.kind=kl_cov" in overrides:
        assert "control/eps_low" not in metrics[-1]  # KL-Cov replaces clipping
        assert metrics[-1]["clip_ratio/low_mean"] == 0 and metrics[-1]["clip_ratio/high_mean"] == 0
    if "control.kind=clip_low" in overrides:
        # entropy is below 1.2x its first value, so eps_low leaves 0.2 downwards
        assert metrics[-1]["control/eps_low"] < 0.2
    if "control.kind=token_weight" in overrides:  # too little entropy: the likely tokens held back
        assert metrics[-1]["control/token_weight"] < 0 and metrics[-1]["token_weight/likely_mean"] > 0
    if "control.kind=cascade" in overrides:  # a large error: past the clip, onto the token weights
        assert metrics[-1]["control/active"] >= 1 and metrics[-1]["control/eps_low"] == 0.02  # clip saturated
    if "loss.top_entropy_quantile=0.2" in overrides:  # 80% of the tokens lose their gradient
        assert metrics[-1]["entropy/effect_cov"] != 0


@pytest.mark.parametrize(
    "kind",
    [
        ["control.kind=clip_low"],
        ["control.kind=clip"],
        ["control.kind=token_weight", "control.high_prob=0.02"],
        ["control.kind=cascade", "control.kp=20", "control.high_prob=0.02"],
        ["control.kind=entropy_bonus", "control.coef_rule=pi"],
        ["control.kind=adaptive_entropy"],
    ],
)
def test_controller_state_survives_resume(tmp_path, kind):
    """A run resumed from its step-2 checkpoint logs what the uninterrupted run logs, for every kind."""
    from support import rows, train, without_timings

    from entroclip.config import load_config
    from entroclip.trainer import Trainer

    ctl = [*kind, "control.target_ratio=1.1", "control.smoothing=0.5"]
    full = train(tmp_path, "run.steps=4", *ctl, name="full")
    part = train(tmp_path, "run.steps=2", *ctl, name="part")
    Trainer(load_config(part / "config.yaml", ["run.steps=4"]), resume=True).train(show_progress=False)
    assert without_timings(rows(part)) == without_timings(rows(full))
