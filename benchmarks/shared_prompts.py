"""An update with long prompts, with and without the shared prompt pass (run by hand).

    python benchmarks/shared_prompts.py                  # tiny-3m, 16 prompts x 8 of 89 tokens, 16 new tokens

``run_update`` (quick.yaml's settings, attribution on, eager, 1 thread) three ways, interleaved: rows that
share a prompt run its pass once (the default), every row runs its own prompt pass with the same
minibatches of whole groups, and every row runs its own with minibatches of single responses. Prints the
median and [min-max] milliseconds of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import tempfile
from pathlib import Path

import common_rl
import harness
import torch


def long_prompts(prompts: int, group_size: int, terms: int, seed: int = 0) -> list[str]:
    """Sums of ``terms`` 2-digit numbers, each prompt repeated ``group_size`` times."""
    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        out.extend(["+".join(str(rng.randrange(100)) for _ in range(terms)) + "="] * group_size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-3m")
    parser.add_argument("--terms", type=int, default=30, help="numbers per prompt")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = harness.builtin_policy(args.model, Path(tempfile.mkdtemp()))
    prompts = long_prompts(common_rl.PROMPTS, common_rl.GROUP, args.terms)
    batch = common_rl.make_batch(model, tokenizer, prompts, args.new_tokens)
    rollout = batch.rollout
    print(f"{args.model}: rollout {tuple(rollout.input_ids.shape)}, prompt length {rollout.prompt_len}")
    unshared = dataclasses.replace(batch, rollout=dataclasses.replace(rollout, shared=None))
    shared_rig, plain_rig = (
        common_rl.UpdateRig.create(model, batch),
        common_rl.UpdateRig.create(model, unshared),
    )
    groups = common_rl.quick_settings(True)
    singles = dataclasses.replace(groups, group_size=1)
    fns = {
        "shared prompt pass, whole groups": lambda: shared_rig.update(groups),
        "own prompt pass, whole groups": lambda: plain_rig.update(groups),
        "own prompt pass, single responses": lambda: plain_rig.update(singles),
    }
    times = harness.interleaved(
        fns, reps=args.reps, warmup=1, setup=lambda _: (shared_rig.reset(), plain_rig.reset())
    )
    for name, seconds in times.items():
        print(f"{name}: {harness.spread(seconds)} ms")


if __name__ == "__main__":
    main()
