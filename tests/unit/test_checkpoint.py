"""Checkpoints are atomic and verified: corrupt, partial or incompatible ones are refused."""

import pytest
import torch

from entroclip.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def weights():
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}


def test_round_trip(tmp_path):
    state = {"step": 7, "optimizer": {"lr": 0.1}, "rng": torch.get_rng_state()}
    path = save_checkpoint(tmp_path, 7, weights(), state, "abc")
    ckpt = load_checkpoint(path, "abc")
    assert ckpt.step == 7
    assert torch.equal(ckpt.weights["w"], weights()["w"])
    assert torch.equal(ckpt.state["rng"], state["rng"])


def test_latest_ignores_temporary_folders(tmp_path):
    save_checkpoint(tmp_path, 5, weights(), {}, "f")
    save_checkpoint(tmp_path, 10, weights(), {}, "f")
    (tmp_path / "checkpoints" / ".step_000015.tmp").mkdir()  # a write that was killed half-way
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10]
    assert latest_checkpoint(tmp_path, "f").step == 10
    assert latest_checkpoint(tmp_path / "empty", "f") is None


def test_corrupt_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 3, weights(), {"x": 1}, "f")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, "f")


def test_missing_manifest_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 3, weights(), {}, "f")
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        load_checkpoint(path, "f")


def test_incompatible_config_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 3, weights(), {}, "f")
    with pytest.raises(CheckpointError, match="incompatible config"):
        load_checkpoint(path, "other")
