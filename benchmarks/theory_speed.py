"""Speed of the theory lab: S parallel policies of n actions, T updates (a trajectory without theory
tracking, as ``entroclip theory trajectory --no-track-theory`` runs it).

    python benchmarks/theory_speed.py                      # 10,000 x 1,000 x 1,000, pg/npg/adam, both dtypes
    python benchmarks/theory_speed.py --updates 100 --dtype float32 --optimiser pg

Prints one line per setting: wall time, milliseconds per update and per inner step, and logit updates
per second (S * K * n * inner steps / time), with the load average before the run. The first run of a
process includes compiling the dense pass (torch.compile; seconds, less once its cache is warm). Timings
depend on the machine's load: run it on an idle one. On cores shared with other jobs, set
``OMP_WAIT_POLICY=PASSIVE`` for two threads: a spinning OpenMP thread that waits for its partner's time
slice at every parallel region can make an update an order of magnitude slower.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from entroclip.theory.policies import initial_logits
from entroclip.theory.simulation import simulate_trajectory
from entroclip.theory.updates import DEFAULT_LR, LabConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=1_000)
    parser.add_argument("--updates", type=int, default=1_000)
    parser.add_argument("--optimiser", nargs="+", default=["pg", "npg", "adam"], choices=list(DEFAULT_LR))
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--minibatches", nargs="+", type=int, default=[4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.seeds} policies x {args.n} actions x {args.updates} updates, {args.threads} threads")
    for dtype in args.dtype:
        for optimiser in args.optimiser:
            for minibatches in args.minibatches:
                config = LabConfig(
                    optimiser=optimiser, lr=DEFAULT_LR[optimiser], minibatches=minibatches, prompts=4
                )
                logits = initial_logits("zipf", args.n, 1, 1.0, dtype=getattr(torch, dtype))
                generator = torch.Generator().manual_seed(0)
                load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
                start = time.perf_counter()
                result = simulate_trajectory(logits, config, args.updates, args.seeds, generator)
                seconds = time.perf_counter() - start
                steps = args.updates * config.passes * config.minibatches
                print(
                    f"{optimiser:4s} {dtype} {steps // args.updates} inner steps/update: {seconds:7.1f} s, "
                    f"{1e3 * seconds / args.updates:6.1f} ms/update, {1e3 * seconds / steps:6.1f} ms/step, "
                    f"{args.seeds * args.n * steps / seconds:.2e} logit updates/s "
                    f"(entropy {result.entropy_mean[0]:.3f} -> {result.entropy_mean[-1]:.3f}; "
                    f"load average before: {load})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
