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


def test_controller_state_survives_resume(tmp_path):
    from support import rows, train, without_timings

    from entroclip.config import load_config
    from entroclip.trainer import Trainer

    ctl = ["control.kind=clip_low", "control.target_ratio=1.1", "control.smoothing=0.5"]
    full = train(tmp_path, "run.steps=4", *ctl, name="full")
    part = train(tmp_path, "run.steps=2", *ctl, name="part")
    Trainer(load_config(part / "config.yaml", ["run.steps=4"]), resume=True).train(show_progress=False)
    assert without_timings(rows(part)) == without_timings(rows(full))
