"""A run folder is data: resuming never runs code from it, never resumes with holes in its log, and refuses
whatever in it was changed since the checkpoint (the probe set included)."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from support import cli, error_line, files, rows, sets, trainer, without_timings

import entroclip.checkpoint as checkpoint
from entroclip.checkpoint import _sha256
from entroclip.logging import MetricsLogger
from entroclip.trust import ALLOW_CODE_ENV


@pytest.fixture(scope="module")
def run4(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("run4") / "run"
    trainer(out, "run.steps=4", "run.checkpoint_every=2").train(show_progress=False)
    return out


def copy(run: Path, tmp_path: Path) -> Path:
    return shutil.copytree(run, tmp_path / "run")


def resume(run: Path, *args: object):
    return cli("--resume", run, *args)


# ----- no code from the run folder -----------------------------------------------------------------------
class Payload:
    """Unpickling this object runs ``touch MARKER``: what a crafted state.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_state_pt_is_refused_and_never_runs(tmp_path, run4):
    run = copy(run4, tmp_path)
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints/step_000004"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["payload"] = Payload(marker)
    (ckpt / "state.pt").write_bytes(pickle.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"]["state.pt"] = _sha256(ckpt / "state.pt")  # the attacker recomputes the sum
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    before = files(run)
    result = resume(run, *sets("run.steps=6"))
    assert result.exit_code == 2
    assert "state.pt holds more than tensors and plain values" in error_line(result)
    assert not marker.exists()
    assert files(run) == before


def test_import_path_in_a_config_needs_allow_code(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_CODE_ENV, raising=False)
    out = tmp_path / "never"
    reward = ("reward.name=faulty_rewards:faulty", "reward.options={mode: ok}")
    result = cli("configs/quick.yaml", *sets(*reward), "--out", out)
    assert result.exit_code == 2
    assert "reward.name='faulty_rewards:faulty' is an import path" in error_line(result)
    assert "--allow-code" in result.output and not out.exists()
    allowed = cli("configs/quick.yaml", *sets(*reward, "run.steps=1"), "--out", out, "--allow-code")
    assert allowed.exit_code == 0, allowed.output
    assert len(rows(out)) == 1


@pytest.mark.parametrize("name", ["os:system", "builtins:eval", "subprocess:run", "os.path:join"])
def test_standard_library_import_paths_are_refused_even_with_allow_code(tmp_path, name):
    out = tmp_path / "never"
    for field in ("reward.name", "task.name", "eval.reward"):
        result = cli("configs/quick.yaml", *sets(f"{field}={name}"), "--out", out, "--allow-code")
        assert result.exit_code == 2
        message = error_line(result)
        assert field in message and "standard library" in message
    assert not out.exists()


def test_resume_refuses_code_written_into_the_run_folders_config(tmp_path, run4, monkeypatch):
    monkeypatch.delenv(ALLOW_CODE_ENV, raising=False)
    run = copy(run4, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("name: random_bernoulli", "name: evil_module:payload"))
    before = files(run)
    result = resume(run, *sets("run.steps=6"))
    assert result.exit_code == 2 and "is an import path" in error_line(result)
    assert files(run) == before


# ----- the metrics log on resume -------------------------------------------------------------------------
def edit_log(run: Path, how: str) -> None:
    log = run / "metrics.jsonl"
    if how == "deleted":
        log.unlink()
        return
    lines = log.read_text().splitlines()
    edited = {
        "truncated": lines[:3],  # steps 1-3, before checkpoint 4
        "cut": [lines[0], *lines[3:]],  # steps [1, 4]: a hole
        "emptied": [],
        "non-object": [lines[0], "[1, 2]", *lines[2:]],
        "half line": [*lines[:2], lines[2][: len(lines[2]) // 2], lines[3]],
    }[how]
    log.write_text("".join(f"{line}\n" for line in edited))


@pytest.mark.parametrize(
    ("how", "start"),
    [
        ("truncated", 2),
        ("cut", None),
        ("emptied", None),
        ("deleted", None),
        ("non-object", None),
        ("half line", 2),
    ],
)
def test_a_log_with_holes_is_replayed_from_a_checkpoint_it_covers(tmp_path, run4, how, start):
    """Whatever happened to metrics.jsonl, a resumed run ends with a log equal to an uninterrupted one's."""
    run = copy(run4, tmp_path)
    edit_log(run, how)
    result = resume(run, *sets("run.steps=4"))
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", "")
    assert "warning: metrics.jsonl logs steps 1-" in text
    assert f"replaying from {'the start' if start is None else f'checkpoint step {start}'}" in text
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    assert without_timings(rows(run)) == without_timings(rows(run4))


def test_the_log_is_on_disk_before_each_checkpoint(tmp_path, monkeypatch):
    """A checkpoint must never outlive its steps' rows: the log is fsynced before a checkpoint is written."""
    events: list[str] = []
    real_fsync, real_save = os.fsync, checkpoint.save_checkpoint

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            events.append("log synced")
        real_fsync(fd)

    def save(run_dir, step, *args, **kwargs):
        events.append(f"checkpoint {step}")
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr("entroclip.trainer.save_checkpoint", save)
    trainer(tmp_path / "run", "run.steps=2", "run.checkpoint_every=1").train(show_progress=False)
    assert events == ["log synced", "checkpoint 1", "log synced", "checkpoint 2"]


def test_logger_cuts_the_log_at_its_first_hole(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n"text"\n{"step": 4}\n')
    MetricsLogger(tmp_path, resume_step=3, tensorboard=False).close()
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


# ----- what else the run folder holds -------------------------------------------------------------------
def test_resume_into_another_folder_is_refused(tmp_path, run4):
    other = tmp_path / "other"
    result = cli("--resume", run4, "--out", other)
    assert result.exit_code == 2 and "not both" in error_line(result)
    assert not other.exists()


def test_a_changed_probe_set_is_refused(tmp_path, run4):
    run = copy(run4, tmp_path)
    from safetensors.torch import load_file, save_file

    probe = load_file(str(run / "probe.safetensors"))
    ids = probe["input_ids"]
    ids[0, -1] = (ids[0, -1] + 1) % 8  # one token id of one probe response
    save_file(probe, str(run / "probe.safetensors"))
    before = files(run)
    result = resume(run, *sets("run.steps=6"))
    assert result.exit_code == 2
    assert "probe.safetensors is missing or changed" in error_line(result)
    assert files(run) == before


def test_a_deleted_probe_set_is_refused(tmp_path, run4):
    run = copy(run4, tmp_path)
    (run / "probe.safetensors").unlink()
    result = resume(run, *sets("run.steps=6"))
    assert result.exit_code == 2 and "probe.safetensors is missing or changed" in error_line(result)
    assert not (run / "probe.safetensors").exists()


def test_a_failing_safetensors_write_is_one_line_exit_1_and_resumable(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = checkpoint.save_file
    calls = []

    def save_file(tensors, filename):
        calls.append(filename)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        return real(tensors, filename)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    result = cli("configs/quick.yaml", *sets("run.steps=3", "run.checkpoint_every=1"), "--out", out)
    assert result.exit_code == 1
    message = error_line(result)
    assert "No space left on device" in message and "--resume" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"]
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert resume(out).exit_code == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3]


def test_a_run_killed_during_its_set_up_is_started_again_by_a_plain_rerun(tmp_path):
    out = tmp_path / "run"
    (out / "init_model").mkdir(parents=True)
    (out / "init_model" / "config.json").write_text("{")  # cut mid-write
    (out / ".probe.safetensors.tmp").write_bytes(b"\0")
    resumed = cli("--resume", out)
    assert resumed.exit_code == 2 and "run it again with its config" in error_line(resumed)
    result = cli("configs/quick.yaml", *sets("run.steps=1"), "--out", out)
    assert result.exit_code == 0, result.output
    assert len(rows(out)) == 1


def test_a_foreign_folder_is_never_taken_for_an_unstarted_run(tmp_path):
    out = tmp_path / "mine"
    (out / ".git").mkdir(parents=True)
    (out / "tensorboard").mkdir()
    result = cli("configs/quick.yaml", *sets("run.steps=1"), "--out", out)
    assert result.exit_code == 2 and "already exists" in error_line(result)
    assert (out / ".git").is_dir()
