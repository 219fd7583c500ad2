"""Tasks: determinism per seed, disjoint eval splits, local datasets and the registry."""

import json
import sys

import pytest

from entroclip.tasks import (
    AdditionTask,
    Example,
    JsonlTask,
    MultiplicationTask,
    ReverseTask,
    Task,
    in_eval_split,
    make_task,
    register_task,
)

PROCEDURAL = [
    AdditionTask(),
    AdditionTask(digits=4),
    MultiplicationTask(digits=3),
    ReverseTask(),
    ReverseTask(6),
]


def test_example_defaults_and_hash():
    ex = Example("1+1=", "2")
    assert ex.meta == {} and ex == Example("1+1=", "2")
    assert hash(Example("q", "a", {"x": [1]})) == hash(Example("q", "a"))
    with pytest.raises(AttributeError):
        ex.prompt = "x"  # type: ignore[misc]


@pytest.mark.parametrize("task", PROCEDURAL, ids=repr)
def test_procedural_stream_is_deterministic_and_resumable(task):
    first = task.examples(40, seed=3)
    assert first == task.examples(40, seed=3)
    assert first == task.examples(15, seed=3) + task.examples(25, seed=3, offset=15)
    assert first != task.examples(40, seed=4)
    assert isinstance(task, Task) and task.name in ("addition", "multiplication", "reverse")


@pytest.mark.parametrize("task", PROCEDURAL, ids=repr)
def test_procedural_answers_and_alphabet(task):
    for ex in task.examples(50, seed=0) + task.eval_examples(20):
        assert set(ex.prompt + ex.answer) <= set(task.alphabet)
        assert ex.prompt.endswith("=")
        if task.name == "reverse":
            assert ex.answer == ex.prompt[1:-1][::-1] and len(ex.answer) == task.digits
        else:
            assert ex.answer == str(eval(ex.prompt[:-1]))


@pytest.mark.parametrize("task", PROCEDURAL, ids=repr)
def test_procedural_eval_split_never_in_training_stream(task):
    held = task.eval_examples(30, seed=1)
    assert len({ex.prompt for ex in held}) == 30
    assert all(in_eval_split(ex.prompt, task.eval_fraction) for ex in held)
    train_prompts = {ex.prompt for ex in task.examples(3000, seed=5)}
    assert not any(in_eval_split(p, task.eval_fraction) for p in train_prompts)
    assert held[:10] == task.eval_examples(10, seed=1)
    assert held != task.eval_examples(30, seed=2)


def test_small_space_is_covered_exactly():
    task = AdditionTask(digits=1)
    held = task.eval_examples(len(task._split[1]))
    train = {ex.prompt for ex in task.examples(3000, seed=0)}
    assert len(train) + len(held) == 100 and not train & {ex.prompt for ex in held}
    with pytest.raises(ValueError, match=r"has \d+ held-out problems .* 1000 were asked for"):
        task.eval_examples(1000)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AdditionTask(digits=0), r"digits must be an int in \[1, 1000\]"),
        (lambda: ReverseTask(eval_fraction=1.0), r"eval_fraction must be in \[0, 1\)"),
        (lambda: AdditionTask().examples(-1, 0), "n must be a non-negative int"),
        (lambda: AdditionTask().examples(2, seed=-1), "seed must be a non-negative int"),
        (lambda: AdditionTask(eval_fraction=0.0).eval_examples(2), "no held-out split"),
        (lambda: ReverseTask(digits=1, eval_fraction=0.999).examples(1, 0), "holds out all of them"),
    ],
)
def test_procedural_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_make_task_registry():
    task = make_task("addition", digits=3)
    assert task == AdditionTask(digits=3)
    assert make_task("entroclip.tasks.procedural:ReverseTask", digits=2) == ReverseTask(digits=2)
    with pytest.raises(
        ValueError, match="unknown task 'nope'; known: addition, addition_trace, jsonl, multiplication"
    ):
        make_task("nope")
    with pytest.raises(ValueError, match="accepted options: digits, eval_fraction"):
        make_task("addition", digit=3)
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        make_task("entroclip.tasks.procedural:Nope")

    @register_task("test_echo")
    def echo(word: str = "hi") -> Task:
        from entroclip.tasks.dataset import FiniteTask

        return FiniteTask("test_echo", [Example(word, word)], [])

    assert make_task("test_echo", word="ab").examples(3, 0) == [Example("ab", "ab")] * 3
    with pytest.raises(ValueError, match="already registered"):
        register_task("test_echo")(echo)


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


ROWS = [{"question": f"q{i}", "solution": i, "extra": "x"} for i in range(60)]


def test_local_jsonl_reads_rows_and_splits(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [*ROWS[:30], "", "   ", *ROWS[30:]])
    task = make_task("jsonl", path=str(path), prompt_field="question", answer_field="solution")
    assert task.skipped_lines == 0
    assert len(task.train) + len(task.held_out) == 60 and task.held_out
    assert not {ex.prompt for ex in task.train} & {ex.prompt for ex in task.held_out}
    ex = task.train[0]
    assert ex.answer == str(ex.meta["row"]["solution"]) and ex.meta["source"].startswith(f"{path}:")
    assert set(task.alphabet) == set("q0123456789")
    # The stream visits every training example once per epoch, in a seed-dependent order.
    n = len(task.train)
    stream = task.examples(2 * n, seed=7)
    assert sorted(e.prompt for e in stream[:n]) == sorted(e.prompt for e in task.train)
    assert stream[:n] != stream[n:] and stream == task.examples(2 * n, seed=7)
    assert stream[:5] + task.examples(10, seed=7, offset=5) == stream[:15]
    assert len(task.eval_examples(len(task.held_out))) == len(task.held_out)


