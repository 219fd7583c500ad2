"""Rewards: built-ins on hand-made cases, reproducible random rewards, and failure handling in batches.

Functions run in worker processes are defined at module level: workers import them by name. This module
avoids importing torch so that the workers stay quick to start.
"""

import math
import os
import time

import numpy as np
import pytest

from entroclip.rewards import (
    Reward,
    close_workers,
    exact_match,
    extract_answer,
    make_reward,
    random_bernoulli,
    random_symmetric,
    register_reward,
    sample_rng,
    score_batch,
)
from entroclip.tasks import Example

EX = Example("12+34=", "46")


@pytest.fixture(scope="module", autouse=True)
def stop_workers():
    yield
    close_workers()


def misbehave(completion: str, example: Example) -> float:
    """Parses the completion as the reward, unless it names a way to fail."""
    if completion == "raise":
        raise RuntimeError("boom")
    if completion == "nan":
        return math.nan
    if completion == "inf":
        return math.inf
    if completion == "none":
        return None  # type: ignore[return-value]
    if completion == "hang":
        time.sleep(60)
    if completion == "exit":
        os._exit(3)
    return float(completion)


def scaled_length(completion: str, example: Example, factor: float = 1.0) -> float:
    return factor * len(completion)


@pytest.mark.parametrize(
    ("text", "mode", "stop", "want"),
    [
        ("46\nbecause 12+34", "first_line", (), "46"),
        ("work\n\n 46 \n\n", "last_line", (), " 46 "),
        ("46</s>junk", "full", ("</s>",), "46"),
        ("<answer>1</answer> then <answer> 2 </answer>", "answer_tag", (), " 2 "),
        ("no tag", "answer_tag", (), None),
        ("a$b\nc", "first_line", ("$",), "a"),
    ],
)
def test_extract_answer(text, mode, stop, want):
    assert extract_answer(text, mode, stop) == want


def test_exact_match_cases():
    reward = make_reward("exact_match")
    assert reward.isolation == "inline" and not reward.uses_rng
    assert reward("46", EX) == 1.0
    assert reward(" 46 \nmore text", EX) == 1.0
    assert reward("4 6", EX) == 0.0
    assert reward("47", EX) == 0.0
    assert reward("", EX) == 0.0
    assert reward("hello   world", Example("p", " hello world ")) == 1.0
    assert reward("Hello", Example("p", "hello")) == 0.0
    assert exact_match(case_sensitive=False)("Hello", Example("p", "hello")) == 1.0
    tagged = make_reward("exact_match", extract="answer_tag")
    assert tagged("think <answer>46</answer>", EX) == 1.0 and tagged("46", EX) == 0.0
    assert make_reward("exact_match", stop=["#"])("46#47", EX) == 1.0
    with pytest.raises(ValueError, match="needs a reference answer"):
        reward("46", Example("p"))
    with pytest.raises(ValueError, match="extract must be one of"):
        make_reward("exact_match", extract="boxed")


def test_math_reward_cases():
    pytest.importorskip("math_verify")
    reward = make_reward("math")
    assert reward.isolation == "process"
    half = Example("q", "\\frac{1}{2}")
    assert reward("0.5", half) == 1.0
    assert reward("The answer is $\\boxed{\\frac12}$.", half) == 1.0
    assert reward("1/2", half) == 1.0
    assert reward("0.25", half) == 0.0
    assert reward("no idea", half) == 0.0
    assert reward("$\\frac{1}{2}$", Example("q", "0.5")) == 1.0
    assert reward("so $x = \\sqrt{2}$", Example("q", "\\sqrt{2}")) == 1.0
    first_line = make_reward("math", extract="first_line")
    assert first_line("46\n47", EX) == 1.0 and first_line("47\n46", EX) == 0.0
    with pytest.raises(ValueError, match="cannot parse the reference answer"):
        reward("1", Example("q", ""))


def test_reasoning_gym_reward():
    pytest.importorskip("reasoning_gym")
    from entroclip.tasks import make_task

    task = make_task("reasoning_gym", dataset="basic_arithmetic", size=4, eval_size=0)
    reward = make_reward("reasoning_gym")
    ex = task.examples(1, seed=0)[0]
    assert reward(f"Let me think. <answer>{ex.answer}</answer>", ex) == 1.0
    assert reward(f"{ex.answer}", ex) == 0.0
    assert make_reward("reasoning_gym", extract="full")(f"{ex.answer}", ex) == 1.0
    with pytest.raises(ValueError, match="needs examples of the reasoning_gym task"):
        reward("<answer>1</answer>", EX)
    result = score_batch(
        reward, [f"<answer>{ex.answer}</answer>", "<answer>x</answer>"], [ex, ex], timeout_s=30, seed=0
    )
    assert result.rewards.tolist() == [1.0, 0.0] and result.errors == 0


