"""Theory lab speed: simulated steps per second for 10,000 parallel tabular policies of 1,000 actions.

``entroclip.theory.simulation.simulate_trajectory`` from a Zipf policy (one context), GRPO batches of 4
prompts x group 8 from pi_old, 4 minibatches per update (4 inner optimiser steps), no theory tracking,
for each optimiser (pg, npg, adam) in float64 (the lab's default) and float32. A *step* is one inner
optimiser step of all 10,000 policies; policy-steps per second = steps per second x 10,000.
"""

from __future__ import annotations

from typing import Any

import harness

NAME = "theory"
TITLE = "Theory lab: 10,000 tabular policies of 1,000 actions"
SEEDS, ACTIONS = 10_000, 1_000


def api() -> tuple[Any, ...] | str:
    """The theory lab's functions, or why they are not there."""
    try:
        from entroclip.theory.policies import initial_logits
        from entroclip.theory.simulation import simulate_trajectory
        from entroclip.theory.updates import DEFAULT_LR, LabConfig
    except ImportError as err:
        return f"the theory lab's Python API is not available ({err})"
    return initial_logits, simulate_trajectory, DEFAULT_LR, LabConfig


def run(quick: bool, threads: int) -> dict[str, Any]:
    import torch

    found = api()
    if isinstance(found, str):
        return harness.skipped(NAME, TITLE, quick, threads, found)
    initial_logits, simulate_trajectory, default_lr, lab_config = found
    seeds = 1_000 if quick else SEEDS
    updates, reps = (2, 2) if quick else (10, 5)
    settings = [("pg", "float64"), ("npg", "float64"), ("adam", "float64"), ("pg", "float32")]
    if quick:
        settings = settings[:1]
    rows, data = [], {}
    for optimiser, dtype in settings:
        config = lab_config(optimiser=optimiser, lr=default_lr[optimiser], minibatches=4, prompts=4)
        steps = updates * config.passes * config.minibatches
        logits = initial_logits("zipf", ACTIONS, 1, 1.0, dtype=getattr(torch, dtype))

        def once(config: Any = config, logits: Any = logits) -> Any:
            return simulate_trajectory(logits, config, updates, seeds, torch.Generator().manual_seed(0))

        times = harness.interleaved({"run": once}, reps=reps, warmup=1)["run"]
        t = harness.median(times)
        data[f"{optimiser}/{dtype}"] = {"times": times, "steps": steps}
        rows.append(
            [
                optimiser,
                dtype,
                f"{updates} x {config.passes * config.minibatches}",
                harness.spread(times),
                f"{1e3 * t / steps:.1f}",
                f"{steps / t:.1f}",
                f"{seeds * steps / t:.3g}",
                f"{seeds * ACTIONS * steps / t:.3g}",
            ]
        )
    header = [
        "optimiser",
        "dtype",
        "updates x inner steps",
        "run, ms median [min-max]",
        "ms per step",
        "steps/s (all policies)",
        "policy-steps/s",
        "logit updates/s",
    ]
    table = harness.table(
        f"{seeds:,} policies x {ACTIONS:,} actions, 1 context, {threads} threads, median of {reps} runs",
        header,
        rows,
    )
    pg = data[f"{settings[0][0]}/{settings[0][1]}"]
    rate = pg["steps"] / harness.median(pg["times"])
    prose = (
        "The lab keeps every seed's policy in one `[seeds, contexts, actions]` tensor and steps them all "
        "with "
        "batched tensor operations (sampling with one `multinomial`, the surrogate's weights from the core "
        "`clipped_surrogate`, a scatter-add for the sampled actions). There is no numeric goal; with "
        f"{seeds:,} policies of {ACTIONS:,} actions the pg lab runs {rate:.1f} inner steps per second "
        f"({seeds * rate:.3g} policy-steps per second) in float64. Timed without theory tracking "
        "(`track_theory=False`, as `entroclip theory trajectory --no-track-theory`)."
    )
    goals = [harness.goal("measure steps/s (no numeric goal)", f"{rate:.1f} steps/s (pg, float64)", None)]
    return harness.result(NAME, TITLE, quick, threads, [table], goals, prose, data=data)


if __name__ == "__main__":
    harness.main_for(NAME, run, __doc__)