def test_local_eval_path_and_open_prompts(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "c"}])
    task = JsonlTask(train, answer_field=None, eval_path=held)
    assert [e.prompt for e in task.train] == ["a", "b"] and task.eval_examples(1)[0] == Example(
        "c", None, task.held_out[0].meta
    )
    assert task.train[0].answer is None
    with pytest.raises(ValueError, match="has 1 held-out examples, 2 were asked for"):
        task.eval_examples(2)


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"question": "q"}', "field 'solution' is missing"),
    ('{"question": 3, "solution": 1}', "field 'question' must be a non-empty string"),
    ('{"question": "q", "solution": [1]}', "field 'solution' must be a string or number"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_local_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], line, ROWS[2]])
    with pytest.raises(ValueError, match=f"{path}:3: {message}"):
        JsonlTask(path, prompt_field="question", answer_field="solution")


def test_local_skip_mode_counts(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], *(line for line, _ in BAD_LINES), *ROWS[1:40]])
    task = JsonlTask(path, prompt_field="question", answer_field="solution", on_bad_line="skip")
    assert task.skipped_lines == len(BAD_LINES)
    assert len(task.train) + len(task.held_out) == 40
    only_bad = write_jsonl(tmp_path / "only_bad.jsonl", ["{", "{"])
    with pytest.raises(ValueError, match="has no valid rows"):
        JsonlTask(only_bad, on_bad_line="skip")


def test_local_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="dataset file not found: .*missing.jsonl"):
        JsonlTask(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"must end with one of \('.jsonl', '.parquet'\)"):
        JsonlTask(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="on_bad_line must be one of"):
        JsonlTask(tmp_path / "data.jsonl", on_bad_line="ignore")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs the pyarrow package"):
        JsonlTask(tmp_path / "data.parquet")


def test_local_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([*ROWS[:20], {"question": None, "solution": 1}]), path)
    with pytest.raises(ValueError, match=f"{path} row 21: field 'question'"):
        JsonlTask(path, prompt_field="question", answer_field="solution")
    task = JsonlTask(path, prompt_field="question", answer_field="solution", on_bad_line="skip")
    assert task.skipped_lines == 1 and len(task.train) + len(task.held_out) == 20


def test_reasoning_gym_task():
    pytest.importorskip("reasoning_gym")
    task = make_task(
        "reasoning_gym", dataset="basic_arithmetic", size=40, eval_size=20, config={"max_terms": 3}
    )
    assert len(task.train) == 40 and 0 < len(task.held_out) <= 20
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.held_out}
    ex = task.examples(1, seed=0)[0]
    assert ex.prompt == ex.meta["entry"]["question"] and ex.answer == ex.meta["entry"]["answer"]
    assert ex.meta["dataset"] == "basic_arithmetic" and ex.meta["config"] == {"max_terms": 3}
    again = make_task(
        "reasoning_gym", dataset="basic_arithmetic", size=40, eval_size=20, config={"max_terms": 3}
    )
    assert again.examples(10, seed=2) == task.examples(10, seed=2) != task.examples(10, seed=3)
    with pytest.raises(ValueError, match="close matches: basic_arithmetic"):
        make_task("reasoning_gym", dataset="basic_arithmetc")
    with pytest.raises(ValueError, match="not config"):
        make_task("reasoning_gym", dataset="basic_arithmetic", config={"seed": 1})
    with pytest.raises(ValueError, match="invalid config for reasoning-gym dataset 'basic_arithmetic'"):
        make_task("reasoning_gym", dataset="basic_arithmetic", config={"no_such_option": 1})


RGYM_OPTIONS = (
    "{dataset: basic_arithmetic, size: 200, eval_size: 40, "
    "config: {min_terms: 2, max_terms: 2, max_digits: 1, operators: ['+']}}"
)


def test_sft_on_a_reasoning_gym_task(tmp_path):
    """`entroclip sft --options` builds the task from a YAML mapping; a too-small held-out split fails
    before any training, and a bad mapping names the flag."""
    pytest.importorskip("reasoning_gym")
    from typer.testing import CliRunner

    from entroclip.cli import app

    runner = CliRunner()
    base = ["sft", "--task", "reasoning_gym", "--steps", "2", "--batch-size", "8", "--eval-prompts", "16"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "m"), "--options", RGYM_OPTIONS])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m" / "sft_summary.json").read_text())
    assert summary["steps"] == 2.0 and 0.0 <= summary["accuracy"] <= 1.0
    tokenizer_chars = json.loads((tmp_path / "m" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"C", "+", "."} <= set(tokenizer_chars)  # the alphabet of "Calculate 3 + 4."

    small = RGYM_OPTIONS.replace("eval_size: 40", "eval_size: 5")
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "small"), "--options", small])
    assert result.exit_code == 2 and "held-out examples, 16 were asked for" in unwrapped(result)
    assert not (tmp_path / "small").exists()
    for bad, message in (("[1, 2]", "must be a YAML mapping"), ("{a: [", "not valid YAML")):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--options", bad])
        assert result.exit_code == 2 and message in unwrapped(result)


def unwrapped(result) -> str:
    """The CLI's output with the console's line wrapping undone."""
    return result.output.replace("\n", "")