def random_batch(reward: Reward, n: int, seed: int, step: int, text: str = "x") -> list[float]:
    return score_batch(reward, [text] * n, [EX] * n, timeout_s=1, seed=seed, step=step).rewards.tolist()


def test_random_rewards_are_reproducible_and_batch_independent():
    for reward in (random_bernoulli(p=0.3), random_symmetric(), random_symmetric(distribution="gaussian")):
        batch = random_batch(reward, 64, seed=11, step=5)
        assert batch == random_batch(reward, 64, seed=11, step=5, text="other completion")
        # Sample i depends on (seed, step, i) only: a prefix of the batch is the smaller batch.
        assert batch[:10] == random_batch(reward, 10, seed=11, step=5)
        assert batch != random_batch(reward, 64, seed=11, step=6)
        assert batch != random_batch(reward, 64, seed=12, step=5)
    with pytest.raises(ValueError, match="draws random numbers"):
        random_bernoulli()("x", EX)


N_STAT = 20_000


def draw(reward: Reward) -> np.ndarray:
    return np.array([reward("x", EX, sample_rng(0, 0, i)) for i in range(N_STAT)])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_random_bernoulli_mean(p):
    # The mean of N Bernoulli(p) draws has std sqrt(p(1-p)/N) <= 0.0036; 5 std bounds a false failure by 6e-7.
    values = draw(random_bernoulli(p=p))
    assert set(np.unique(values)) <= {0.0, 1.0}
    assert abs(values.mean() - p) < 5 * math.sqrt(p * (1 - p) / N_STAT)


def test_random_symmetric_moments():
    # sign: mean std scale/sqrt(N); gaussian: the sample variance has std about sqrt(2/N) scale^2. 5 std each.
    scale = 2.0
    sign = draw(random_symmetric(scale=scale))
    assert set(np.unique(sign)) == {-scale, scale}
    assert abs(sign.mean()) < 5 * scale / math.sqrt(N_STAT)
    gauss = draw(random_symmetric(distribution="gaussian", scale=scale))
    assert abs(gauss.mean()) < 5 * scale / math.sqrt(N_STAT)
    assert abs(gauss.var() / scale**2 - 1) < 5 * math.sqrt(2 / N_STAT)
    with pytest.raises(ValueError, match=r"distribution must be one of \('sign', 'gaussian'\)"):
        random_symmetric(distribution="uniform")
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        make_reward("random_bernoulli", p=1.5)


FAILURES = ["1", "raise", "nan", "inf", "none", "2.5"]


def test_inline_failures_score_zero_and_are_counted():
    result = score_batch(
        Reward(misbehave, "misbehave", isolation="inline"), FAILURES, [EX] * 6, timeout_s=1, seed=0
    )
    assert result.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 2.5]
    assert str(result.rewards.dtype) == "torch.float32"
    assert result.errors == 4 and result.timeouts == 0
    assert result.error_messages[0] == "sample 1: RuntimeError: boom"
    assert [m.split(":")[0] for m in result.error_messages] == [
        "sample 1",
        "sample 2",
        "sample 3",
        "sample 4",
    ]


def test_process_failures_hangs_and_crashes_are_bounded_and_counted():
    completions = [*FAILURES, "hang", "exit", "3", "hang", "4"]
    start = time.monotonic()
    result = score_batch(misbehave, completions, [EX] * len(completions), timeout_s=0.2, seed=0, workers=2)
    elapsed = time.monotonic() - start
    assert result.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 2.5, 0.0, 0.0, 3.0, 0.0, 4.0]
    assert result.errors == 7 and result.timeouts == 2
    messages = "\n".join(result.error_messages)
    assert "sample 6: timed out after 0.2 s" in messages and "sample 9: timed out" in messages
    assert "sample 7: reward worker process died (exit code 3)" in messages
    assert elapsed < 10, elapsed  # the hangs sleep 60 s; killed workers were replaced
    again = score_batch(misbehave, ["5"] * 20, [EX] * 20, timeout_s=0.2, seed=0, workers=2)
    assert again.rewards.tolist() == [5.0] * 20 and again.errors == 0


def test_math_in_workers():
    pytest.importorskip("math_verify")
    half = Example("q", "\\frac{1}{2}")
    result = score_batch(
        make_reward("math"), ["0.5", "\\boxed{1/2}", "3", ""], [half] * 4, timeout_s=5, seed=0
    )
    assert result.rewards.tolist() == [1.0, 1.0, 0.0, 0.0] and result.errors == 0


def test_unpicklable_reward_needs_inline():
    with pytest.raises(TypeError, match="isolation='inline'"):
        score_batch(lambda c, e: 1.0, ["a"], [EX], timeout_s=1, seed=0)
    inline = make_reward(f"{__name__}:scaled_length", isolation="inline", factor=2.0)
    assert score_batch(inline, ["abc"], [EX], timeout_s=1, seed=0).rewards.tolist() == [6.0]


