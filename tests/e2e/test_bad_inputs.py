"""Bad inputs a hostile user tried: each is refused with one line naming the field, exit code 2, no
traceback, no folder left behind, and nothing changed in an existing run folder.

The hostile read's cases and where each is tested (tests/e2e/):
- a pickled payload in state.pt; import paths in a config or a run folder's config.yaml; a cut, emptied,
  deleted or edited metrics.jsonl; ``--resume A --out B``; a changed or deleted probe set; a run killed
  during its set-up: test_run_folders.py
- a sweep into an existing folder; Ctrl+C in a sweep; a ``../`` label; a failing run; resumed progress;
  cut help; ``sweep --allow-code``: test_sweep_reliability.py
- ``sft --model /nonexistent``, a foreign ``--out``, ``--lr 0`` and other ranges, help: test_sft_cli.py
- a full disk (tmpfs and simulated), safetensors' writer failing: test_disk_full.py, test_run_folders.py
- rewards failing on every sample, warnings once per message, time-outs costing the limit:
  test_run_failures.py, unit/test_reward_monitor.py, unit/test_rewards.py
- too few held-out rows, probe_prompts=2000, eval.prompts=2000, wandb missing, run.seed beyond 2^63,
  digits=100000, prompts longer than the model's positions, an empty or broken config.json, a non-UTF-8
  config, ``run.steps=true``, eval.k and theory --n / --seeds / --contexts too large, the largest batch the
  config allows, and the schema's own errors: here
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
from support import cli, error_line, files, sets, trainer
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
    (["loss.kind=gspo", "loss.dual_clip=3"], "loss.dual_clip is defined for loss.kind ppo and ce_gppo"),
    (["loss.kind=sapo", "control.kind=clip_cov"], "control.kind='clip_cov' acts on PPO's token clip"),
    (["loss.kind=ppo2"], "loss.kind: Input should be 'ppo', 'gspo', 'cispo', 'sapo' or 'ce_gppo'"),
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
