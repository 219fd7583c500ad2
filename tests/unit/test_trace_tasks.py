"""Traced tasks: contracts of the stream and the split, the scratchpads' arithmetic, the trace_answer
reward's blindness to the trace, the trace/answer mask split and the fit in a built-in model."""

import json
import math
import random
import re
from collections import Counter, defaultdict

import pytest
import torch

from entroclip.policy.builtin import char_tokenizer
from entroclip.policy.sampling import response_mask_from
from entroclip.rewards import exact_match, make_reward
from entroclip.rewards.trace import trace_answer
from entroclip.tasks import (
    DELIMITER,
    AdditionTraceTask,
    Example,
    FillerTraceTask,
    Task,
    TracedTask,
    in_eval_split,
    make_task,
    sft_target,
    trace_answer_masks,
)

TRACED = {
    "addition_trace": AdditionTraceTask(),
    "addition_trace-3": AdditionTraceTask(digits=3),
    "trace": FillerTraceTask(),
    "trace-reverse": FillerTraceTask(base="reverse", trace_len=5, trace_alphabet="xy"),
    "trace-mult-empty": FillerTraceTask(base="multiplication", base_options={"digits": 2}, trace_len=0),
}
STEP = re.compile(r"(\d+)\+(\d+)(\+1)?=(\d+)")


def split_target(example: Example) -> tuple[str, str]:
    """(trace, answer) of the target, checking that it is ``trace + DELIMITER + answer``."""
    trace, delimiter, answer = sft_target(example).partition(DELIMITER)
    assert delimiter and answer == example.answer and DELIMITER not in trace
    return trace, answer


@pytest.mark.parametrize("task", TRACED.values(), ids=TRACED.keys())
def test_stream_is_deterministic_resumable_and_keeps_the_base_problems(task):
    first = task.examples(40, seed=3)
    assert first == task.examples(40, seed=3)
    assert first == task.examples(15, seed=3) + task.examples(25, seed=3, offset=15)
    assert first != task.examples(40, seed=4)
    base = task.base.examples(40, seed=3)
    assert [(e.prompt, e.answer) for e in first] == [(e.prompt, e.answer) for e in base]
    for ex in first + task.eval_examples(20):
        split_target(ex)


@pytest.mark.parametrize("task", TRACED.values(), ids=TRACED.keys())
def test_eval_split_is_held_out_and_stable(task):
    held = task.eval_examples(30, seed=1)
    assert len({ex.prompt for ex in held}) == 30
    assert all(in_eval_split(ex.prompt, task.base.eval_fraction) for ex in held)
    train_prompts = {ex.prompt for ex in task.examples(3000, seed=5)}
    assert not train_prompts & {ex.prompt for ex in task.eval_examples(100, seed=0)}
    assert held[:10] == task.eval_examples(10, seed=1)
    assert held != task.eval_examples(30, seed=2)


@pytest.mark.parametrize("task", TRACED.values(), ids=TRACED.keys())
def test_alphabet_covers_prompts_and_targets(task):
    assert DELIMITER in task.alphabet
    for ex in task.examples(500, seed=0) + task.eval_examples(50):
        assert set(ex.prompt + sft_target(ex)) <= set(task.alphabet)


