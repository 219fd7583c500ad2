"""A real full disk (a small tmpfs, mounted when the tests run as root): refusal before training leaves
nothing behind, and a disk that fills during training stops with one line and resumable checkpoints."""

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import SMALL, cli, error_line, rows, sets, trainer, without_timings

import entroclip.checkpoint as checkpoint


def cli_process(*args: object) -> subprocess.CompletedProcess:
    """``entroclip train ARGS`` in its own process, which leaves nothing mapped on the disk at exit."""
    command = [sys.executable, "-m", "entroclip", "train", *map(str, args), "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def process_error_line(result: subprocess.CompletedProcess) -> str:
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
    result = cli_process("configs/quick.yaml", "--out", disk_1_5m / "run")
    assert result.returncode == 2
    assert "not enough free disk space" in process_error_line(result)
    assert list(disk_1_5m.iterdir()) == []  # init_model/, written before the check, is gone too


def test_a_disk_that_fills_during_training_stops_with_one_line(disk_4m):
    run = disk_4m / "run"
    result = cli_process("configs/quick.yaml", *sets("run.steps=8", "run.checkpoint_every=1"), "--out", run)
    assert result.returncode == 1
    message = process_error_line(result)
    assert "No space left on device" in message and "--resume" in message
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept and all(name.startswith("step_") for name in kept)  # the unfinished one was deleted
    # once there is room again, the run resumes from its last complete checkpoint
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk_4m)], check=True)
    resumed = cli_process("--resume", run, *sets("run.checkpoint_every=0"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {int(kept[-1].removeprefix('step_'))})" in resumed.stdout + resumed.stderr


# ----- unwritable folder, full disk ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["under_a_file", "under_proc"])
def test_unwritable_run_folder_fails_before_training(tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("not a folder")
        out = tmp_path / "file" / "run"
    else:
        out = Path(f"/proc/entroclip-test-{os.getpid()}/run")
    result = cli("configs/quick.yaml", "--out", out)
    assert result.exit_code == 2
    message = error_line(result)
    assert f"run.out_dir is not writable: {out}" in message
    assert ("Not a directory" if where == "under_a_file" else "No such file") in message


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name == ".write_test":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    result = cli("configs/quick.yaml", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "run.out_dir is not writable" in error_line(result) and "No space left on device" in result.output


def test_too_little_free_space_fails_before_training(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=2**19)
    )
    result = cli("configs/quick.yaml", "--out", out)
    assert result.exit_code == 2
    message = error_line(result)
    assert "not enough free disk space for run.out_dir" in message
    assert "0.5 MiB free" in message and "needs about 2.5" in message
    assert not out.exists()  # init_model/ included: a refused run leaves no folder


def test_disk_full_while_checkpointing_stops_cleanly_and_resumes(tmp_path, monkeypatch):
    schedule = ("run.steps=3", "run.checkpoint_every=1")
    reference = trainer(tmp_path / "reference", *schedule).train(show_progress=False)
    real, calls = checkpoint.save_file, count()

    def save_file(tensors, filename, *args, **kwargs):
        if next(calls) == 1:  # the second checkpoint: half a file, then the disk is full
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    result = cli("configs/quick.yaml", *sets(*SMALL, *schedule), "--out", out)
    assert result.exit_code == 1
    assert "No space left on device" in error_line(result) and "--resume" in result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]  # no temp folder left
    monkeypatch.setattr(checkpoint, "save_file", real)
    result = cli("--resume", out)
    assert result.exit_code == 0, result.output
    assert without_timings(rows(out)) == without_timings(rows(reference))
