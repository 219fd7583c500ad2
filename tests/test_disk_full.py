"""A real full disk (a small tmpfs, mounted when the tests run as root): refusal before training leaves
nothing behind, and a disk that fills during training stops with one line and resumable checkpoints."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_reliability import sets


def cli(*args: object) -> subprocess.CompletedProcess:
    """``entroclip train ARGS`` in its own process, which leaves nothing mapped on the disk at exit."""
    command = [sys.executable, "-m", "entroclip", "train", *map(str, args), "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    text = (result.stdout + result.stderr).strip()
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def disk_1_5m(tmp_path) -> Iterator[Path]:
    yield from mounted_tmpfs(tmp_path / "disk", "1536k")


@pytest.fixture
def disk_4m(tmp_path) -> Iterator[Path]:
    yield from mounted_tmpfs(tmp_path / "disk", "4m")


def test_too_small_a_disk_is_refused_before_training_and_leaves_nothing(disk_1_5m):
    result = cli("configs/quick.yaml", "--out", disk_1_5m / "run")
    assert result.returncode == 2
    assert "not enough free disk space" in error_line(result)
    assert list(disk_1_5m.iterdir()) == []  # init_model/, written before the check, is gone too


def test_a_disk_that_fills_during_training_stops_with_one_line(disk_4m):
    run = disk_4m / "run"
    result = cli("configs/quick.yaml", *sets("run.steps=8", "run.checkpoint_every=1"), "--out", run)
    assert result.returncode == 1
    message = error_line(result)
    assert "No space left on device" in message and "--resume" in message
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept and all(name.startswith("step_") for name in kept)  # the unfinished one was deleted
    # once there is room again, the run resumes from its last complete checkpoint
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk_4m)], check=True)
    resumed = cli("--resume", run, *sets("run.checkpoint_every=0"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {int(kept[-1].removeprefix('step_'))})" in resumed.stdout + resumed.stderr
