"""Trace-answer reward: exact match of the text after the last delimiter, whatever trace comes before."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from entroclip.rewards.base import Reward
from entroclip.rewards.exact import normalise
from entroclip.rewards.extract import check_extraction, extract_answer
from entroclip.tasks.base import Example
from entroclip.tasks.trace import DELIMITER


def trace_answer(
    *, delimiter: str = DELIMITER, stop: Sequence[str] = (), case_sensitive: bool = True
) -> Reward:
    """Reward 1.0 when the text after the last ``delimiter`` equals ``example.answer`` after
    :func:`~entroclip.rewards.exact.normalise`, else 0.0 (also 0.0 without a delimiter).

    The completion is first cut at the earliest ``stop`` string. Reading after the *last* delimiter means
    that nothing before the first one can change the reward (see
    :func:`~entroclip.tasks.trace.trace_answer_masks`).
    """
    if not isinstance(delimiter, str) or not delimiter:
        raise ValueError(f"delimiter must be a non-empty string, got {delimiter!r}")
    stop = check_extraction("full", stop)
    fn = partial(_trace_answer, delimiter=delimiter, stop=stop, case_sensitive=case_sensitive)
    return Reward(fn=fn, name="trace_answer", isolation="inline")


def _trace_answer(
    completion: str, example: Example, *, delimiter: str, stop: tuple[str, ...], case_sensitive: bool
) -> float:
    if example.answer is None:
        raise ValueError("trace_answer needs a reference answer, the example has answer=None")
    text = extract_answer(completion, "full", stop) or ""  # "full" only cuts at the stop strings
    _, found, answer = text.rpartition(delimiter)
    if not found:
        return 0.0
    return float(normalise(answer, case_sensitive) == normalise(example.answer, case_sensitive))
