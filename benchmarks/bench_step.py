"""One full RL step (rollout + reward + mu-epoch update) of entroclip's Trainer against TRL's GRPOTrainer.

Both sides: the built-in tiny-0.1m model (seed 0, the same initial weights), 2-digit addition prompts,
16 prompts x group 8 = 128 completions per step, 6 new tokens, temperature 1, top-p 1, Bernoulli(0.5)
rewards, no std scaling (Dr.GRPO advantages), eps 0.2/0.2, token-mean loss, no KL, 4 passes (entroclip
``optim.epochs``, TRL ``num_iterations``) x 4 minibatches of 32 (``optim.minibatches``,
``steps_per_generation``), i.e. 16 optimizer steps per RL step, AdamW (fused) lr 1e-4 constant, grad clip 1.

entroclip: ``Trainer.train_step`` on configs/quick.yaml (its default diagnostics: probe entropy on 64 fixed
sequences, clip attribution) with ``run.compile`` (the fast path) and eagerly, and with ``run.compile`` and
the probe and attribution off. TRL: its defaults but gradient checkpointing off, its defaults, and
``torch_compile=True`` (checkpointing off). TRL: the wall time between
the ends of every 16th optimizer step (one generation each) of ``GRPOTrainer.train``. Each step is split into
collecting the batch (entroclip ``Trainer.collect``, TRL ``_generate_and_score_completions``: sampling,
rewards, old log-probs, advantages) and the rest (the 16 minibatch steps, and the diagnostics or logging).
Every side runs in fresh processes, alternated over rounds; the first two RL steps of each process are a
warm-up (compilation) and not counted.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

NAME = "step"
TITLE = "One full RL step: entroclip Trainer vs TRL GRPOTrainer"
PROMPTS, GROUP, NEW_TOKENS, EPOCHS, MINIBATCHES = 16, 8, 6, 4, 4
STEPS_PER_RL_STEP = EPOCHS * MINIBATCHES
LEAN = ["diagnostics.probe_prompts=0", "diagnostics.attribution=false"]
COMPILE = ["run.compile=true"]
WARMUP = 2
SIDES = ["entroclip-compile", "entroclip", "entroclip-lean-compile", "trl", "trl-defaults", "trl-compile"]


def trl_available() -> tuple[bool, str]:
    if importlib.util.find_spec("trl") is None:
        return False, "trl not installed"
    try:
        import trl

        return True, trl.__version__
    except Exception as err:  # an installed but broken trl is reported, not fatal
        return False, f"trl not importable ({type(err).__name__}: {err})"


# ----- children ---------------------------------------------------------------------------------------
def clock(obj: Any, method: str, seconds: list[float]) -> None:
    """Wrap ``obj.method`` so that the wall time of every call is appended to ``seconds``."""
    inner = getattr(obj, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(obj, method, timed)


def child_entroclip(steps: int, threads: int, lean: bool, compiled: bool) -> dict[str, Any]:
    from rich.console import Console

    from entroclip.config import load_config
    from entroclip.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"run.out_dir={tmp}/run",
            f"run.threads={threads}",
            "run.tensorboard=false",
            "run.checkpoint_every=0",
            f"run.steps={steps}",
            *(LEAN if lean else []),
            *(COMPILE if compiled else []),
        ]
        config = load_config(harness.REPO / "configs" / "quick.yaml", overrides)
        trainer = Trainer(config, overwrite=True, console=Console(quiet=True))
        times: list[float] = []
        collect: list[float] = []
        parts = []
        clock(trainer, "collect", collect)
        for step in range(1, steps + 1):
            start = time.perf_counter()
            metrics = trainer.train_step(step)
            times.append(time.perf_counter() - start)
            trainer.step = step
            parts.append({k: metrics[k] for k in ("time/rollout_s", "time/reward_s", "time/update_s")})
    return {"times": times, "collect": collect, "parts": parts}


def child_trl(steps: int, threads: int, checkpointing: bool, compiled: bool = False) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    harness.pin_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = harness.builtin_policy("tiny-0.1m", Path(tmp) / "init_model", seed=0)
        from entroclip.tasks import make_task

        task = make_task("addition", digits=2)
        prompts = [e.prompt for e in task.examples(PROMPTS * steps, seed=0)]
        rng = random.Random(0)

        def bernoulli_reward(completions: list[str], **_: Any) -> list[float]:
            return [float(rng.random() < 0.5) for _ in completions]

        ends: list[float] = []

        class StepClock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                if state.global_step % STEPS_PER_RL_STEP == 0:
                    ends.append(time.perf_counter())

        args = GRPOConfig(
            output_dir=str(Path(tmp) / "trl"),
            per_device_train_batch_size=PROMPTS * GROUP // MINIBATCHES,
            gradient_accumulation_steps=1,
            steps_per_generation=MINIBATCHES,
            num_generations=GROUP,
            num_iterations=EPOCHS,
            max_completion_length=NEW_TOKENS,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            epsilon=0.2,
            epsilon_high=0.2,
            loss_type="bnpo",
            scale_rewards="none",
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch_fused",
            max_steps=STEPS_PER_RL_STEP * steps,
            logging_steps=STEPS_PER_RL_STEP,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            log_completions=False,
            gradient_checkpointing=checkpointing,
            torch_compile=compiled,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=bernoulli_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            callbacks=[StepClock()],
        )
        collect: list[float] = []
        clock(trainer, "_generate_and_score_completions", collect)
        torch.set_num_threads(threads)
        trainer.train()
    return {"times": [b - a for a, b in itertools.pairwise(ends)], "collect": collect}


# ----- the benchmark -----------------------------------------------------------------------------------
def run(quick: bool, threads: int) -> dict[str, Any]:
    # steps per process; the first WARMUP are not timed (compilation: the first step compiles the update and
    # the no-grad passes, the second the no-grad passes again, now in training mode)
    rounds, steps = (1, 4) if quick else (3, 7)
    has_trl, trl_info = trl_available()
    sides = ["entroclip-compile", "entroclip", "entroclip-lean-compile"]
    sides += ["trl", "trl-defaults", "trl-compile"] if has_trl else []
    times: dict[str, list[float]] = {s: [] for s in sides}
    warmup: dict[str, list[float]] = {s: [] for s in sides}
    collect: dict[str, list[float]] = {s: [] for s in sides}
    parts: dict[str, list[dict[str, float]]] = {s: [] for s in sides if s.startswith("entroclip")}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for side in sides:
            if side in failed:
                continue
            args = ["--side", side, "--steps", str(steps), "--threads", str(threads)]
            try:
                out = harness.run_child(__file__, args)
            except RuntimeError as err:  # TRL with torch_compile is an extra row: report, do not stop
                if side != "trl-compile":
                    raise
                failed[side] = str(err).strip().splitlines()[-1][:300]
                continue
            times[side].extend(out["times"][WARMUP:])
            warmup[side].append(sum(out["times"][:WARMUP]))
            collect[side].extend(out["collect"][WARMUP:])
            if side in parts:
                parts[side].extend(out["parts"][WARMUP:])
    sides = [s for s in sides if times[s]]
    rest = {s: [t - c for t, c in zip(times[s], collect[s], strict=True)] for s in sides}
    labels = {
        "entroclip-compile": (
            "entroclip Trainer.train_step, run.compile (quick.yaml: probe entropy + attribution)"
        ),
        "entroclip": "entroclip Trainer.train_step, eager (quick.yaml)",
        "entroclip-lean-compile": "entroclip, run.compile, probe and attribution off",
        "trl": f"TRL {trl_info} GRPOTrainer, gradient checkpointing off",
        "trl-defaults": f"TRL {trl_info} GRPOTrainer, gradient checkpointing on (GRPOConfig's default)",
        "trl-compile": f"TRL {trl_info} GRPOTrainer, gradient checkpointing off, torch_compile=True",
    }
    rows = []
    for side in sides:
        row = [
            labels[side],
            len(times[side]),
            harness.spread(times[side]),
            f"{harness.median(warmup[side]):.1f}",
            f"{1e3 * harness.median(collect[side]):.1f}",
            f"{1e3 * harness.median(rest[side]):.1f}",
        ]
        if side in parts:
            for key in ("time/rollout_s", "time/update_s"):
                row.append(f"{1e3 * harness.median([p[key] for p in parts[side]]):.1f}")
        else:
            row += ["", ""]
        if has_trl:
            row.append(f"{harness.median(times[side]) / harness.median(times['trl']):.3f}")
        rows.append(row)
    header = [
        "implementation",
        "steps timed",
        "RL step, ms median [min-max]",
        f"first {WARMUP} steps (untimed warm-up, compilation), s",
        "collect ms (sampling, rewards, old log-probs)",
        "rest ms (16 minibatch steps, diagnostics, logging)",
        "of collect: sampling ms",
        "of rest: the 16 minibatch steps ms",
    ]
    if has_trl:
        header.append("ratio to TRL")
    table = harness.table(
        f"{PROMPTS} prompts x {GROUP} completions, {NEW_TOKENS} new tokens, {EPOCHS} x {MINIBATCHES} "
        f"minibatch steps, {threads} threads; {rounds} fresh process(es) per side, alternated",
        header,
        rows,
    )
    data = {"times": times, "warmup": warmup, "collect": collect, "parts": parts, "trl": trl_info}
    data["failed"] = failed
    if not has_trl:
        prose = (
            f"skipped: {trl_info} (the entroclip rows are measured; the TRL comparison needs "
            "`pip install trl`)."
        )
        goals = [harness.goal("entroclip step <= 0.5 x TRL", f"skipped: {trl_info}", None)]
        return harness.result(NAME, TITLE, quick, threads, [table], goals, prose, data=data)
    t = {side: harness.median(v) for side, v in times.items() if v}
    ratio, eager, lean, vs_defaults = (
        t["entroclip-compile"] / t["trl"],
        t["entroclip"] / t["trl"],
        t["entroclip-lean-compile"] / t["trl"],
        t["entroclip-compile"] / t["trl-defaults"],
    )
    vs_compiled = (
        f"; vs TRL with torch_compile: {t['entroclip-compile'] / t['trl-compile']:.3f}"
        if ("trl-compile" in t)
        else ""
    )
    goals = [
        harness.goal(
            "entroclip median RL step <= 0.5 x TRL's (both without gradient checkpointing)",
            f"{ratio:.3f} with run.compile (eager: {eager:.3f}; run.compile without probe and attribution: "
            f"{lean:.3f}; vs TRL's defaults: {vs_defaults:.3f}{vs_compiled})",
            ratio <= 0.5,
        )
    ]
    ms = {side: 1e3 * harness.median(v) for side, v in rest.items()}
    update_ms = {s: 1e3 * harness.median([p["time/update_s"] for p in parts[s]]) for s in parts if parts[s]}
    trl_compiled = (
        f" TRL with `torch_compile=True` (the Hugging Face Trainer compiles the model) takes "
        f"{1e3 * t['trl-compile']:.0f} ms per step ({t['trl-compile'] / t['trl']:.2f}x its eager step)."
        if "trl-compile" in t
        else f" TRL with `torch_compile=True` did not run: {failed.get('trl-compile', 'not measured')}."
    )
    prose = (
        "Both sides sample with Hugging Face `generate` (KV cache), score, compute the old log-probs in one "
        "forward pass over the batch, and take the same 16 clipped minibatch steps (forward, backward, "
        "gradient clipping, AdamW) of 32 completions each on the same model. entroclip's minibatches hold "
        "whole groups (4 prompts x 8 completions, `optim.group_minibatches`, as verl's do) and its forward "
        "passes run each prompt once, all but its last token, for the 8 completions that share it (a KV "
        "cache with gradients); TRL's minibatches are completions shuffled across groups, each with its "
        "own prompt pass. Besides, entroclip's step computes the rollout "
        "entropy in the pass that gives the old log-probs, the probe entropy (a forward pass over 64 "
        "fixed sequences) after the update, and kappa and the clip attribution in every minibatch step; "
        "TRL's computes per-token entropies in every minibatch step and its logging. TRL's `GRPOConfig` "
        "turns gradient checkpointing on by default (a second forward pass in every backward); the goal is "
        "judged against TRL with it off, the faster and like-for-like setting. With `run.compile` the "
        "update's forward and backward passes (with the per-token statistics, the loss and the step's "
        "statistics) and the no-grad passes of the old log-probs and the probe run as `torch.compile`d "
        "graphs (inductor, C++ wrapper, plain attention); the first two steps of a process compile "
        "(untimed, column 4). entroclip's median step is "
        f"{ratio:.2f}x TRL's with `run.compile` (goal <= 0.5: {'met' if ratio <= 0.5 else 'missed'}), "
        f"{eager:.2f}x eager, {vs_defaults:.2f}x TRL with its defaults, and {lean:.2f}x with `run.compile` "
        f"and the probe and attribution off. Collecting the batch takes "
        f"{1e3 * harness.median(collect['entroclip-compile']):.0f} ms in entroclip with `run.compile` and "
        f"{1e3 * harness.median(collect['trl']):.0f} ms in TRL; the rest of the step "
        f"{ms['entroclip-compile']:.0f} and {ms['trl']:.0f} ms, of which entroclip's 16 minibatch steps "
        f"are {update_ms['entroclip-compile']:.0f} ms ({update_ms['entroclip']:.0f} ms eager). Eagerly, "
        "the shared prompt pass saves about as much as its second forward call costs on this 6-token "
        f"prompt; compiled, both calls are one graph.{trl_compiled}"
    )
    return harness.result(NAME, TITLE, quick, threads, [table], goals, prose, data=data)


def main() -> None:
    import argparse

    parser = harness.command_line(__doc__)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    harness.pin_threads(args.threads)
    if args.child_json is not None:
        if args.side.startswith("trl"):
            checkpointing = args.side == "trl-defaults"
            out = child_trl(args.steps, args.threads, checkpointing, compiled=args.side == "trl-compile")
        else:
            lean, compiled = "lean" in args.side, "compile" in args.side
            out = child_entroclip(args.steps, args.threads, lean, compiled)
        harness.write_json_atomic(args.child_json, out)
        return
    harness.emit(run(args.quick, args.threads), args.json)


if __name__ == "__main__":
    main()
