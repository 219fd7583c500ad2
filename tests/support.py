"""Helpers shared by the test files: small trainer runs, the CLI, and comparisons of run folders."""

import json
from pathlib import Path

import torch
import typer
from typer.testing import CliRunner

from entroclip.cli import app
from entroclip.config import load_config
from entroclip.trainer import Trainer

SMALL = [
    "task.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=4",
    "optim.epochs=2",
    "optim.minibatches=2",
    "optim.lr=1e-3",
    "diagnostics.probe_prompts=4",
    "diagnostics.probe_samples=2",
    "run.tensorboard=false",
]


def train(tmp_path: Path, *overrides: str, name: str = "run", resume: bool = False) -> Path:
    out = tmp_path / name
    cfg = load_config("configs/quick.yaml", [*SMALL, f"run.out_dir={out}", *overrides])
    return Trainer(cfg, resume=resume, overwrite=not resume).train(show_progress=False)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in metrics]


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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux: reads /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def assert_help_is_whole(command: str) -> None:
    """Every option of ``command`` has a help text, shown whole (not cut with an ellipsis) by ``--help`` at
    80 columns and on a wide terminal."""
    params = [
        p for p in typer.main.get_command(app).commands[command].params if p.param_type_name == "option"
    ]
    assert params
    for columns in ("80", "250"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": columns})
        assert result.exit_code == 0 and "…" not in result.output, result.output
        shown = " ".join(line.strip("│╭╮╰╯─ ") for line in result.output.splitlines())
        shown = " ".join(shown.split())
        for param in params:
            assert param.help, f"{param.opts[0]} has no help"
            assert " ".join(param.help.split()) in shown, (param.opts[0], result.output)
