"""Bad inputs a hostile user tried: each is refused with one line naming the field, exit code 2, no
traceback, no folder left behind, and nothing changed in an existing run folder. (Run folders changed
behind a run's back are in test_run_folders.py; sweeps and sft in their own files.)"""

import json
import shutil
import sys
from pathlib import Path

import pytest
from test_reliability import cli, error_line, files, sets, trainer
from typer.testing import CliRunner

from entroclip.cli import app


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Inputs on disk: a dataset with 2 held-out rows, model folders with broken configs, a non-UTF-8
    config."""
    root = tmp_path_factory.mktemp("inputs")
    with (root / "small.jsonl").open("w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n")
    for name, text in (("empty_config", "{}"), ("broken_config", "{bro")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
    (root / "latin1.yaml").write_bytes("run:\n  steps: 2 # d\xe9j\xe0\n".encode("latin-1"))
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer(out, "run.steps=1").train(show_progress=False)
    return out


#: (overrides, text the one-line error must hold); {data} is the inputs folder
BAD_OVERRIDES = [
    (["task.name=jsonl", "task.options={{path: {data}/small.jsonl}}"], "diagnostics.probe_prompts: task"),
    (
        [
            "task.name=jsonl",
            "task.options={{path: {data}/small.jsonl}}",
            "diagnostics.probe_prompts=0",
            "eval.every=1",
            "eval.prompts=16",
        ],
        "eval.prompts: task 'jsonl' has 2 held-out examples, 16 were asked for",
    ),
    (["diagnostics.probe_prompts=2000"], "diagnostics.probe_prompts: task 'addition' has 1008 held-out"),
    (["eval.every=1", "eval.prompts=2000"], "eval.prompts: task 'addition' has 1008 held-out"),
    (["run.seed=9223372036854775808"], "run.seed: Input should be less than or equal to 9223372036854775807"),
    (["task.options.digits=100000"], "task: digits must be an int in [1, 1000]"),
    (["task.options.digits=200"], "exceed the model's 256 positions"),
    (["model.builtin=null", "model.path={data}/empty_config"], "model.path: "),
    (["model.builtin=null", "model.path={data}/broken_config"], "is not a usable model config"),
    (["run.steps=true"], "run.steps: expected an integer, got true"),
    (["optim.lr=false"], "optim.lr: expected a number, got false"),
    (["eval.k=100000"], "eval.k: Input should be less than or equal to 1024"),
    (["diagnostics.probe_samples=5000"], "diagnostics.probe_samples: Input should be less than or equal"),
    (
        ["task.prompts_per_step=65536", "rollout.group_size=1024"],
        "a step of this config needs about",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_OVERRIDES, ids=lambda x: str(x)[:50])
def test_bad_override_is_one_line_exit_2_and_no_folder(tmp_path, data, overrides, message):
    out = tmp_path / "never"
    result = cli("configs/quick.yaml", *sets(*(o.format(data=data) for o in overrides)), "--out", out)
    assert result.exit_code == 2, result.output
    assert message in error_line(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("overrides", "message"), BAD_OVERRIDES, ids=lambda x: str(x)[:50])
def test_bad_override_on_resume_changes_nothing(tmp_path, data, finished_run, overrides, message):
    run = shutil.copytree(finished_run, tmp_path / "run")
    before = files(run)
    result = cli("--resume", run, *sets("run.steps=3", *(o.format(data=data) for o in overrides)))
    assert result.exit_code == 2, result.output
    error_line(result)
    assert files(run) == before


def test_wandb_without_wandb_is_refused_before_the_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whether installed or not
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    out = tmp_path / "never"
    result = cli("configs/quick.yaml", *sets("run.wandb_project=p"), "--out", out)
    assert result.exit_code == 2 and "wandb is not installed" in error_line(result)
    assert not out.exists()


def test_non_utf8_config_file_is_one_line(tmp_path, data):
    result = cli(data / "latin1.yaml", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "latin1.yaml: not UTF-8 text" in error_line(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args", [["--seeds", "1000000000"], ["--n", "100000000"], ["--contexts", "10000000"]]
)
def test_theory_lab_refuses_policies_that_cannot_fit_in_memory(args):
    result = CliRunner().invoke(app, ["theory", "drift", *args])
    assert result.exit_code == 2
    assert "of memory and" in result.output.replace("\n", " ") and "Traceback" not in result.output
