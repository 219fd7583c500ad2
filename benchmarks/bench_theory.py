"""Theory lab speed: 10,000 parallel tabular policies of 1,000 actions, time per update and per 1,000.

``entroclip.theory.simulation.simulate_trajectory`` from a Zipf policy (one context), GRPO batches of 4
prompts x group 8 from pi_old, 4 minibatches per update (4 inner optimiser steps), no theory tracking,
for each optimiser (pg, npg, adam) in float64 (the lab's default) and float32. A *step* is one inner
optimiser step of all 10,000 policies. Each repetition times a run of 10 updates and a run of none (the
setup: broadcasting the start policy, the first entropies), interleaved; the time per update is their
difference over 10, and 1,000 updates are projected as setup + 1,000 x that.

Where ``results/theory_before.json`` exists (this benchmark run on the lab before its speed-up, e.g. with
``PYTHONPATH`` pointing at an older checkout's ``src``), its times are shown next to these.
"""

from __future__ import annotations

import json
from typing import Any

import harness

NAME = "theory"
TITLE = "Theory lab: 10,000 tabular policies of 1,000 actions"
SEEDS, ACTIONS, UPDATES = 10_000, 1_000, 1_000
#: The goal: 1,000 updates of 10,000 policies of 1,000 actions well under a minute on 2 cores.
GOAL_SECONDS, GOAL_THREADS = 60.0, 2
BEFORE = harness.BENCH_DIR / "results" / "theory_before.json"


def api() -> tuple[Any, ...] | str:
    """The theory lab's functions, or why they are not there."""
    try:
        from entroclip.theory.policies import initial_logits
        from entroclip.theory.simulation import simulate_trajectory
        from entroclip.theory.updates import DEFAULT_LR, LabConfig
    except ImportError as err:
        return f"the theory lab's Python API is not available ({err})"
    return initial_logits, simulate_trajectory, DEFAULT_LR, LabConfig


def projection(times: dict[str, list[float]], updates: int) -> tuple[float, float]:
    """Seconds per update and projected seconds for ``UPDATES`` updates from timed runs of 0 and
    ``updates`` updates."""
    setup, total = harness.median(times["setup"]), harness.median(times["run"])
    per_update = (total - setup) / updates
    return per_update, setup + UPDATES * per_update


def before() -> dict[str, float]:
    """Projected seconds for ``UPDATES`` updates per ``optimiser/dtype`` from ``BEFORE`` (empty if absent)."""
    if not BEFORE.is_file():
        return {}
    data = json.loads(BEFORE.read_text())["data"]
    return {setting: projection(times, times["updates"])[1] for setting, times in data.items()}


def goal(dtype: str, projected: dict[str, float], threads: int) -> dict[str, Any]:
    """The speed goal for one dtype, judged only at the goal's thread count."""
    measured = ", ".join(f"{optimiser} {seconds:.0f} s" for optimiser, seconds in projected.items())
    met = max(projected.values()) < GOAL_SECONDS if threads == GOAL_THREADS else None
    return harness.goal(
        f"1,000 updates of 10,000 x 1,000 policies < {GOAL_SECONDS:.0f} s on {GOAL_THREADS} cores ({dtype})",
        f"{measured} (projected, {threads} threads)",
        met,
    )


