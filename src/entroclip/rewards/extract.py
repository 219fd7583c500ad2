"""Answer extraction: the part of a completion that a reward compares with the reference answer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, get_args

ExtractMode = Literal["first_line", "last_line", "full", "answer_tag"]
EXTRACT_MODES: tuple[str, ...] = get_args(ExtractMode)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def check_extraction(extract: str, stop: Sequence[str]) -> tuple[str, ...]:
    """Validate extraction options; returns ``stop`` as a tuple of non-empty strings."""
    if extract not in EXTRACT_MODES:
        raise ValueError(f"extract must be one of {EXTRACT_MODES}, got {extract!r}")
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    return tuple(stop)


def extract_answer(text: str, extract: ExtractMode = "first_line", stop: Sequence[str] = ()) -> str | None:
    """The answer in ``text``, or None when there is none.

    ``text`` is first cut at the earliest of the ``stop`` strings (e.g. an EOS marker), then:
    ``first_line``: up to the first newline; ``last_line``: the last non-blank line; ``full``: all of it;
    ``answer_tag``: the content of the last ``<answer>...</answer>`` (None without one).
    """
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    text = text[:cut]
    if extract == "first_line":
        return text.split("\n", 1)[0]
    if extract == "last_line":
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""
    if extract == "full":
        return text
    if extract == "answer_tag":
        matches = _ANSWER_TAG.findall(text)
        return matches[-1] if matches else None
    raise ValueError(f"extract must be one of {EXTRACT_MODES}, got {extract!r}")
