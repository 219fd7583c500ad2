"""Math-answer reward: math-verify parses the reference and the completion and checks equivalence.

math-verify's own timeouts use ``signal.alarm`` (main thread only, whole seconds, and they would cancel
any outer alarm), so they are switched off here: the time limit belongs to ``score_batch``, which runs
this reward in a worker process and kills it when a sample exceeds ``timeout_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache, partial
from typing import Any

try:
    from math_verify import parse, verify
except ImportError as e:
    raise ImportError("the math reward needs the math-verify package: pip install 'entroclip[math]'") from e

from entroclip.rewards.base import Reward
from entroclip.rewards.extract import ExtractMode, check_extraction, extract_answer
from entroclip.tasks.base import Example


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def math_answer(*, extract: ExtractMode = "full", stop: Sequence[str] = ()) -> Reward:
    """Reward 1.0 when math-verify finds the extracted answer equivalent to ``example.answer``, else 0.0.

    The reference may be plain (``"0.5"``, ``"1,000"``) or LaTeX with or without ``$`` (``"\\frac{1}{2}"``);
    in the completion math-verify looks for ``\\boxed{}``, LaTeX and plain expressions, and falls back to
    comparing strings for text it cannot parse. An empty reference is an error (reward 0, counted); a
    completion with nothing to parse scores 0.
    """
    stop = check_extraction(extract, stop)
    return Reward(fn=partial(_math_answer, extract=extract, stop=stop), name="math", isolation="process")


@lru_cache(maxsize=4096)
def parse_reference(answer: str) -> list[Any]:
    """math-verify parse of a reference answer; bare LaTeX is retried inside ``$...$``."""
    parsed = parse(answer, parsing_timeout=None)
    if not parsed:
        parsed = parse(f"${answer}$", parsing_timeout=None)
    if not parsed:
        raise ValueError(f"math-verify cannot parse the reference answer {answer!r}")
    return parsed


def _math_answer(completion: str, example: Example, *, extract: ExtractMode, stop: tuple[str, ...]) -> float:
    if example.answer is None:
        raise ValueError("the math reward needs a reference answer, the example has answer=None")
    gold = parse_reference(example.answer)
    text = extract_answer(completion, extract, stop)
    if not text:
        return 0.0
    predicted = parse(text, parsing_timeout=None)
    return float(bool(predicted) and verify(gold, predicted, timeout_seconds=None))
