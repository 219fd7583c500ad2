"""Run entroclip's benchmark suite and write benchmarks/RESULTS.md (``make bench``).

    .venv/bin/python benchmarks/run.py                     # everything, writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run.py --quick             # smoke run, writes benchmarks/results-quick/
    .venv/bin/python benchmarks/run.py --only entropy --only rollout
    .venv/bin/python benchmarks/run.py --src /tmp/patched/src --out /tmp/after.md   # a patched copy of src
    .venv/bin/python benchmarks/run.py --render-only       # rebuild RESULTS.md from results/*.json

Each benchmark runs in its own process (``benchmarks/bench_NAME.py``) and leaves its result as JSON in the
results folder; RESULTS.md is rebuilt from every JSON there, so ``--only`` refreshes one section and keeps
the others. Timings are medians over several repetitions; compared alternatives run interleaved.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

BENCHMARKS = ["entropy", "overhead", "losses", "control", "rollout", "step", "theory", "flops"]
DEFAULT_THREADS = 1
PROPOSALS = harness.BENCH_DIR / "PROPOSALS.md"
CHANGES = harness.BENCH_DIR / "CHANGES.md"


def git_state(src: Path) -> str:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=harness.REPO, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src")
    state = f"commit {commit}" + (" with uncommitted changes in src/" if dirty else "")
    if src.resolve() != (harness.REPO / "src").resolve():
        state += f"; package imported from {src}"
    return state


def relative(arg: str | Path) -> str:
    """``arg`` relative to the repository when it is a path inside it."""
    path = Path(arg)
    if path.is_absolute() and path.resolve().is_relative_to(harness.REPO):
        return str(path.resolve().relative_to(harness.REPO))
    return str(arg)


def run_one(name: str, args: argparse.Namespace, results: Path) -> dict[str, Any]:
    script = harness.BENCH_DIR / f"bench_{name}.py"
    out = results / f"{name}.json"
    cmd = [sys.executable, str(script), "--threads", str(args.threads), "--json", str(out)]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(args.src), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    meta = {
        "command": shlex.join([".venv/bin/python", *(relative(c) for c in cmd[1:])]),
        "wall_s": round(seconds, 1),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
    }
    if proc.returncode != 0:
        error = proc.stderr.strip().splitlines()[-20:]
        payload = harness.result(name, name, args.quick, args.threads, [], [], "failed: see the error below.")
        payload["error"] = "\n".join(error)
        print(f"[bench] {name} FAILED ({seconds:.0f} s):\n" + "\n".join(error), flush=True)
    else:
        payload = json.loads(out.read_text())
        print(f"[bench] {name} done in {seconds:.0f} s", flush=True)
    payload["meta"] = meta
    harness.write_json_atomic(out, payload)
    return payload


def met_text(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(cell: Any) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return lines


def thread_counts(results: dict[str, dict[str, Any]]) -> str:
    """Which sections ran with how many intra-op threads, as a sentence."""
    by_count: dict[int, list[str]] = {}
    for name, result in results.items():
        by_count.setdefault(int(result["threads"]), []).append(f"`{name}`")
    if len(by_count) == 1:
        (count,) = by_count
        return f"torch used {count} intra-op thread(s) in every section"
    parts = [f"{count} in {', '.join(names)}" for count, names in sorted(by_count.items())]
    return "torch used intra-op threads: " + "; ".join(parts)


def render(results: dict[str, dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    m = info["machine"]
    lines = [
        "# entroclip benchmarks" + (" (quick smoke run)" if args.quick else ""),
        "",
        f"Generated by `{info['command']}` (`make bench` runs `.venv/bin/python benchmarks/run.py`), "
        f"last updated {info['date']}, {info['git']}. Each section lists the command that produced it. "
        "Times are wall-clock medians over several repetitions, with [min-max]; compared alternatives ran "
        "interleaved in the same process, or alternated over fresh processes where a section says so.",
        "",
        "## Machine",
        "",
        *markdown_table(
            ["CPU model", "cores (usable)", "memory", "torch", "transformers", "Python"],
            [
                [
                    m["cpu_model"],
                    f"{m['cores']} ({m['usable_cores']})",
                    f"{m['memory_gib']} GiB",
                    m["torch"],
                    m["transformers"],
                    m["python"],
                ]
            ],
        ),
        "",
        f"The machine is shared: other jobs ran during the measurements (load average {m['load_average']} "
        "when this file was written; each section gives the load before and after its run). "
        f"{thread_counts(results)} (`--threads`, i.e. `torch.set_num_threads`; `run.threads` defaults to 1 "
        "in entroclip, and with other jobs on both cores a second OpenMP thread mostly waits for its time "
        "slice).",
        "",
        "## Summary",
        "",
    ]
    rows = []
    for name in BENCHMARKS:
        r = results.get(name)
        if r is None:
            continue
        if r["data"].get("skipped") or not r["goals"]:
            rows.append([name, "-", r["prose"] if len(r["prose"]) < 120 else "see section", "-"])
        for g in r["goals"]:
            rows.append([name, g["goal"], g["measured"], met_text(g["met"])])
    lines += markdown_table(["benchmark", "goal", "measured", "met"], rows)
    if CHANGES.is_file():
        lines += ["", f"## Changes, before and after (from [{CHANGES.name}]({CHANGES.name}))", ""]
        lines += [CHANGES.read_text().strip()]
    for i, name in enumerate(BENCHMARKS, 1):
        r = results.get(name)
        if r is None:
            continue
        meta = r.get("meta", {})
        lines += ["", f"## {i}. `{name}`: {r['title']}", ""]
        if r.get("quick"):
            lines += ["*Quick smoke run: few repetitions, smaller sizes.*", ""]
        lines += [r["prose"], ""]
        for t in r["tables"]:
            lines += [f"**{t['title']}**", "", *markdown_table(t["header"], t["rows"]), ""]
        for note in r["notes"]:
            lines += [f"Note: {note}", ""]
        if r.get("error"):
            lines += ["```", r["error"], "```", ""]
        if meta:
            lines += [
                f"<sub>`{meta['command']}`: {meta['wall_s']} s, finished {meta['finished']}, load average "
                f"{meta['load_before']} before, {meta['load_after']} after.</sub>",
                "",
            ]
    if PROPOSALS.is_file():
        lines += [
            "## Profiles and proposed changes",
            "",
            "Where a goal is missed, the profile, the cause and the proposed change to `src/` with "
            f"before/after numbers from a patched copy are in [{PROPOSALS.name}]({PROPOSALS.name}).",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fast smoke run (few repetitions, small sizes)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these (repeat or comma-separate): {BENCHMARKS}",
    )
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads (default 1)")
    parser.add_argument(
        "--out",
        type=Path,
        help="markdown file (default benchmarks/RESULTS.md; quick: benchmarks/results-quick/RESULTS.md)",
    )
    parser.add_argument("--src", type=Path, default=harness.REPO / "src", help="import entroclip from here")
    parser.add_argument(
        "--render-only", action="store_true", help="rebuild the markdown from the JSON results, run nothing"
    )
    args = parser.parse_args()
    only = [n.strip() for group in args.only or [] for n in group.split(",") if n.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    selected = [] if args.render_only else [n for n in BENCHMARKS if not only or n in only]
    quick_dir = harness.BENCH_DIR / "results-quick"
    default_out = quick_dir / "RESULTS.md" if args.quick else harness.BENCH_DIR / "RESULTS.md"
    out = (args.out or default_out).resolve()
    if args.out is not None:
        results_dir = out.parent / f"{out.stem}-results"
    else:
        results_dir = quick_dir if args.quick else harness.BENCH_DIR / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    args.src = args.src.resolve()
    machine = harness.machine()
    for name in selected:
        run_one(name, args, results_dir)
    results = {}
    for name in BENCHMARKS:
        path = results_dir / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    info = {
        "command": shlex.join([".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git": git_state(args.src),
        "machine": machine,
    }
    text = render(results, info, args)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"[bench] wrote {out}")


if __name__ == "__main__":
    main()
