"""Reliability (issue 8): kill -9 and exact resume, corrupt or incompatible checkpoints, failing rewards,
non-finite steps, malformed datasets, bad configs, unwritable or full disks and existing run folders."""

import copy
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest
import torch
from test_trainer import SMALL, rows, without_timings
from typer.testing import CliRunner

import entroclip.checkpoint as checkpoint
import entroclip.update as update
from entroclip.checkpoint import list_checkpoints, load_checkpoint
from entroclip.cli import app
from entroclip.config import load_config
from entroclip.rewards import close_workers
from entroclip.runio import config_fingerprint
from entroclip.trainer import Trainer

runner = CliRunner()


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def cli(*args: object):
    return runner.invoke(app, ["train", *map(str, args), "--no-progress"])


def error_line(result) -> str:
    """The CLI's output, checked to be a single ``error: ...`` line."""
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text, result.output
    return text


def unwrapped(result) -> str:
    """The CLI's output with the console's line wrapping undone."""
    return result.output.replace("\n", "")


def trainer(out: Path, *overrides: str, resume: bool = False) -> Trainer:
    cfg = load_config("configs/quick.yaml", [*SMALL, f"run.out_dir={out}", *overrides])
    return Trainer(cfg, resume=resume, overwrite=not resume, allow_code=True)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def equal(a: object, b: object) -> bool:
    """Exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("small") / "run"
    trainer(out, "run.steps=2", "run.checkpoint_every=1").train(show_progress=False)
    return out


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


# ----- rewards that raise, hang, return NaN or kill their worker -------------------------------------------
def reward_run(out: Path, mode: str) -> list[dict]:
    rewards = (
        "reward.name=faulty_rewards:faulty",
        f"reward.options={{mode: {mode}}}",
        "reward.timeout_s=1",
    )
    trainer(out, "run.steps=2", "task.prompts_per_step=2", "optim.minibatches=1", *rewards).train(
        show_progress=False
    )
    return rows(out)


@pytest.mark.parametrize("mode", ["raise", "hang", "nan", "exit"])
def test_failing_reward_scores_zero_and_the_run_goes_on(tmp_path, mode):
    try:
        # "ok" scores 0.0 exactly where the faulty modes fail: the same run, but without errors
        expected = reward_run(tmp_path / "ok", "ok")
        got = reward_run(tmp_path / mode, mode)
    finally:
        close_workers()
    n = 2 * 4  # prompts x group size
    assert len(got) == 2
    for g, e in zip(without_timings(got), without_timings(expected), strict=True):
        assert e["reward/errors"] == 0
        assert 0 < g["reward/errors"] < n
        assert g["reward/errors"] == n * (1 - g["reward/mean"])  # every failed sample scored exactly 0
        assert {**g, "reward/errors": 0.0} == e


# ----- non-finite loss or gradient -----------------------------------------------------------------------
class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def inject(monkeypatch, fault: Callable[[int], str | None]) -> None:
    """Give minibatch step k (counted over the run from 0) a NaN loss ("loss") or NaN gradient ("grad")."""
    real, calls = update.response_logits, count()

    def logits(*args, **kwargs):
        out = real(*args, **kwargs)
        kind = fault(next(calls))
        if kind == "loss":
            return out * math.nan
        return NaNGradient.apply(out) if kind == "grad" else out

    monkeypatch.setattr(update, "response_logits", logits)


def test_non_finite_step_is_skipped_and_changes_nothing(tmp_path, monkeypatch):
    inject(monkeypatch, {1: "loss", 2: "grad", 5: "grad"}.get)
    t = trainer(tmp_path / "run", "run.steps=2")
    real_step, seen = update._minibatch_step, []

    def state() -> dict:
        return copy.deepcopy({"params": list(t.model.parameters()), "optim": t.optimizer.state_dict()})

    def watched(*args, **kwargs):
        before = state()
        ok = real_step(*args, **kwargs)
        seen.append((ok, equal(before, state())))
        return ok

    monkeypatch.setattr(update, "_minibatch_step", watched)
    t.train(show_progress=False)
    # 2 epochs x 2 minibatches per step; every skipped step left parameters and AdamW state as they were
    assert [ok for ok, _ in seen] == [True, False, False, True, True, False, True, True]
    assert all(unchanged != ok for ok, unchanged in seen)
    metrics = rows(tmp_path / "run")
    assert [r["train/skipped_steps"] for r in metrics] == [2, 3]
    assert [r["train/optimizer_steps"] for r in metrics] == [2, 3]
    assert t.scheduler.last_epoch == 5 and t.consecutive_skips == 0
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_consecutive_non_finite_steps_stop_with_a_checkpoint_of_the_last_good_state(tmp_path, monkeypatch):
    inject(monkeypatch, lambda k: "loss" if k >= 4 else None)  # every minibatch step after RL step 1
    out = tmp_path / "run"
    overrides = sets(*SMALL, "run.steps=10", "run.checkpoint_every=1", "optim.max_skipped_steps=6")
    result = cli("configs/quick.yaml", *overrides, "--out", out)
    assert result.exit_code == 1
    message = error_line(result)
    assert "8 consecutive optimizer steps had a non-finite loss or gradient" in message
    assert "optim.max_skipped_steps=6" in message and f"saved to {out}/checkpoints/step_000003" in message
    assert [r["train/skipped_steps"] for r in rows(out)] == [0, 4, 8]
    fingerprint = config_fingerprint(load_config(out / "config.yaml"))
    good = load_checkpoint(out / "checkpoints/step_000001", fingerprint)
    last = load_checkpoint(out / "checkpoints/step_000003", fingerprint)
    assert equal(last.weights, good.weights)
    assert equal(last.state["optimizer"], good.state["optimizer"])
    assert equal(last.state["scheduler"], good.state["scheduler"])
    assert last.state["consecutive_skips"] == 8


# ----- malformed dataset lines ---------------------------------------------------------------------------
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": f"{a}+{a + 7}=", "answer": str(2 * a + 7)}) for a in range(10, 50)]
    lines[2] = '{"prompt": "1+2=", "answer": '  # line 3: cut-off JSON
    lines[6] = json.dumps({"question": "3+4=", "answer": "7"})  # line 7: no prompt field
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_dataset_line_is_an_error_with_file_and_line(tmp_path):
    path, out = dataset(tmp_path), tmp_path / "never"
    result = cli(
        "configs/quick.yaml", *sets("task.name=jsonl", f"task.options={{path: {path}}}"), "--out", out
    )
    assert result.exit_code == 2
    assert f"{path}:3: invalid JSON" in error_line(result)
    assert not out.exists()


def test_malformed_dataset_lines_are_skipped_and_counted_on_request(tmp_path):
    path, out = dataset(tmp_path), tmp_path / "run"
    task = ("task.name=jsonl", f"task.options={{path: {path}, on_bad_line: skip, eval_fraction: 0.5}}")
    result = cli("configs/quick.yaml", *sets(*SMALL, *task, "run.steps=2"), "--out", out)
    assert result.exit_code == 0, result.output
    assert "skipped 2 malformed dataset lines (task.options.on_bad_line=skip)" in unwrapped(result)
    assert [r["data/skipped_lines"] for r in rows(out)] == [2, 2]


# ----- bad configs ---------------------------------------------------------------------------------------
BAD_CONFIGS = [
    # (--set overrides, the field, the allowed values)
    (["loss.eps_low=1.5"], "loss.eps_low", "less than or equal to 1"),
    (["loss.eps_high=-0.1"], "loss.eps_high", "greater than or equal to 0"),
    (["rollout.group_size=1", "advantage.kind=grpo"], "rollout.group_size", "must be >= 2"),
    (["optim.epochs=0"], "optim.epochs", "greater than or equal to 1"),
    (["optim.minibatches=200"], "optim.minibatches", "<= task.prompts_per_step * rollout.group_size = 128"),
    (["model.builtin=null", "model.path=/nonexistent/model"], "model.path", "Hugging Face model folder"),
    (["task.name=jsonl", "task.options={path: /nonexistent/data.jsonl}"], "task", "dataset file not found"),
    (["optim.lr=fast"], "optim.lr", "valid number"),
    (["run.steps=[3]"], "run.steps", "valid integer"),
    (["loss.eps_low=[0.2"], "loss.eps_low", "valid number"),
    (["run.bogus=1"], "run.bogus: unknown key", "known: out_dir, seed, steps"),
    (["lossy.eps_low=0.2"], "lossy: unknown key", "known: model, task, reward"),
    (["loss.agg=mean"], "loss.agg", "'token-mean', 'seq-mean-token-mean'"),
    (["loss.kl.kind=k4"], "loss.kl.kind", "'k1', 'k2' or 'k3'"),
    (["advantage.kind=ppo"], "advantage.kind", "'grpo', 'drgrpo', 'rloo' or 'gae'"),
    (["model.path=/some/model"], "model", "exactly one of model.builtin, model.path, model.gguf_file"),
    (["reward.name=nope"], "reward", "known: exact_match"),
    (["reward.name=no_such_module:score"], "reward.name", "--allow-code"),
    (["reward.name=os:system"], "reward.name", "standard library"),
    (["task.options.bogus=1"], "task", "accepted options: digits"),
    (["reward.timeout_s=0"], "reward.timeout_s", "greater than 0"),
    (["loss.dual_clip=1"], "loss.dual_clip", "greater than 1"),
    (["rollout.top_p=1.5"], "rollout.top_p", "less than or equal to 1"),
    (["model.dtype=float16"], "model.dtype", "'float32' or 'bfloat16'"),
    (["run.parallel=zero3"], "run.parallel", "'ddp' or 'fsdp'"),
    (["loss.eps_low.max=1"], "loss.eps_low", "is not a section"),
    (["run.steps"], "--set", "key=value"),
]


@pytest.mark.parametrize(("overrides", "field", "allowed"), BAD_CONFIGS, ids=lambda x: str(x)[:40])
def test_bad_config_is_one_line_naming_field_and_values_exit_2_no_run_folder(
    tmp_path, overrides, field, allowed
):
    out = tmp_path / "never"
    result = cli("configs/quick.yaml", *sets(*overrides), "--out", out)
    assert result.exit_code == 2
    message = error_line(result)
    assert field in message and allowed in message, message
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("loss:\n  eps_low: 0.2\n eps_high: 3\n", "bad.yaml:3:2: not valid YAML"),
        ("loss: [1, 2\n", "bad.yaml:2:1: not valid YAML"),
        ("- loss\n- optim\n", "the top level must be a mapping"),
    ],
)
def test_bad_yaml_file_is_one_line_exit_2(tmp_path, text, message):
    path, out = tmp_path / "bad.yaml", tmp_path / "never"
    path.write_text(text)
    result = cli(path, "--out", out)
    assert result.exit_code == 2 and message in error_line(result) and not out.exists()


def test_missing_config_file_exit_2(tmp_path):
    result = cli(tmp_path / "nope.yaml", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "config file not found" in error_line(result)
    assert list(tmp_path.iterdir()) == []


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