def test_score_batch_argument_errors():
    reward = make_reward("exact_match")
    with pytest.raises(ValueError, match="got 2 completions but 1 examples"):
        score_batch(reward, ["a", "b"], [EX], timeout_s=1, seed=0)
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        score_batch(reward, ["a"], [EX], timeout_s=0, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        score_batch(reward, ["a"], [EX], timeout_s=1, seed=-1)
    assert score_batch(reward, [], [], timeout_s=1, seed=0).rewards.shape == (0,)


def test_make_reward_registry_and_user_rewards():
    with pytest.raises(ValueError, match="unknown reward 'nope'; known: exact_match, math, random_bernoulli"):
        make_reward("nope")
    with pytest.raises(ValueError, match="accepted options: extract, stop, case_sensitive"):
        make_reward("exact_match", mode="x")
    with pytest.raises(ValueError, match="isolation must be one of"):
        make_reward("exact_match", isolation="thread")
    assert make_reward("math", isolation="inline").isolation == "inline"

    path = make_reward(f"{__name__}:scaled_length", factor=3.0)
    assert path.isolation == "process" and path("ab", EX) == 6.0
    with pytest.raises(ValueError, match="invalid options for reward"):
        make_reward(f"{__name__}:scaled_length", scale=3.0)

    @register_reward("test_length", isolation="inline")
    def length(completion: str, example: Example, factor: float = 1.0) -> float:
        return factor * len(completion)

    assert make_reward("test_length", factor=0.5)("abcd", EX) == 2.0
    with pytest.raises(ValueError, match="invalid options for reward 'test_length'"):
        make_reward("test_length", scale=2)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_length")(length)

    @register_reward("test_coin", isolation="inline", uses_rng=True)
    def coin(completion: str, example: Example, rng: np.random.Generator) -> float:
        return float(rng.integers(0, 2))

    coins = score_batch(make_reward("test_coin"), ["x"] * 50, [EX] * 50, timeout_s=1, seed=3)
    assert set(coins.rewards.tolist()) == {0.0, 1.0}


def test_reward_that_workers_cannot_load_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "parent_only_reward.py").write_text("def one(completion, example):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = make_reward("parent_only_reward:one")
    monkeypatch.undo()  # the module stays imported here, but worker processes cannot find it
    with pytest.raises(RuntimeError, match="cannot be loaded in a worker: ModuleNotFoundError"):
        score_batch(reward, ["a"], [EX], timeout_s=1, seed=0, workers=1)
    assert score_batch(misbehave, ["7"], [EX], timeout_s=1, seed=0, workers=1).rewards.tolist() == [7.0]


def score_hang_and_value(_: int) -> list[float]:
    return score_batch(misbehave, ["hang", "8"], [EX] * 2, timeout_s=0.2, seed=0, workers=1).rewards.tolist()


def test_forked_child_starts_its_own_workers():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    assert score_hang_and_value(0) == [0.0, 8.0]  # the parent's pool is running when the child forks
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as executor:
        assert executor.submit(score_hang_and_value, 0).result(timeout=60) == [0.0, 8.0]
    assert score_hang_and_value(0) == [0.0, 8.0]


SLOW_TO_LOAD = """
import time

time.sleep(2.0)  # a reward whose imports are slow, like torch or sympy


def hang_or_value(completion, example):
    if completion == "hang":
        time.sleep(60)
    return float(completion)
"""


def test_time_outs_cost_the_time_limit_not_a_worker_start(tmp_path, monkeypatch):
    (tmp_path / "slow_to_load_reward.py").write_text(SLOW_TO_LOAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = make_reward("slow_to_load_reward:hang_or_value")
    # Loading the reward (2 s) does not count against a sample: a 0.5 s limit is enough for the first one.
    assert score_batch(reward, ["1"], [EX], timeout_s=0.5, seed=0, workers=2).rewards.tolist() == [1.0]
    n, workers, timeout_s = 8, 2, 0.5
    start = time.monotonic()
    result = score_batch(reward, ["hang"] * n, [EX] * n, timeout_s=timeout_s, seed=0, workers=workers)
    elapsed = time.monotonic() - start
    assert result.timeouts == n and result.rewards.tolist() == [0.0] * n
    # Replacing a killed worker must not load the reward again (here 2 s for each of the n time-outs).
    assert elapsed < math.ceil(n / workers) * timeout_s + 3, elapsed
    again = score_batch(reward, ["2", "3"], [EX] * 2, timeout_s=0.5, seed=0, workers=2)
    assert again.rewards.tolist() == [2.0, 3.0] and again.errors == 0