def column_steps(a: int, b: int, digits: int, steps: list[tuple[int, int, int, int]]) -> bool:
    """Whether ``steps`` add a and b column by column from the units, carrying, and spell out a + b."""
    if len(steps) != digits:
        return False
    carry = 0
    for k, (x, y, c, s) in enumerate(steps):
        if sorted((x, y)) != sorted((a // 10**k % 10, b // 10**k % 10)) or c != carry or s != x + y + c:
            return False
        carry = s // 10
    spelled = str(steps[-1][3]) + "".join(str(s % 10) for *_, s in reversed(steps[:-1]))
    return int(spelled) == a + b


def part_steps(a: int, b: int, steps: list[tuple[int, int, int, int]]) -> bool:
    """Whether ``steps`` are true carry-free sums that combine parts of a and b (each operand, its
    tens-and-above or its units) and earlier results, every result used once, ending at a + b."""
    parts = {p for n in (a, b) for p in (n, n - n % 10, n % 10)}
    leaves, pending = [], []
    for x, y, c, s in steps:
        if c or x + y != s:
            return False
        for term in (x, y):
            if term in pending:
                pending.remove(term)
            elif term in parts:
                leaves.append(term)
            else:
                return False
        pending.append(s)
    return pending == [a + b] and sum(leaves) == a + b


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_scratchpads_are_valid_arithmetic_in_several_forms(digits):
    task = AdditionTraceTask(digits=digits)
    forms: Counter[str] = Counter()
    for ex in task.examples(1500, seed=0) + task.eval_examples(10):
        a, b = map(int, ex.prompt.removesuffix("=").split("+"))
        trace, answer = split_target(ex)
        assert int(answer) == a + b
        matches = [STEP.fullmatch(text) for text in trace.split(" ")]
        assert all(matches), trace
        steps = [(int(m[1]), int(m[2]), int(bool(m[3])), int(m[4])) for m in matches if m]
        if column_steps(a, b, digits, steps):
            forms["column"] += 1
        else:
            assert part_steps(a, b, steps), trace
            forms[f"parts-{len(steps)}"] += 1
    assert set(forms) == {"column", "parts-2", "parts-3"} and min(forms.values()) > 300


def test_scratchpads_vary_for_one_prompt():
    """The target has entropy in the trace: each of the 90 training prompts of 1-digit addition, drawn
    about 30 times, gets several scratchpads (3 forms, and each step's operands in either order)."""
    traces = defaultdict(set)
    for ex in AdditionTraceTask(digits=1).examples(3000, seed=0):
        traces[ex.prompt].add(split_target(ex)[0])
    assert len(traces) == 90 and min(map(len, traces.values())) >= 3


def test_filler_is_uniform_over_its_alphabet_and_of_fixed_length():
    task = FillerTraceTask(base="addition", trace_len=10, trace_alphabet="abcd")
    counts: Counter[str] = Counter()
    for ex in task.examples(2000, seed=0):
        trace, _ = split_target(ex)
        assert len(trace) == 10
        counts.update(trace)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert set(counts) == set("abcd") and entropy == pytest.approx(math.log(4), abs=1e-3)


def test_filler_over_an_open_text_base(tmp_path):
    rows = [{"prompt": f"question {i}?", "answer": f"answer {i}"} for i in range(50)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = make_task("trace", base="jsonl", base_options={"path": str(path)}, trace_len=3, trace_alphabet="z")
    assert set(task.alphabet) == set(task.base.alphabet) | {"z", DELIMITER}  # the dataset's characters
    for ex in task.examples(20, seed=0):
        assert sft_target(ex) == f"zzz#{ex.answer}" and ex.meta["row"]["answer"] == ex.answer


def test_bad_options_and_bases_are_refused(tmp_path):
    for options, message in [
        ({"trace_len": -1}, "trace_len must be a non-negative int"),
        ({"trace_alphabet": ""}, "trace_alphabet must be a non-empty string"),
        ({"trace_alphabet": "aab"}, "must not repeat a character"),
        ({"trace_alphabet": "a#"}, "must not repeat a character or contain '#'"),
        ({"base": "trace"}, "uses the trace delimiter '#'"),
        ({"trace_length": 3}, "invalid options for task 'trace'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            make_task("trace", **options)
    with pytest.raises(ValueError, match=r"digits must be an int"):
        make_task("addition_trace", digits=0)
    path = tmp_path / "hash.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "answer": "a#b"}) for i in range(10)))
    with pytest.raises(ValueError, match="task 'jsonl' uses the trace delimiter '#' in its alphabet"):
        make_task("trace", base="jsonl", base_options={"path": str(path)})


class OpenTask(Task):
    """Prompts ``q<j>`` with one fixed answer, over open text (no alphabet to check up front)."""

    name = "open"

    def __init__(self, answer: str | None) -> None:
        self.answer = answer

    def examples(self, n: int, seed: int, offset: int = 0) -> list[Example]:
        return [Example(f"q{j}", self.answer) for j in range(offset, offset + n)]

    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        return self.examples(n, seed)


class Dashes(TracedTask):
    name = "dashes"

    def trace(self, example: Example, rng: random.Random) -> str:
        return "-"


@pytest.mark.parametrize("answer", [None, "a#b"])
def test_answers_the_reward_cannot_read_are_refused(answer):
    with pytest.raises(ValueError, match=r"task 'dashes' needs base answers without '#'; task 'open' gave"):
        Dashes(OpenTask(answer)).examples(1, seed=0)
    assert sft_target(Dashes(OpenTask("ok")).eval_examples(1)[0]) == "-#ok"


def test_reward_reads_only_the_answer_after_the_last_delimiter():
    reward = make_reward("trace_answer")
    rng = random.Random(0)
    for ex in AdditionTraceTask().examples(200, seed=0):
        trace, answer = split_target(ex)
        assert reward(sft_target(ex), ex) == 1.0 == exact_match()(answer, ex)
        junk = "".join(rng.choices("0123456789+= abc", k=rng.randrange(30)))
        for other in ("", junk, f"{trace} {junk}", "999", f"{junk}#{junk}"):
            assert reward(f"{other}#{answer}", ex) == 1.0  # any trace, same answer, same reward
        wrong = str(int(answer) + 1)
        assert reward(f"{trace}#{wrong}", ex) == 0.0  # a perfect trace does not rescue a wrong answer
        assert reward(f"{trace}#{answer}#{wrong}", ex) == 0.0
        assert reward(f"{trace} {answer}", ex) == 0.0 == reward(answer, ex)  # no delimiter
        assert reward(f"{trace}#", ex) == 0.0
        assert exact_match()(sft_target(ex), ex) == 0.0  # why exact_match cannot score traces


def test_reward_options():
    ex = Example("1+1=", "Two")
    assert trace_answer(stop=["<eos>"])("x#Two<eos>#three", ex) == 1.0
    assert trace_answer(delimiter="ANSWER:")("x#y ANSWER:  two ", ex) == 0.0
    assert trace_answer(delimiter="ANSWER:", case_sensitive=False)("x#y ANSWER:  two ", ex) == 1.0
    with pytest.raises(ValueError, match="delimiter must be a non-empty string"):
        trace_answer(delimiter="")
    with pytest.raises(ValueError, match="needs a reference answer"):
        trace_answer()("#1", Example("open"))


def test_masks_split_at_the_first_delimiter_by_hand():
    D, EOS = 5, 1
    responses = torch.tensor(
        [
            [7, 8, D, 9, 9, EOS, 0, 0],  # trace 7 8 D, answer 9 9 EOS
            [7, D, 9, D, 9, EOS, 0, 0],  # a second delimiter belongs to the answer
            [7, 8, 9, EOS, 0, 0, 0, 0],  # no delimiter: all trace
            [D, 9, EOS, 0, 0, 0, 0, 0],  # the delimiter first: the trace is the delimiter
            [7, 8, 9, 9, EOS, D, D, 0],  # delimiters after EOS are not in the response
            [7, D, 8, 8, 8, 8, 8, 8],  # no EOS within the budget: answer to the end
        ]
    )
    mask = response_mask_from(responses, EOS)
    trace, answer = trace_answer_masks(responses, mask, D)
    expected_trace = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
        ]
    ).bool()
    expected_answer = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 1, 1],
        ]
    ).bool()
    assert trace.dtype == answer.dtype == torch.bool
    assert torch.equal(trace, expected_trace) and torch.equal(answer, expected_answer)
    assert torch.equal(trace | answer, mask) and not (trace & answer).any()
    long_trace, long_answer = trace_answer_masks(responses, mask.long(), D)  # a 0/1 mask reads the same
    assert torch.equal(long_trace, trace) and torch.equal(long_answer, answer)
    with pytest.raises(ValueError, match=r"must both be \[B, T\]"):
        trace_answer_masks(responses, mask[:, :-1], D)
    with pytest.raises(ValueError, match=r"must both be \[B, T\]"):
        trace_answer_masks(responses[0], mask[0], D)