def update_parts(torch: Any, logits: Any, config: Any, seeds: int, per_update: float, reps: int) -> dict:
    """Table: each part of a pg update timed alone on the policies of the first table (one pass of 4
    minibatches: 1 sampling, 4 surrogate evaluations, a sparse first step, 3 dense steps, 1 entropy
    pass), with the share of ``per_update`` (seconds) it accounts for."""
    from entroclip.theory.simulation import broadcast_policy
    from entroclip.theory.softmax import SoftmaxState
    from entroclip.theory.updates import sample_batch, surrogate_weights

    policy = broadcast_policy(logits, seeds)
    generator = torch.Generator().manual_seed(1)
    minibatch = next(sample_batch(policy, config, generator).minibatches(config.minibatches))
    actions, contexts = minibatch.flat_actions, minibatch.contexts
    logp = policy.log_probs_at(actions, contexts)
    # steps small enough that the repeated calls leave the policy where it was, to a few percent
    deltas = 1e-3 * torch.randn(actions.shape, generator=generator, dtype=logits.dtype)
    coefficient = 1e-3 * torch.randn(seeds, 1, generator=generator, dtype=logits.dtype)
    draws = config.prompts * config.group_size
    parts = {
        f"sampling ({draws} draws per policy)": (1, lambda: policy.sample(draws, generator)),
        "advantages (random rewards)": (
            1,
            lambda: config.reward.sample_advantages(
                (seeds, config.prompts), config.group_size, generator, logits.dtype
            ),
        ),
        "log pi of a minibatch's samples": (4, lambda: policy.log_probs_at(actions, contexts)),
        "surrogate weights (core objective)": (
            4,
            lambda: surrogate_weights(
                logp, minibatch.logp_old, minibatch.advantages, config.clip, policy.logits.numel()
            ),
        ),
        "sparse step (the first)": (1, lambda: policy.add_at(actions, contexts, deltas)),
        "dense step along pi": (3, lambda: policy.step_along_probs(coefficient)),
        "entropy pass": (
            1,
            lambda: SoftmaxState(policy.logits, policy.weights, policy.log_norm).entropy(),
        ),
    }
    times = harness.interleaved({name: fn for name, (_, fn) in parts.items()}, reps=reps, warmup=2)
    rows, accounted = [], 0.0
    for name, (calls, _) in parts.items():
        per_call = harness.median(times[name])
        accounted += calls * per_call
        share = f"{100 * calls * per_call / per_update:.0f}%"
        rows.append([name, calls, harness.spread(times[name]), f"{1e3 * calls * per_call:.1f}", share])
    rest = per_update - accounted
    rows.append(
        ["the rest (Python, small ops)", "-", "-", f"{1e3 * rest:.1f}", f"{100 * rest / per_update:.0f}%"]
    )
    header = ["part", "calls per update", "ms per call, median [min-max]", "ms per update", "share"]
    title = (
        f"Where a pg update goes: {seeds:,} x {ACTIONS:,} float64, each part timed alone "
        f"({reps} interleaved rounds), against {1e3 * per_update:.1f} ms per update above"
    )
    return harness.table(title, header, rows)


