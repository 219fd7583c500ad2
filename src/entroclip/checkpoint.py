"""Atomic, verified checkpoints: safetensors weights + optimizer/scheduler/trainer state.

Layout: ``RUN/checkpoints/step_000050/{model.safetensors, state.pt, manifest.json}``. A checkpoint is
written into a temporary folder and renamed into place only when complete; the manifest holds the
SHA-256 of every file and a fingerprint of the config fields that must not change across a resume.
Loading verifies both, so a half-written or corrupt checkpoint is never loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from entroclip.runio import CHECKPOINT_DIR

CHECKPOINT_FILES = ("model.safetensors", "state.pt")
_NAME = re.compile(r"^step_(\d{6,})$")
#: a file directly in the run folder
_NAME_IN_RUN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class CheckpointError(RuntimeError):
    """A checkpoint that is corrupt, incomplete or incompatible with the run's config."""


@dataclass
class Checkpoint:
    step: int
    path: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def without_shared(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop tensors that share memory with an earlier one (tied weights); returns (kept, dropped names)."""
    kept, dropped, seen = {}, [], set()
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            dropped.append(name)
            continue
        seen.add(key)
        kept[name] = tensor
    return kept, dropped


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    fingerprint: str,
    run_files: Sequence[str] = (),
) -> Path:
    """Write checkpoint ``step`` atomically and return its folder; older checkpoints are kept.

    Tied weights are stored once; ``state["tied_weights"]`` lists the names left out. ``run_files`` names
    files of the run folder that the checkpoint depends on (the probe set); their sums go into the
    manifest, and loading refuses the checkpoint when one has changed.
    """
    weights, tied = without_shared(weights)
    state = {**state, "tied_weights": tied}
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        try:
            save_file(tensors, str(tmp / "model.safetensors"))
        except SafetensorError as err:  # e.g. no space left: an OSError like any other write failure
            raise OSError(f"cannot write {tmp / 'model.safetensors'}: {err}") from None
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (tmp / "state.pt").write_bytes(buffer.getvalue())
        files = {name: _sha256(tmp / name) for name in CHECKPOINT_FILES}
        outside = {name: _sha256(run_dir / name) for name in run_files}
        manifest = {"step": step, "fingerprint": fingerprint, "sha256": files, "run_files": outside}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for name in (*files, "manifest.json"):
            with (tmp / name).open("rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. disk full: free the space, keep older checkpoints
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders (by name) in ascending step order; temporary folders are ignored."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def load_checkpoint(path: Path, fingerprint: str) -> Checkpoint:
    """Load and verify one checkpoint folder; raise CheckpointError if it is corrupt or incompatible."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from None
    sums = manifest.get("sha256") if isinstance(manifest, dict) else None
    if (
        not isinstance(sums, dict)
        or set(sums) != set(CHECKPOINT_FILES)
        or not isinstance(manifest.get("step"), int)
    ):
        raise CheckpointError(
            f"{path}: manifest.json is incomplete (needs step and sha256 of {CHECKPOINT_FILES})"
        )
    for name, expected in sums.items():
        file = path / name
        if not file.is_file() or _sha256(file) != expected:
            raise CheckpointError(f"{path}: {name} is missing or corrupt (checksum mismatch)")
    outside = manifest.get("run_files", {})
    if not isinstance(outside, dict) or not all(_NAME_IN_RUN.match(str(name)) for name in outside):
        raise CheckpointError(f"{path}: manifest.json lists invalid run files {outside!r}")
    for name, expected in outside.items():
        file = path.parent.parent / name
        if not file.is_file() or _sha256(file) != expected:
            raise CheckpointError(
                f"{path}: the run's {name} is missing or changed since this checkpoint was written"
            )
    if manifest.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: written by an incompatible config (a model, task, reward, rollout, advantage, loss, "
            "optim, control or diagnostics field, or the seed, differs); resume with the run's own "
            "config.yaml"
        )
    weights = load_file(str(path / "model.safetensors"))
    try:
        # weights_only: a run folder is data, and unpickling arbitrary objects would run its code
        state = torch.load(path / "state.pt", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: state.pt holds more than tensors and plain values and is not loaded ({first_line})"
        ) from None
    return Checkpoint(int(manifest["step"]), path, weights, state)


def latest_checkpoint(run_dir: Path, fingerprint: str, up_to_step: int | None = None) -> Checkpoint | None:
    """The newest checkpoint of a run (at a step <= ``up_to_step`` if given), verified; None when there is
    none."""
    found = [path for step, path in list_checkpoints(run_dir) if up_to_step is None or step <= up_to_step]
    return load_checkpoint(found[-1], fingerprint) if found else None
