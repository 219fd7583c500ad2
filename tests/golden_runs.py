"""Golden runs: configs whose ``metrics.jsonl`` (time/* aside) is stored in tests/golden/, so that a change
meant to keep behaviour (a restructuring) is checked bit for bit against the code that wrote them.

Each run is trained in its own process with one thread, torch's portable kernels
(``ATEN_CPU_CAPABILITY=default``) and MKL's reproducible mode (``MKL_CBWR=COMPATIBLE``), so that its
floats do not depend on the CPU's vector width. ``python tests/golden_runs.py`` rewrites the files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).parent.parent

#: name -> overrides of configs/quick.yaml
RUNS: dict[str, list[str]] = {
    "quick": [],
    "gae_kl_clipcov_counterfactual": [
        "run.steps=8",
        "run.checkpoint_every=4",
        "advantage.kind=gae",
        "loss.kl.coef=0.05",
        "control.kind=clip_cov",
        "diagnostics.counterfactual_every=2",
    ],
}
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def train(name: str, out: Path) -> list[dict]:
    """Train golden run ``name`` into ``out``; its metric rows without time/*."""
    sets = [arg for o in [*RUNS[name], f"run.out_dir={out}"] for arg in ("--set", o)]
    command = [sys.executable, "-m", "entroclip", "train", "configs/quick.yaml", *sets, "--no-progress"]
    subprocess.run(
        command, cwd=ROOT, env={**os.environ, **PORTABLE_ENV}, check=True, capture_output=True, timeout=900
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return without_timings([json.loads(line) for line in lines])


def stored(name: str) -> list[dict]:
    return [json.loads(line) for line in (GOLDEN / f"{name}.metrics.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for run_name in RUNS:
            rows = train(run_name, Path(tmp) / run_name)
            text = "".join(json.dumps(row) + "\n" for row in rows)
            (GOLDEN / f"{run_name}.metrics.jsonl").write_text(text)
            print(f"wrote {GOLDEN / run_name}.metrics.jsonl ({len(rows)} steps)")
