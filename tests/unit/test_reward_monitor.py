"""RewardFailureMonitor: one warning per distinct failure, a stop after steps where every sample failed."""

import json

import pytest
import torch

from entroclip.rewards import Reward, RewardFailureMonitor, RewardResult, RewardsFailing, score_batch
from entroclip.tasks import Example


def result(n: int, errors: dict[int, str]) -> RewardResult:
    """A step of ``n`` samples where sample i failed with ``errors[i]``."""
    messages = [f"sample {i}: {errors[i]}" for i in sorted(errors)]
    rewards = torch.tensor([0.0 if i in errors else 1.0 for i in range(n)])
    return RewardResult(rewards=rewards, errors=len(errors), error_messages=messages)


def all_fail(n: int = 4, message: str = "ValueError: boom") -> RewardResult:
    return result(n, dict.fromkeys(range(n), message))


def test_each_distinct_message_is_shown_once():
    monitor = RewardFailureMonitor(max_failed_steps=3)
    assert monitor.observe(0, result(4, {})) == []
    lines = monitor.observe(1, result(4, {0: "ValueError: boom", 2: "KeyError: 'x'", 3: "ValueError: boom"}))
    assert lines == [
        "step 1: reward error in 2 of 4 samples: ValueError: boom",
        "step 1: reward error in 1 of 4 samples: KeyError: 'x'",
    ]
    # The same texts for other samples at a later step are not new; only the sample prefix differs.
    assert monitor.observe(2, result(4, {1: "KeyError: 'x'", 3: "ValueError: boom"})) == []
    assert monitor.observe(3, result(4, {1: "timed out after 1 s"})) == [
        "step 3: reward error in 1 of 4 samples: timed out after 1 s"
    ]


def test_a_message_spanning_lines_is_one_warning_line():
    monitor = RewardFailureMonitor(max_failed_steps=3)
    assert monitor.observe(0, result(2, {1: "RuntimeError: line one\n  line two"})) == [
        "step 0: reward error in 1 of 2 samples: RuntimeError: line one line two"
    ]


def test_distinct_messages_are_capped_with_one_final_line():
    monitor = RewardFailureMonitor(max_failed_steps=3, max_messages=2)
    lines = monitor.observe(5, result(8, {i: f"ValueError: bad {i}" for i in range(3)}))
    assert lines == [
        "step 5: reward error in 1 of 8 samples: ValueError: bad 0",
        "step 5: reward error in 1 of 8 samples: ValueError: bad 1",
        "step 5: further distinct reward errors are not shown",
    ]
    assert monitor.observe(6, result(8, {0: "ValueError: bad 7", 1: "ValueError: bad 0"})) == []
    silent = RewardFailureMonitor(max_failed_steps=3, max_messages=0)
    assert silent.observe(0, result(2, {0: "E: a"})) == [
        "step 0: further distinct reward errors are not shown"
    ]
    assert silent.observe(1, result(2, {0: "E: b"})) == []


def test_consecutive_steps_where_every_sample_fails_raise():
    monitor = RewardFailureMonitor(max_failed_steps=3)
    assert monitor.observe(0, all_fail(message="ValueError: first")) == [
        "step 0: reward error in 4 of 4 samples: ValueError: first"
    ]
    monitor.observe(1, all_fail(message="ValueError: second"))
    with pytest.raises(RewardsFailing) as raised:
        monitor.observe(2, all_fail())
    message = str(raised.value)
    assert message == (
        "the reward failed on every sample for 3 consecutive steps (up to step 2; the limit is "
        "reward.max_failed_steps=3); first error: ValueError: first"
    )
    assert "\n" not in message and isinstance(raised.value, RuntimeError)


def test_a_step_with_a_success_resets_the_count_and_an_empty_step_does_not():
    monitor = RewardFailureMonitor(max_failed_steps=2)
    monitor.observe(0, all_fail(message="ValueError: old"))
    monitor.observe(1, result(4, {0: "E: a", 1: "E: a", 2: "E: a"}))  # one sample scored: the count resets
    monitor.observe(2, all_fail(message="ValueError: new"))
    assert monitor.observe(3, result(0, {})) == []  # no samples: neither a failed step nor a success
    with pytest.raises(RewardsFailing, match=r"for 2 consecutive steps .* first error: ValueError: new$"):
        monitor.observe(4, all_fail())
    with pytest.raises(RewardsFailing, match="for 1 consecutive steps"):
        RewardFailureMonitor(max_failed_steps=1).observe(0, all_fail(n=1))


def test_state_round_trip_resumes_like_an_uninterrupted_run():
    steps = [
        result(4, {0: "E: a"}),
        all_fail(message="E: b"),
        all_fail(message="E: c"),
        result(4, {i: f"E: {i}" for i in range(3)}),  # resets the count, reaches the cap of 4 messages
        all_fail(message="E: d"),
        all_fail(message="E: e"),
        all_fail(message="E: f"),
    ]

    def run(monitor: RewardFailureMonitor, first: int, last: int) -> list[object]:
        """What ``monitor`` reports for steps ``first`` to ``last - 1``: lines, or the message it raised."""
        seen: list[object] = []
        for step in range(first, last):
            try:
                seen.append(monitor.observe(step, steps[step]))
            except RewardsFailing as e:
                seen.append(str(e))
        return seen

    def monitor() -> RewardFailureMonitor:
        return RewardFailureMonitor(max_failed_steps=3, max_messages=4)

    whole = run(monitor(), 0, len(steps))
    assert whole[3] == [
        "step 3: reward error in 1 of 4 samples: E: 0",
        "step 3: further distinct reward errors are not shown",
    ]
    assert whole[-1] == (
        "the reward failed on every sample for 3 consecutive steps (up to step 6; the limit is "
        "reward.max_failed_steps=3); first error: E: d"
    )
    for cut in range(1, len(steps)):
        before = monitor()
        head = run(before, 0, cut)
        after = monitor()
        after.load_state_dict(json.loads(json.dumps(before.state_dict())))  # plain ints, strs and lists
        assert head + run(after, cut, len(steps)) == whole, cut
    assert run(monitor(), 5, len(steps)) != whole[5:]  # without the state, the run would not stop


def test_it_reads_the_results_of_score_batch():
    def boom(completion: str, example: Example) -> float:
        if completion == "bad":
            raise ValueError("boom")
        return 1.0

    reward = Reward(boom, "boom", isolation="inline")
    ex = Example("p", "1")
    monitor = RewardFailureMonitor(max_failed_steps=1)
    scored = score_batch(reward, ["ok", "bad", "bad"], [ex] * 3, timeout_s=1, seed=0)
    assert monitor.observe(0, scored) == ["step 0: reward error in 2 of 3 samples: ValueError: boom"]
    with pytest.raises(RewardsFailing, match="first error: ValueError: boom$"):
        monitor.observe(1, score_batch(reward, ["bad"], [ex], timeout_s=1, seed=0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_failed_steps": 0}, "max_failed_steps must be a positive int"),
        ({"max_failed_steps": 2.5}, "max_failed_steps must be a positive int"),
        ({"max_failed_steps": 2, "max_messages": -1}, "max_messages must be a non-negative int"),
    ],
)
def test_invalid_limits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardFailureMonitor(**kwargs)
