"""The trainer's CPU memory setting: freed blocks are reused without page faults (in fresh processes)."""

import subprocess
import sys

import pytest

from entroclip import allocator

# Allocate, fill and free a 64 MB block 30 times (the heap settles within a few rounds), then print the
# minor page faults of ten more rounds.
_CHILD = """
import resource, sys
import torch
from entroclip.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(30):
    torch.ones(2**24).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(2**24).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = faults("keep")
    _, returned = faults("default")
    assert applied == "True"
    # By default every allocation maps its pages afresh and faults them in: 10 x 16,384 faults of 4 KiB
    # pages here (fewer with transparent huge pages); with the setting, the heap's pages are reused.
    assert returned > 0
    assert kept <= returned // 10


def test_keep_freed_memory_changes_nothing_off_linux(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_applies_the_setting_from_its_config(tmp_path, monkeypatch, keep):
    from entroclip import trainer
    from entroclip.config import load_config

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1) or True)
    overrides = [f"run.out_dir={tmp_path / 'run'}", f"run.keep_freed_memory={str(keep).lower()}"]
    trainer.Trainer(load_config("configs/quick.yaml", overrides))
    assert calls == ([1] if keep else [])


def test_the_theory_commands_apply_the_setting(monkeypatch):
    from typer.testing import CliRunner

    from entroclip.cli import app
    from entroclip.theory import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    result = CliRunner().invoke(app, ["theory", "drift", "--n", "20", "--seeds", "50", "--json"])
    assert result.exit_code == 0, result.output
    assert calls == [1]
