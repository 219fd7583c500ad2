"""Run folders on disk: creating them, reading ``config.yaml`` and ``metrics.jsonl``, writing files
atomically, and what makes a run reproducible across a resume (its seeds and config fingerprint).

A run folder holds ``config.yaml`` (the resolved config, a nested mapping), ``metrics.jsonl`` (one JSON
object per step with an integer ``step`` and float metrics; ``null`` marks a non-finite value) and
optionally ``summary.json``. Reading is tolerant of a run that is still going or was killed: the last
line of ``metrics.jsonl`` may be truncated and is then ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from entroclip.config import Config, ConfigError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class RunFolderError(ValueError):
    """A run folder that cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class Run:
    """One run folder, read once: its label, resolved config and metric rows sorted by step."""

    path: Path
    label: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]


def _run_file(run_dir: str | Path, name: str) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder not found: {run_dir}")
    path = run_dir / name
    if not path.is_file():
        raise RunFolderError(f"{name} not found in run folder: {path}")
    return path


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config of a run as a nested mapping (empty file: ``{}``)."""
    path = _run_file(run_dir, CONFIG_FILE)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RunFolderError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Metric rows sorted by step; a repeated step (a resumed run) keeps its last row.

    An unparsable last line (a run killed mid-write) is ignored; any other bad line raises
    ``RunFolderError`` naming ``file:line``.
    """
    path = _run_file(run_dir, METRICS_FILE)
    lines = path.read_text().splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    by_step: dict[int, dict[str, Any]] = {}
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(numbered) - 1:
                break
            raise RunFolderError(f"{path}:{lineno}: not valid JSON: {err.msg}") from None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise RunFolderError(f"{path}:{lineno}: expected a JSON object with an integer 'step'")
        by_step[step] = row
    return [by_step[s] for s in sorted(by_step)]


def logged_lines(run_dir: str | Path) -> list[str]:
    """The lines of ``metrics.jsonl`` that log steps 1, 2, ..., k in order: the log up to its first hole,
    out-of-order step or unparsable line (a run killed mid-write, a cut or edited file). Empty when the
    file does not exist."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    kept: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict) or row.get("step") != len(kept) + 1 or isinstance(row["step"], bool):
            break
        kept.append(line)
    return kept


def metric_series(rows: Sequence[Mapping[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one metric, skipping rows without it (or with ``null``)."""
    pairs = [(row["step"], row[name]) for row in rows if row.get(name) is not None]
    try:
        values = np.array([float(v) for _, v in pairs], dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(p for p in pairs if not isinstance(p[1], int | float))
        raise RunFolderError(f"metric {name!r} at step {bad[0]} is not a number: {bad[1]!r}") from None
    return np.array([s for s, _ in pairs], dtype=np.int64), values


def config_value(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The value at a dotted ``key`` (``"loss.eps_low"``) of a nested config, or ``default`` if absent."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def default_labels(paths: Sequence[Path]) -> list[str]:
    """Short distinct labels: folder names, widened to more path parts where names collide."""
    resolved = [p.resolve() for p in paths]
    for depth in range(1, max((len(p.parts) for p in resolved), default=1) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def load_runs(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Read the config and metrics of each run folder; labels default to ``default_labels``."""
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("no run folders given")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} run folders")
    names = list(labels) if labels is not None else default_labels(paths)
    if len(set(names)) != len(names):
        raise ValueError(f"run labels must be distinct, got {names}")
    return [Run(p, name, read_config(p), read_metrics(p)) for p, name in zip(paths, names, strict=True)]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``atomic_write_bytes`` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


STREAMS = {"data": 0, "sample": 1, "reward": 2, "shuffle": 3, "probe": 4, "eval": 5}
PROBE_FILE = "probe.safetensors"
#: config sections that must not change when a run is resumed
FINGERPRINT_SECTIONS = (
    "model",
    "task",
    "reward",
    "rollout",
    "advantage",
    "loss",
    "optim",
    "control",
    "diagnostics",
)


def derive_seed(seed: int, step: int, stream: str) -> int:
    """An independent 63-bit seed for each (run seed, step, stream)."""
    return int(np.random.SeedSequence([seed, step, STREAMS[stream]]).generate_state(2, np.uint64)[0] >> 1)


def config_fingerprint(config: Config) -> str:
    """A short hash of the config fields that must not change across a resume.

    Fields at their default value are left out, so a field that a later version adds (with a default)
    does not make the checkpoints of earlier runs incompatible.
    """
    data = config.model_dump(mode="json", exclude_defaults=True)
    kept = {k: data.get(k, {}) for k in FINGERPRINT_SECTIONS} | {"seed": config.run.seed}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create (or re-open) a run folder; refuse to clobber an existing one without --overwrite/--resume.

    A folder left by a run stopped during its set-up (no ``config.yaml`` yet, only set-up files) is
    replaced by a plain re-run: it holds nothing trained."""
    if not resume and is_unstarted_run(run_dir):
        shutil.rmtree(run_dir)
    if run_dir.exists() and not resume:
        if not overwrite:
            raise ConfigError(
                f"run.out_dir already exists: {run_dir} (use --resume to continue or --overwrite)"
            )
        if not is_run_folder(run_dir):
            raise ConfigError(
                f"--overwrite refuses to delete {run_dir}: not an entroclip run folder "
                f"(none of {', '.join(RUN_ENTRIES)} in it)"
            )
        shutil.rmtree(run_dir)
    if resume and not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"cannot resume: {run_dir / CONFIG_FILE} not found{UNSTARTED_HINT}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"run.out_dir is not writable: {run_dir} ({err.strerror or err})") from None


#: what a run folder holds; --overwrite deletes only folders that are empty or hold one of these
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, PROBE_FILE, CHECKPOINT_DIR, "init_model", "tensorboard")


UNSTARTED_HINT = " (a run stopped during its set-up has none: run it again with its config)"
#: what a run writes before its config.yaml (temporary files of atomic writes start with ".")
SET_UP_ENTRIES = ("init_model", PROBE_FILE, "tensorboard")


def is_run_folder(path: Path) -> bool:
    """An empty folder, or one holding a run's files: what --overwrite may delete."""
    return path.is_dir() and (not any(path.iterdir()) or any((path / e).exists() for e in RUN_ENTRIES))


def is_unstarted_run(path: Path) -> bool:
    """A non-empty folder holding only what a run writes before its config.yaml."""
    if not path.is_dir() or (path / CONFIG_FILE).exists():
        return False
    names = [p.name for p in path.iterdir()]
    temporary = [n for n in names if n == ".write_test" or (n.startswith(".") and n.endswith(".tmp"))]
    set_up = [n for n in names if n in SET_UP_ENTRIES]
    return bool(set_up) and len(set_up) + len(temporary) == len(names)
