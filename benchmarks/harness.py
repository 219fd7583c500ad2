"""Shared pieces of the benchmark suite: thread pinning, timing, the machine, models, results.

Every benchmark module exposes ``NAME``, ``TITLE`` and ``run(quick: bool, threads: int) -> dict`` and can
also be run on its own (``python benchmarks/bench_NAME.py [--quick] [--threads N] [--json FILE]``).
``run`` returns a JSON-able result::

    {"name", "title", "quick", "threads",
     "tables": [{"title", "header": [...], "rows": [[...], ...]}],
     "goals": [{"goal", "measured", "met": true | false | null}],
     "prose": "markdown paragraph(s)", "notes": ["..."]}

Timings are wall-clock medians over several repetitions; alternatives that are compared are run
interleaved (A B A B ...) so that a change of machine load hits both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
ADDITION_ALPHABET = "0123456789+="


# ----- threads, timing ------------------------------------------------------------------------------
def pin_threads(threads: int) -> None:
    """Fix torch's intra-op (and, where still possible, inter-op) thread count."""
    import torch

    torch.set_num_threads(threads)
    # fails when already set, or once parallel work has run in this process
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """``median [min-max]`` of a list of seconds, in milliseconds."""
    return f"{1e3 * median(values):.1f} [{1e3 * min(values):.1f}-{1e3 * max(values):.1f}]"


def paired_ratio(
    times: list[float], baseline: list[float], resamples: int = 4000
) -> tuple[float, float, float]:
    """Median over rounds of ``times[i] / baseline[i]`` (two functions timed in the same rounds of
    :func:`interleaved`, so that slow stretches of a shared machine hit both), with a 95% percentile
    bootstrap interval over the rounds (seeded: the same data give the same interval)."""
    ratios = [a / b for a, b in zip(times, baseline, strict=True)]
    draw = random.Random(0)
    medians = sorted(median(draw.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    setup: Callable[[str], Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds of ``reps`` calls of each function, run round-robin (the order rotates every round) after
    ``warmup`` untimed rounds. ``setup(name)`` runs untimed before each call."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + reps):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if setup is not None:
                setup(name)
            seconds = time_call(fns[name])
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def lower_oom_priority() -> None:
    """Make this process the OOM killer's first choice, so a memory-hungry measurement can only kill
    itself, never a neighbour."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


# ----- the machine ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import torch
    import transformers

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    mem_total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) * 1024
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "memory_gib": round(mem_total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ----- models -----------------------------------------------------------------------------------------
def addition_prompts(prompts: int, group_size: int, seed: int = 0) -> list[str]:
    """``prompts`` 2-digit addition prompts (configs/quick.yaml's task), each repeated ``group_size``
    times consecutively, as the trainer lays them out."""
    from entroclip.tasks import make_task

    task = make_task("addition", digits=2)
    return [e.prompt for e in task.examples(prompts, seed=seed) for _ in range(group_size)]


def builtin_policy(name: str, folder: Path, seed: int = 0) -> tuple[Any, Any]:
    """A built-in model over the addition alphabet, saved and loaded back as the trainer does."""
    from entroclip.policy.builtin import save_builtin
    from entroclip.policy.loading import load_policy

    if not (folder / "config.json").is_file():
        save_builtin(name, ADDITION_ALPHABET, seed, folder)
    return load_policy(folder)


WORD_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")


def wide_policy(
    folder: Path, vocab: int, layers: int = 2, hidden: int = 64, heads: int = 4, seed: int = 0
) -> tuple[Any, Any]:
    """A tiny Llama with a large word-level vocabulary (``w0`` ... ``w{vocab-5}`` plus the built-in
    models' four special tokens), saved and loaded back through ``load_policy``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from entroclip.policy.loading import load_policy

    if not (folder / "config.json").is_file():
        words = [*WORD_SPECIALS, *(f"w{i}" for i in range(vocab - len(WORD_SPECIALS)))]
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="<pad>",
            eos_token="<eos>",
            bos_token="<bos>",
            unk_token="<unk>",
        )
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return load_policy(folder)


def word_prompts(vocab: int, prompts: int, group_size: int, length: int = 8, seed: int = 0) -> list[str]:
    """Random prompts of ``length`` words for :func:`wide_policy`, each repeated ``group_size`` times."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        text = " ".join(f"w{rng.randrange(vocab - len(WORD_SPECIALS))}" for _ in range(length))
        out.extend([text] * group_size)
    return out


# ----- results ----------------------------------------------------------------------------------------
def result(
    name: str,
    title: str,
    quick: bool,
    threads: int,
    tables: list[dict[str, Any]],
    goals: list[dict[str, Any]],
    prose: str,
    notes: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "quick": quick,
        "threads": threads,
        "tables": tables,
        "goals": goals,
        "prose": prose,
        "notes": notes or [],
        "data": data or {},
    }


def table(title: str, header: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"title": title, "header": header, "rows": [[str(c) for c in row] for row in rows]}


def goal(text: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"goal": text, "measured": measured, "met": met}


def skipped(name: str, title: str, quick: bool, threads: int, reason: str) -> dict[str, Any]:
    return result(name, title, quick, threads, [], [], f"skipped: {reason}", data={"skipped": reason})


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def run_child(script: str, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run ``script`` (a benchmark module's ``__file__``) in a fresh process with ``--child-json PATH``
    and ``args``; returns the JSON it wrote. RuntimeError with the end of its stderr when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(script).resolve()), "--child-json", str(path), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(path.read_text())


def command_line(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark module takes when run on its own (``--quick``, ``--threads``,
    ``--json``); a module adds its hidden child-process options to it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (few repetitions)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", type=Path, help="write the result here (JSON)")
    return parser


def emit(out: dict[str, Any], path: Path | None) -> None:
    """Write a result to ``path`` (atomically), or print it as JSON where there is none."""
    if path is not None:
        write_json_atomic(path, out)
    else:
        json.dump(out, sys.stdout, indent=1)
        print()


def main_for(name: str, run: Callable[[bool, int], dict[str, Any]], doc: str | None) -> None:
    """Command line of one benchmark module run on its own."""
    args = command_line(doc).parse_args()
    pin_threads(args.threads)
    emit(run(args.quick, args.threads), args.json)
