"""Sweeps under failure: existing sweep folders, Ctrl+C, unsafe labels, failing runs, resumed progress
bars and the help text."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import SMALL, assert_help_is_whole, error_line, files, process_alive, rows, sets
from typer.testing import CliRunner

from entroclip.cli import app

runner = CliRunner()
#: a base config for quick sweeps: the small overrides of the trainer tests, two steps
BASE = ["configs/quick.yaml", *sets(*SMALL, "run.steps=2")]
GRID = ["--grid", "loss.eps_high=0.2,null", "--seeds", "1"]


def sweep(*args: object):
    return runner.invoke(app, ["sweep", *BASE, *map(str, args)])


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    """A finished sweep of two settings x one seed, two steps each; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    result = sweep(*GRID, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# ----- existing sweep folders ----------------------------------------------------------------------------
def test_existing_sweep_folder_is_kept_unless_resume_or_overwrite(tmp_path, finished_sweep):
    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    before = files(out)
    result = sweep(*GRID, "--out", out)
    assert result.exit_code == 2 and "already exists" in error_line(result) and "--resume" in result.output
    assert files(out) == before

    result = sweep(*GRID, "--out", out, "--resume", "--overwrite")
    assert result.exit_code == 2 and "not both" in error_line(result)
    assert files(out) == before

    (out / "notes.txt").write_text("replaced with the rest")
    result = sweep(*GRID, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists() and (out / "summary.json").is_file()
    assert [r["step"] for r in rows(out / "eps_high=null" / "seed0")] == [1, 2]


def test_sweep_overwrite_and_resume_refuse_what_is_not_a_sweep_folder(tmp_path):
    folder, file = tmp_path / "thesis", tmp_path / "data.csv"
    (folder / "chapter1").mkdir(parents=True)
    (folder / "chapter1" / "seed.tex").write_text("years of work")
    file.write_text("a,b\n")
    for out in (folder, file):
        for flag in ("--overwrite", "--resume"):
            result = sweep(*GRID, "--out", out, flag)
            assert result.exit_code == 2 and "not an entroclip sweep folder" in error_line(result)
    assert (folder / "chapter1" / "seed.tex").read_text() == "years of work" and file.read_text() == "a,b\n"
    assert [p.name for p in folder.rglob("*")] == ["chapter1", "seed.tex"]


# ----- labels --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value, label",
    [
        ("--setting", "../victim:loss.eps_high=0.3", "../victim"),
        ("--setting", "a/b:loss.eps_high=0.3", "a/b"),
        ("--setting", "a\\b:loss.eps_high=0.3", "a\\b"),
        ("--setting", "..:loss.eps_high=0.3", ".."),
        ("--setting", ".:loss.eps_high=0.3", "."),
        ("--setting", ".hidden:loss.eps_high=0.3", ".hidden"),
        ("--setting", "tab\there:loss.eps_high=0.3", "tab\there"),
        ("--grid", "model.path=/data/model,other", "path=/data/model"),
    ],
)
def test_labels_must_be_one_safe_folder_name(tmp_path, option, value, label):
    out = tmp_path / "sweep" / "out"
    result = sweep(option, value, "--seeds", "1", "--out", out)
    assert result.exit_code == 2 and f"setting label {label!r}" in error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_two_settings_may_not_share_a_label(tmp_path):
    result = sweep(
        "--setting", "a:loss.eps_high=0.3", "--setting", "a:loss.eps_high=0.1", "--out", tmp_path / "s"
    )
    assert result.exit_code == 2 and "'a' is given twice" in error_line(result)
    assert not (tmp_path / "s").exists()


# ----- failing runs --------------------------------------------------------------------------------------
def test_a_failing_run_is_one_line_and_the_other_runs_finish(tmp_path, monkeypatch):
    # the task is named by an import path, which the workers may run: they inherit the environment
    monkeypatch.setenv("ENTROCLIP_ALLOW_CODE", "1")
    out = tmp_path / "sweep"
    broken = ["--setting", "broken:task.name=sweep_tasks:BrokenStream"]
    good = ["--setting", "good:loss.eps_high=0.3"]
    result = sweep(*broken, *good, "--seeds", "1", "--workers", "1", "--out", out)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "run broken/seed0 failed: RuntimeError: the data source went away\n" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 runs failed") and "--resume" in last
    assert [r["step"] for r in rows(out / "good" / "seed0")] == [1, 2]  # it ran after the failure
    assert not (out / "summary.json").exists() and not (out / "report.md").exists()

    # a config error in a worker (a foreign folder where a run goes) is one line too; finished runs stay
    (out / "foreign" / "seed0").mkdir(parents=True)
    (out / "foreign" / "seed0" / "notes.txt").write_text("mine")
    good_files = files(out / "good")
    foreign = ["--setting", "foreign:loss.eps_high=0.1"]
    result = sweep(*broken, *good, *foreign, "--seeds", "1", "--workers", "2", "--out", out, "--resume")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    failed = sorted(line for line in result.output.splitlines() if line.startswith("run "))
    assert failed[0] == "run broken/seed0 failed: RuntimeError: the data source went away"
    assert failed[1].startswith("run foreign/seed0 failed: ConfigError: --overwrite refuses to delete")
    assert len(failed) == 2 and "not an entroclip run folder" in failed[1]
    assert result.output.strip().splitlines()[-1].startswith("error: 2 of 3 runs failed")
    assert files(out / "good") == good_files and (out / "foreign" / "seed0" / "notes.txt").exists()


# ----- resumed progress bars -----------------------------------------------------------------------------
def test_resumed_sweep_starts_each_bar_at_its_checkpoint(tmp_path, finished_sweep):
    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    result = sweep(*GRID, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    for key in ("eps_high=0.2/seed0", "eps_high=null/seed0"):
        assert re.search(rf"^{re.escape(key)}\s.*\s2/2\s", result.output, re.MULTILINE), result.output


# ----- Ctrl+C --------------------------------------------------------------------------------------------
def _workers(parent: int) -> list[int]:
    """The pool worker processes of ``parent`` (not its resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(") ", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _sizes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_cancels_queued_runs_and_stops_running_ones(tmp_path):
    out = tmp_path / "sweep"
    entroclip = Path(sys.executable).parent / "entroclip"
    args = [entroclip, "sweep", *BASE, *sets("run.steps=100000"), "--grid", "loss.eps_high=0.1,0.2,0.3"]
    log = tmp_path / "sweep.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [*map(str, args), "--seeds", "1", "--workers", "1", "--out", str(out)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    workers: list[int] = []
    try:
        metrics = out / "eps_high=0.1" / "seed0" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.stat().st_size):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "timed out waiting for the first step"
            time.sleep(0.2)
        workers = _workers(proc.pid)
        assert workers, "no worker process found"
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text
        last = text.strip().splitlines()[-1]
        assert last.startswith("error: interrupted") and "--resume" in last
        assert not any(map(process_alive, workers)), "a worker outlived the interrupted sweep"
        sizes = _sizes(out)
        time.sleep(2)  # longer than a step: a run still training would have logged one
        assert _sizes(out) == sizes
        assert [p.name for p in out.iterdir()] == ["eps_high=0.1"]  # the queued runs never started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in filter(process_alive, workers):
            os.kill(pid, signal.SIGKILL)


# ----- help ----------------------------------------------------------------------------------------------
def test_sweep_help_shows_every_option_whole():
    assert_help_is_whole("sweep")


def test_a_sweep_runs_code_named_by_its_config_only_with_allow_code(tmp_path, monkeypatch):
    monkeypatch.delenv("ENTROCLIP_ALLOW_CODE", raising=False)
    out = tmp_path / "sweep"
    broken = ["--setting", "broken:task.name=sweep_tasks:BrokenStream", "--seeds", "1", "--out", out]
    refused = sweep(*broken)
    assert refused.exit_code == 2
    assert "task.name='sweep_tasks:BrokenStream' is an import path" in error_line(refused)
    assert not out.exists()
    allowed = sweep(*broken, "--allow-code", "--workers", "1")
    assert allowed.exit_code == 1  # it ran: the task's data source fails at its first step
    assert "run broken/seed0 failed: RuntimeError: the data source went away" in allowed.output
    monkeypatch.delenv("ENTROCLIP_ALLOW_CODE", raising=False)  # --allow-code set it for this process