@pytest.mark.parametrize("name", ["addition_trace", "trace"])
def test_masks_on_tokenized_targets_pick_the_answer(name):
    task = TRACED[name]
    tokenizer = char_tokenizer(task.alphabet)
    examples = task.examples(16, seed=0)
    rows = [
        [*tokenizer(sft_target(e), add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        for e in examples
    ]
    width = max(map(len, rows))
    responses = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = response_mask_from(responses, tokenizer.eos_token_id)
    trace, answer = trace_answer_masks(responses, mask, tokenizer.convert_tokens_to_ids(DELIMITER))
    for i, ex in enumerate(examples):
        assert tokenizer.decode(responses[i][answer[i]], skip_special_tokens=True) == ex.answer
        assert tokenizer.decode(responses[i][trace[i]]) == split_target(ex)[0] + DELIMITER


@pytest.mark.parametrize(("name", "max_response"), [("addition_trace", 40), ("trace", 20)])
def test_longest_example_fits_the_builtin_models(name, max_response):
    task = TRACED[name]
    tokenizer = char_tokenizer(task.alphabet)
    examples = task.examples(3000, seed=0) + task.eval_examples(200)
    longest = max(examples, key=lambda e: len(e.prompt + sft_target(e)))
    ids = tokenizer(longest.prompt + sft_target(longest), add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert len(ids) + 1 <= 256  # + EOS; the built-in models have 256 positions
    # and the response (target + EOS) stays short, as a 2-digit scratchpad should
    assert max(len(sft_target(e)) for e in examples) + 1 <= max_response


@pytest.mark.parametrize("name", ["trace", "addition_trace"])
def test_a_trace_task_is_not_evaluated_by_exact_match(name):
    from entroclip.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="eval.reward must be trace_answer"):
        parse_config({"task": {"name": name}, "eval": {"every": 10}})
    parse_config({"task": {"name": name}, "eval": {"every": 10, "reward": "trace_answer"}})
