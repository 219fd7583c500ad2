"""Update time of each ``loss.kind`` against ``ppo``'s: ``entroclip.update.run_update`` on the batch of
configs/quick.yaml (128 sequences, 6 new tokens, 4 epochs x 4 minibatches, attribution on) of the built-in
tiny-0.1m, eager, every kind interleaved with ppo in the same rounds so that the paired ratios cancel the
machine's drift. Each update starts from the same weights and a fresh optimizer.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import common_rl
import harness

NAME = "losses"
TITLE = "Update time of each loss kind"
GOAL = 0.10
KINDS = ("gspo", "cispo", "sapo", "ce_gppo")


def run(quick: bool, threads: int) -> dict[str, Any]:
    from entroclip.allocator import keep_freed_memory
    from entroclip.losses import PolicyLossKind

    keep_freed_memory()  # as the trainer does by default (run.keep_freed_memory)
    reps = 3 if quick else 21
    with tempfile.TemporaryDirectory() as tmp:
        rig = common_rl.tiny_rig(Path(tmp) / "tiny")
        ppo = common_rl.quick_settings(True)
        variants = {"ppo": ppo} | {k: replace(ppo, policy_loss=PolicyLossKind(k)) for k in KINDS}  # type: ignore[arg-type]
        fns = {name: (lambda s=settings: rig.update(s)) for name, settings in variants.items()}
        times = harness.interleaved(fns, reps=reps, warmup=1, setup=lambda _: rig.reset())
    rows, goals = [], []
    for kind in KINDS:
        ratio = harness.paired_ratio(times[kind], times["ppo"])
        shown = f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]"
        rows.append([kind, harness.spread(times[kind]), harness.spread(times["ppo"]), shown])
        goals.append(harness.goal(f"{kind} within 10% of ppo (tiny-0.1m)", shown, abs(ratio[0] - 1) < GOAL))
    table = harness.table(
        f"run_update, 16 minibatch steps of 32 sequences, tiny-0.1m, eager, {reps} interleaved rounds: times "
        "are medians; the ratio is the median of the rounds' paired ratios with a bootstrap 95% interval",
        ["loss.kind", "ms median [min-max]", "ppo, same rounds", "kind / ppo [95% CI]"],
        rows,
    )
    met = [g["met"] for g in goals]
    prose = (
        "Each kind's loss, events and generalised ledger (`entroclip.losses`) replace PPO's surrogate and "
        "clip attribution inside the same minibatch step; the forward pass, the vocabulary pass and the "
        "optimizer step are the same. "
        + (
            "Every kind is within 10% of ppo."
            if all(met)
            else "Outside 10%: " + "; ".join(g["goal"] for g in goals if not g["met"]) + "."
        )
    )
    return harness.result(NAME, TITLE, quick, threads, [table], goals, prose, data=times)


if __name__ == "__main__":
    harness.main_for(NAME, run, __doc__)
