"""Overhead of the entropy controllers on an update step.

Each round runs one controller step (``Controller.act`` on the measured entropy, as the trainer calls it
once per RL step) and ``entroclip.update.run_update`` with the action it returns, on configs/quick.yaml's
batch of the built-in tiny-0.1m (128 sequences, 6 new tokens, 4 epochs x 4 minibatches, attribution on,
eager), against the static controller's step and update in the same rounds. Before timing, every
controller is driven for 30 steps with the entropy at half its target, so that each kind's levers are all
in use (the clip schedule at its loose end, the cascade's token weight and the token-weight controller's
weight non-zero): the costliest action each kind takes. Each update starts from the same weights and a
fresh optimizer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import common_rl
import harness

NAME = "control"
TITLE = "Controller overhead on an update step"
GOAL = 0.02
KINDS = ("clip_low", "clip", "token_weight", "cascade", "entropy_bonus")
START_ENTROPY, LOW_ENTROPY, DRIVE_STEPS = 1.0, 0.4, 30  # nats; the target is 0.8 x the first


def driven(kind: str) -> tuple[Any, Any]:
    """(controller, update settings) of ``kind`` after 30 steps below its target."""
    from entroclip.control import make_controller
    from entroclip.update import RunSettings

    config = common_rl.quick_config(overrides=(f"control.kind={kind}", "control.target_ratio=0.8"))
    controller = make_controller(config.control, config.loss)
    controller.act(1, START_ENTROPY)
    for step in range(2, DRIVE_STEPS + 2):
        controller.act(step, LOW_ENTROPY)
    return controller, RunSettings.from_config(config)


def run(quick: bool, threads: int) -> dict[str, Any]:
    from entroclip.allocator import keep_freed_memory

    keep_freed_memory()  # as the trainer does by default (run.keep_freed_memory)
    reps = 3 if quick else 21
    with tempfile.TemporaryDirectory() as tmp:
        rig = common_rl.tiny_rig(Path(tmp) / "tiny")
        variants = {kind: driven(kind) for kind in ("static", *KINDS)}
        actions = {
            kind: controller.act(DRIVE_STEPS + 2, LOW_ENTROPY) for kind, (controller, _) in variants.items()
        }
        if actions["token_weight"].token_weight == 0.0 or actions["cascade"].token_weight == 0.0:
            raise RuntimeError(f"the token weight is not in use: {actions}")  # the bench would miss its cost

        def step(kind: str) -> None:
            controller, settings = variants[kind]
            rig.update(settings, action=controller.act(DRIVE_STEPS + 2, LOW_ENTROPY))

        fns = {kind: (lambda k=kind: step(k)) for kind in variants}
        times = harness.interleaved(fns, reps=reps, warmup=1, setup=lambda _: rig.reset())
    rows, goals = [], []
    for kind in KINDS:
        ratio = harness.paired_ratio(times[kind], times["static"])
        shown = f"{100 * (ratio[0] - 1):+.1f}% [{100 * (ratio[1] - 1):+.1f}, {100 * (ratio[2] - 1):+.1f}]"
        action = actions[kind]
        rows.append(
            [kind, _levers(action), harness.spread(times[kind]), harness.spread(times["static"]), shown]
        )
        goals.append(harness.goal(f"{kind} overhead < 2% (tiny-0.1m)", shown, ratio[0] - 1 < GOAL))
    table = harness.table(
        f"controller step + run_update, 16 minibatch steps of 32 sequences, tiny-0.1m, eager, {reps} "
        "interleaved rounds: times are medians; the overhead is the median of the rounds' paired ratios "
        "against the static controller, with a bootstrap 95% interval",
        ["control.kind", "action timed", "ms median [min-max]", "static, same rounds", "overhead [95% CI]"],
        rows,
    )
    met = [g["met"] for g in goals]
    prose = (
        "The controllers' own arithmetic is a few Python floats per RL step; what can cost is the lever: "
        "the token-weight term (`entroclip.levers.token_weight_term`, a few [B, T] tensors per minibatch "
        "step) and the entropy bonus's gradient. "
        + (
            "Every controller costs under 2% of an update."
            if all(met)
            else "Over 2%: " + "; ".join(g["goal"] for g in goals if not g["met"]) + "."
        )
    )
    return harness.result(NAME, TITLE, quick, threads, [table], goals, prose, data=times)


def _levers(action: Any) -> str:
    """The action's bounds and coefficients, as the table shows them."""
    return (
        f"eps_low {action.eps_low}, eps_high {action.eps_high}, "
        f"bonus {action.entropy_coef:.3g}, token weight {action.token_weight:.3g}"
    )


if __name__ == "__main__":
    harness.main_for(NAME, run, __doc__)
