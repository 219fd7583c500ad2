"""Sweeps: grid parsing, and a small end-to-end sweep through the CLI in parallel processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from support import SMALL, process_alive
from typer.testing import CliRunner

from entroclip.cli import app
from entroclip.study import grid_settings, named_setting


def test_grid_is_a_product_with_readable_labels():
    settings = grid_settings(["loss.eps_low=0.1,0.2", "loss.eps_high=0.2,null"])
    assert [s.label for s in settings] == [
        "eps_low=0.1,eps_high=0.2",
        "eps_low=0.1,eps_high=null",
        "eps_low=0.2,eps_high=0.2",
        "eps_low=0.2,eps_high=null",
    ]
    assert settings[1].overrides == ("loss.eps_low=0.1", "loss.eps_high=null")
    with pytest.raises(ValueError, match="--grid expects"):
        grid_settings(["loss.eps_low"])


def test_named_setting():
    s = named_setting("ctl:control.kind=clip_low;control.target=1.0")
    assert s.label == "ctl" and s.overrides == ("control.kind=clip_low", "control.target=1.0")
    with pytest.raises(ValueError, match="--setting expects"):
        named_setting("ctl")


def test_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "configs/quick.yaml",
        "--grid",
        "loss.eps_high=0.2,null",
        "--seeds",
        "2",
        "--out",
        str(out),
    ]
    for override in [*SMALL, "run.steps=2"]:
        args += ["--set", override]
    result = CliRunner().invoke(app, [*args, "--baseline", "eps_high=0.2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [s["label"] for s in summary] == ["eps_high=0.2", "eps_high=null"]
    assert summary[1]["eps_high"] is None and summary[0]["n_seeds"] == 2
    assert (out / "report.md").is_file() and (out / "plots" / "probe_entropy.png").is_file()
    assert len(list((out / "eps_high=null").glob("seed*/metrics.jsonl"))) == 2

    # an interrupted or extended study continues from the runs' checkpoints instead of starting over
    first = (out / "eps_high=null" / "seed1" / "metrics.jsonl").read_text().splitlines()
    longer = [*args, "--set", "run.steps=3", "--resume"]
    result = CliRunner().invoke(app, longer)
    assert result.exit_code == 0, result.output
    again = (out / "eps_high=null" / "seed1" / "metrics.jsonl").read_text().splitlines()
    assert again[:2] == first and json.loads(again[2])["step"] == 3


def test_sweep_bad_input_exits_2(tmp_path):
    runner = CliRunner()
    bad_value = runner.invoke(
        app, ["sweep", "configs/quick.yaml", "--grid", "loss.eps_low=7", "--out", str(tmp_path)]
    )
    assert bad_value.exit_code == 2 and "loss.eps_low" in bad_value.output
    assert grid_settings([]) == []
    nothing = runner.invoke(app, ["sweep", "configs/quick.yaml", "--out", str(tmp_path)])
    assert nothing.exit_code == 2 and "--grid" in nothing.output


ORPHAN_SCRIPT = """
import multiprocessing as mp, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from entroclip.study import exit_with_parent
if __name__ == "__main__":
    pool = ProcessPoolExecutor(
        1, mp_context=mp.get_context("spawn"), initializer=exit_with_parent, initargs=(os.getpid(), 0.1)
    )
    with open(sys.argv[1], "w") as f:
        f.write(str(pool.submit(os.getpid).result()))
    pool.submit(time.sleep, 60)
    os._exit(0)  # the sweep dies without shutting its pool down (kill -9, OOM, a closed terminal)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sweep_workers_exit_with_the_sweep(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    pid_file = tmp_path / "worker.pid"
    subprocess.run([sys.executable, str(script), str(pid_file)], timeout=120, check=True)
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while process_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not process_alive(worker), "a sweep worker outlived its sweep"
    finally:
        if process_alive(worker):
            os.kill(worker, signal.SIGKILL)
