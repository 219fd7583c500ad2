"""Resume: kill -9 anywhere and resume exactly; corrupt, incomplete or incompatible checkpoints refused;
existing run folders kept unless --resume or --overwrite."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydantic
import pytest
from support import SMALL, cli, error_line, files, rows, sets, trainer, unwrapped, without_timings

from entroclip.checkpoint import list_checkpoints
from entroclip.config import load_config
from entroclip.runio import config_fingerprint

# ----- kill -9 and exact resume --------------------------------------------------------------------------
STEPS, EVERY = 20, 2


def start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "entroclip", "train", *args, "--no-progress"],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], pause_s: float) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(pause_s)


def kill_9(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    schedule = (f"run.steps={STEPS}", f"run.checkpoint_every={EVERY}")
    reference = trainer(tmp_path / "reference", *schedule).train(show_progress=False)
    run, log = tmp_path / "killed", tmp_path / "killed.log"
    metrics, ckpts = run / "metrics.jsonl", run / "checkpoints"
    rng = random.Random(8)
    procs: list[subprocess.Popen] = []
    try:
        # 1. during rollout, update or logging: a seeded random moment after step 3 is logged
        procs.append(start(["configs/quick.yaml", *sets(*SMALL, *schedule), "--out", str(run)], log))
        wait_for(procs[-1], lambda: lines(metrics) >= 3, 0.002)
        time.sleep(rng.uniform(0.0, 0.08))
        kill_9(procs[-1])

        # 2. inside a checkpoint write: kill as soon as its temporary folder appears
        for _ in range(3):
            last = max((step for step, _ in list_checkpoints(run)), default=0)
            target = last + 2 * EVERY  # a folder the previous process cannot have left behind
            tmp = ckpts / f".step_{target:06d}.tmp"
            procs.append(start(["--resume", str(run)], log))
            wait_for(procs[-1], tmp.exists, 0.0)
            kill_9(procs[-1])
            if tmp.exists():  # else the rename won the race: try again at the next checkpoint
                break
        assert tmp.exists() and not (ckpts / f"step_{target:06d}").exists()
        complete = target - EVERY

        # 3. once more at a random moment, a few steps later
        logged = lines(metrics)
        procs.append(start(["--resume", str(run)], log))
        wait_for(procs[-1], lambda: lines(metrics) > logged, 0.002)
        time.sleep(rng.uniform(0.0, 0.08))
        kill_9(procs[-1])

        # 4. to the end
        procs.append(start(["--resume", str(run)], log))
        assert procs[-1].wait(timeout=120) == 0, log.read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    resumed = re.findall(r"resumed from .*?\(step (\d+)\)", log.read_text(), flags=re.S)
    assert int(resumed[-2]) == complete  # the half-written checkpoint was not loaded
    assert without_timings(rows(run)) == without_timings(rows(reference))
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".")] == []


# ----- corrupt and incompatible checkpoints ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "manifest.json"])
def test_corrupt_checkpoint_is_refused(tmp_path, small_run, name):
    run = shutil.copytree(small_run, tmp_path / "run")
    path = run / "checkpoints/step_000002" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    before = files(run)
    result = cli("--resume", run, *sets("run.steps=4"))
    assert result.exit_code == 2
    assert "step_000002" in error_line(result) and "resumed from" not in result.output
    assert files(run) == before  # nothing loaded, nothing trained, nothing rewritten


@pytest.mark.parametrize("override", ["loss.eps_low=0.1", "run.seed=1", "rollout.group_size=2"])
def test_checkpoint_of_an_incompatible_config_is_refused(tmp_path, small_run, override):
    run = shutil.copytree(small_run, tmp_path / "run")
    before = files(run)
    result = cli("--resume", run, *sets(override, "run.steps=4"))
    assert result.exit_code == 2
    assert "incompatible config" in error_line(result)
    assert files(run) == before


def test_fingerprint_ignores_a_new_field_at_its_default(small_run):
    """A field added to a fingerprinted section later, at its default value, keeps the fingerprint: runs
    checkpointed before the field existed still resume. A value other than the default changes it."""
    config = load_config(small_run / "config.yaml")
    control_type = type(config.control)
    newer_control = pydantic.create_model(
        "NewerControlConfig", __base__=control_type, later_option=(float, 0.5)
    )
    newer_config = pydantic.create_model(
        "NewerConfig",
        __base__=type(config),
        control=(newer_control, pydantic.Field(default_factory=newer_control)),
    )
    data = config.model_dump(mode="json")
    newer = newer_config(**data)
    assert newer.control.later_option == 0.5
    assert config_fingerprint(newer) == config_fingerprint(config)
    changed = newer_config(**{**data, "control": {**data["control"], "later_option": 1.0}})
    assert config_fingerprint(changed) != config_fingerprint(config)


def test_incomplete_manifest_is_refused(tmp_path, small_run):
    run = shutil.copytree(small_run, tmp_path / "run")
    manifest = run / "checkpoints/step_000002/manifest.json"
    data = json.loads(manifest.read_text())
    del data["sha256"]["state.pt"]
    manifest.write_text(json.dumps(data))
    result = cli("--resume", run, *sets("run.steps=4"))
    assert result.exit_code == 2 and "manifest.json is incomplete" in error_line(result)


# ----- existing run folders ------------------------------------------------------------------------------
def test_existing_run_folder_is_kept_unless_resume_or_overwrite(tmp_path, small_run):
    run = shutil.copytree(small_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    before = files(run)
    args = ["configs/quick.yaml", *sets(*SMALL, "run.steps=1"), "--out", run]
    result = cli(*args)
    assert result.exit_code == 2 and "already exists" in error_line(result)
    assert files(run) == before

    result = cli("--resume", run, *sets("run.steps=3"))
    assert result.exit_code == 0 and f"resumed from {run}/checkpoints/step_000002" in unwrapped(result)
    assert [r["step"] for r in rows(run)] == [1, 2, 3] and (run / "notes.txt").exists()

    result = cli(*args, "--overwrite")
    assert result.exit_code == 0
    assert [r["step"] for r in rows(run)] == [1] and not (run / "notes.txt").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]


def test_overwrite_refuses_what_is_not_a_run_folder(tmp_path):
    folder, file = tmp_path / "thesis", tmp_path / "data.csv"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    file.write_text("a,b\n")
    for out in (folder, file):
        result = cli("configs/quick.yaml", "--out", out, "--overwrite")
        assert result.exit_code == 2 and "not an entroclip run folder" in error_line(result)
    assert (folder / "chapter1.tex").read_text() == "years of work" and file.read_text() == "a,b\n"


def test_resume_needs_an_existing_run(tmp_path):
    result = cli("--resume", tmp_path / "missing")
    assert result.exit_code == 2 and "cannot resume" in error_line(result)
    assert not (tmp_path / "missing").exists()
    result = cli("configs/quick.yaml", "--resume", tmp_path / "missing")
    assert result.exit_code == 2 and "not both" in error_line(result)
