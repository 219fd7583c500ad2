"""Failures during a run: rewards that raise, hang, return NaN or kill their worker; non-finite losses or
gradients; malformed dataset lines."""

import copy
import json
import math
from collections.abc import Callable
from itertools import count
from pathlib import Path

import pytest
import torch
from support import SMALL, cli, equal, error_line, rows, sets, trainer, unwrapped, without_timings

import entroclip.update as update
from entroclip.checkpoint import load_checkpoint
from entroclip.config import load_config
from entroclip.rewards import close_workers
from entroclip.runio import config_fingerprint


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


def test_a_run_whose_reward_always_fails_warns_once_then_stops_with_exit_1(tmp_path):
    from support import cli, sets

    out = tmp_path / "run"
    reward = ("reward.name=faulty_rewards:faulty", "reward.options={mode: always_raise}")
    result = cli("configs/quick.yaml", *sets(*reward, "run.steps=10"), "--out", out, "--allow-code")
    assert result.exit_code == 1
    lines = result.output.replace("\n  ", " ").strip().splitlines()
    warnings = [line for line in lines if line.startswith("warning: step")]
    assert len(warnings) == 1 and "RuntimeError: this reward always crashes" in warnings[0]
    assert lines[-1].startswith("error: the reward failed on every sample for 3 consecutive steps")
    assert "reward.max_failed_steps=3" in lines[-1]
    assert not (out / "checkpoints").exists()


def test_the_monitor_resumes_exactly(tmp_path):
    """A run stopped at a checkpoint in the middle of a failing streak counts on from where it was."""
    from support import cli, sets

    out = tmp_path / "run"
    reward = ("reward.name=faulty_rewards:faulty", "reward.options={mode: always_raise}")
    schedule = ("run.steps=2", "run.checkpoint_every=1", "reward.max_failed_steps=4")
    first = cli("configs/quick.yaml", *sets(*reward, *schedule), "--out", out, "--allow-code")
    assert first.exit_code == 0, first.output
    resumed = cli("--resume", out, *sets("run.steps=10"), "--allow-code")
    assert resumed.exit_code == 1
    assert "for 4 consecutive steps (up to step 4;" in resumed.output.replace("\n", "")
