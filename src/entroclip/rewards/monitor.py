"""Making reward failures visible: warnings for new kinds of failure, and a stop when every sample fails."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from entroclip.rewards.batch import RewardResult

_SAMPLE_PREFIX = re.compile(r"sample \d+: ")


class RewardsFailing(RuntimeError):
    """Every sample's reward failed for ``reward.max_failed_steps`` consecutive steps."""


class RewardFailureMonitor:
    """Watches the :class:`RewardResult` of each step.

    Each distinct failure message (the text after ``"sample i: "``) is reported once, the first
    ``max_messages`` of the run only; a failure that hits every sample of ``max_failed_steps`` consecutive
    steps raises :class:`RewardsFailing`, because training on all-zero rewards learns nothing.
    """

    def __init__(self, max_failed_steps: int, max_messages: int = 5) -> None:
        if not isinstance(max_failed_steps, int) or max_failed_steps < 1:
            raise ValueError(f"max_failed_steps must be a positive int, got {max_failed_steps!r}")
        if not isinstance(max_messages, int) or max_messages < 0:
            raise ValueError(f"max_messages must be a non-negative int, got {max_messages!r}")
        self.max_failed_steps = max_failed_steps
        self.max_messages = max_messages
        self._shown: list[str] = []  # the distinct messages reported so far, at most max_messages
        self._capped = False  # whether the line saying that further messages are not shown was given
        self._failed_steps = 0  # consecutive steps in which every sample failed
        self._first_error = ""  # the first message of the first of those steps

    def observe(self, step: int, result: RewardResult) -> list[str]:
        """Warning lines for the new distinct failures of ``step``; raises :class:`RewardsFailing` when
        this step makes ``max_failed_steps`` consecutive steps in which every sample failed."""
        samples = result.rewards.numel()
        if samples == 0:
            return []
        counts = Counter(_one_line(_SAMPLE_PREFIX.sub("", m, count=1)) for m in result.error_messages)
        if result.errors < samples:
            self._failed_steps, self._first_error = 0, ""
        else:
            if self._failed_steps == 0:
                self._first_error = next(iter(counts), "")
            self._failed_steps += 1
            if self._failed_steps >= self.max_failed_steps:
                raise RewardsFailing(
                    f"the reward failed on every sample for {self._failed_steps} consecutive steps (up to "
                    f"step {step}; the limit is reward.max_failed_steps={self.max_failed_steps}); first "
                    f"error: {self._first_error}"
                )
        lines = []
        for text, count in counts.items():
            if self._capped or text in self._shown:
                continue
            if len(self._shown) < self.max_messages:
                self._shown.append(text)
                lines.append(f"step {step}: reward error in {count} of {samples} samples: {text}")
            else:
                self._capped = True
                lines.append(f"step {step}: further distinct reward errors are not shown")
        return lines

    def state_dict(self) -> dict[str, Any]:
        return {
            "shown": list(self._shown),
            "capped": self._capped,
            "failed_steps": self._failed_steps,
            "first_error": self._first_error,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._shown = list(state["shown"])
        self._capped = bool(state["capped"])
        self._failed_steps = int(state["failed_steps"])
        self._first_error = str(state["first_error"])


def _one_line(text: str) -> str:
    """``text`` with its whitespace runs, newlines included, made single spaces: a warning is one line."""
    return " ".join(text.split())