def run(quick: bool, threads: int) -> dict[str, Any]:
    import torch

    found = api()
    if isinstance(found, str):
        return harness.skipped(NAME, TITLE, quick, threads, found)
    from entroclip.allocator import keep_freed_memory

    keep_freed_memory()  # as `entroclip theory` does
    initial_logits, simulate_trajectory, default_lr, lab_config = found
    seeds = 1_000 if quick else SEEDS
    updates, reps = (2, 2) if quick else (10, 5)
    dtypes = ["float64", "float32"]
    settings = [(optimiser, dtype) for dtype in dtypes for optimiser in ("pg", "npg", "adam")]
    if quick:
        settings = settings[:1]
    rows, data = [], {}
    previous = {} if quick else before()
    projected: dict[str, dict[str, float]] = {dtype: {} for dtype in dtypes}
    for optimiser, dtype in settings:
        config = lab_config(optimiser=optimiser, lr=default_lr[optimiser], minibatches=4, prompts=4)
        steps = config.passes * config.minibatches
        logits = initial_logits("zipf", ACTIONS, 1, 1.0, dtype=getattr(torch, dtype))

        def trajectory(length: int, config: Any = config, logits: Any = logits) -> Any:
            return simulate_trajectory(logits, config, length, seeds, torch.Generator().manual_seed(0))

        times = harness.interleaved(
            {"setup": lambda: trajectory(0), "run": lambda: trajectory(updates)}, reps=reps, warmup=1
        )
        per_update, projected[dtype][optimiser] = projection(times, updates)
        data[f"{optimiser}/{dtype}"] = {**times, "updates": updates, "steps_per_update": steps}
        earlier = previous.get(f"{optimiser}/{dtype}")
        rows.append(
            [
                optimiser,
                dtype,
                harness.spread(times["run"]),
                f"{1e3 * harness.median(times['setup']):.0f}",
                f"{1e3 * per_update:.1f}",
                f"{1e3 * per_update / steps:.1f}",
                f"{seeds * steps / per_update:.3g}",
                f"{projected[dtype][optimiser]:.1f}",
                "-" if earlier is None else f"{earlier:.1f}",
                "-" if earlier is None else f"{earlier / projected[dtype][optimiser]:.2f}",
            ]
        )
    pg = data.get("pg/float64")
    parts = None
    if pg is not None:
        config = lab_config(optimiser="pg", lr=default_lr["pg"], minibatches=4, prompts=4)
        logits = initial_logits("zipf", ACTIONS, 1, 1.0, dtype=torch.float64)
        per_update = projection(pg, updates)[0]
        parts = update_parts(torch, logits, config, seeds, per_update, reps=3 * reps)
    header = [
        "optimiser",
        "dtype",
        f"{updates} updates, ms median [min-max]",
        "setup, ms",
        "ms per update",
        "ms per inner step",
        "policy-steps/s",
        f"{UPDATES:,} updates, s (projected)",
        "before, s (projected)",
        "speed-up",
    ]
    table = harness.table(
        f"{seeds:,} policies x {ACTIONS:,} actions, 1 context, 4 inner steps per update, {threads} threads, "
        f"median of {reps} interleaved runs",
        header,
        rows,
    )
    goals = [] if quick else [goal(dtype, times, threads) for dtype, times in projected.items()]
    prose = (
        "The lab keeps every seed's policy in one `[seeds, contexts, actions]` tensor with its weights "
        "exp(logits) and log normaliser, and steps them all with batched tensor operations. Sampling "
        "goes chunk by chunk of rows: the running sums of the weights in an 8 MiB float64 buffer that "
        "stays in cache, then one binary search per draw (compiled). The surrogate's per-sample weights "
        "are `torch.func.grad` of the core's `surrogate_terms` (one compiled kernel per inner step for "
        "large runs, with the clip fractions). A pg step is a scatter-add for the sampled actions and "
        "one pass over the logits (the step along pi, the new weights and their sums, as one loop "
        "compiled by `torch.compile` for large policies), except an update's first step: at the "
        "sampling policy the step along pi is zero, so that step changes only the sampled logits. An "
        "Adam step is one compiled pass too (gradient, both moments, logits and weights); an npg step "
        "changes only the sampled logits, their weights and the normaliser. Each update also takes the "
        "entropies of the trajectory (one compiled pass). A dense pass computes one `exp` per logit and "
        "reads and writes the logits and weights (4 arrays of 10^7 doubles): on 2 threads it takes "
        "6-7 ms, a row sum of one such array 2.7 ms and a row sum of its `exp` 5.6 ms, so the "
        "exponentials cost about as much as the memory traffic. The second table times each part of a "
        "pg update alone. Timed without theory tracking (`track_theory=False`, as "
        "`entroclip theory trajectory --no-track-theory`), in a process that keeps freed memory as "
        "`entroclip theory` does (`entroclip.allocator.keep_freed_memory`: about 2 ms per pg update); "
        "`benchmarks/theory_speed.py` times whole 1,000-update runs."
    )
    if previous:
        prose += (
            f" The before column is this benchmark run on the lab before its speed-up "
            f"(`results/{BEFORE.name}`)."
        )
    tables = [table] if parts is None else [table, parts]
    return harness.result(NAME, TITLE, quick, threads, tables, goals, prose, data=data)


if __name__ == "__main__":
    harness.main_for(NAME, run, __doc__)
