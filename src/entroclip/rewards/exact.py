"""Exact-match reward: 1 when the extracted answer equals the reference after whitespace normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from entroclip.rewards.base import Reward
from entroclip.rewards.extract import ExtractMode, check_extraction, extract_answer
from entroclip.tasks.base import Example


def normalise(text: str, case_sensitive: bool = True) -> str:
    """Collapse runs of whitespace to one space and strip the ends (and casefold unless case-sensitive)."""
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


def exact_match(
    *, extract: ExtractMode = "first_line", stop: Sequence[str] = (), case_sensitive: bool = True
) -> Reward:
    """Reward 1.0 when the extracted answer equals ``example.answer`` after :func:`normalise`, else 0.0.

    See :func:`~entroclip.rewards.extract.extract_answer` for ``extract`` and ``stop``.
    """
    stop = check_extraction(extract, stop)
    fn = partial(_exact_match, extract=extract, stop=stop, case_sensitive=case_sensitive)
    return Reward(fn=fn, name="exact_match", isolation="inline")


def _exact_match(
    completion: str, example: Example, *, extract: ExtractMode, stop: tuple[str, ...], case_sensitive: bool
) -> float:
    if example.answer is None:
        raise ValueError("exact_match needs a reference answer, the example has answer=None")
    answer = extract_answer(completion, extract, stop)
    if answer is None:
        return 0.0
    return float(normalise(answer, case_sensitive) == normalise(example.answer, case_sensitive))
