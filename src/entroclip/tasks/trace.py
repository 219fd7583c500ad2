"""Tasks whose responses are a reasoning trace, a delimiter and an answer; only the answer is scored.

A traced example keeps the base task's prompt and reference answer (``Example.answer``, what the reward
compares) and carries the full supervised target ``trace + DELIMITER + answer`` in
``Example.meta[TARGET_KEY]`` (read it with :func:`sft_target`). The ``trace_answer`` reward reads the text
after the last delimiter, so no token before the first delimiter can change a reward;
:func:`trace_answer_masks` splits sampled responses at that point for per-position entropy metrics.

Built-in tasks: ``addition_trace`` (a written scratchpad in one of several valid forms, drawn per example)
and ``trace`` (random filler of a set length and alphabet before any task's answer).
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from entroclip.tasks.base import Example, Task
from entroclip.tasks.procedural import AdditionTask
from entroclip.tasks.registry import make_task

if TYPE_CHECKING:
    from torch import Tensor

#: separates the trace from the answer; no trace alphabet or scored answer may contain it
DELIMITER = "#"
#: the ``Example.meta`` key of the full supervised target: trace + DELIMITER + answer
TARGET_KEY = "target"


def sft_target(example: Example) -> str:
    """The text a supervised warm-up learns after ``example.prompt``: ``meta[TARGET_KEY]`` when the task
    writes a trace, else the answer ("" for an open-ended prompt)."""
    return str(example.meta.get(TARGET_KEY, example.answer or ""))


class TracedTask(Task):
    """A base task's examples with a trace before each answer, drawn per example by a seeded generator.

    The trace of training item ``j`` depends on (seed, j) only and that of held-out item ``i`` on
    (seed, i), so the base task's determinism, resumption and held-out contracts carry over unchanged.
    """

    delimiter = DELIMITER

    def __init__(self, base: Task) -> None:
        if base.alphabet is not None and DELIMITER in base.alphabet:
            raise ValueError(f"task {base.name!r} uses the trace delimiter {DELIMITER!r} in its alphabet")
        self.base = base

    @abstractmethod
    def trace(self, example: Example, rng: random.Random) -> str:
        """The trace written before ``example.answer``, free of the delimiter."""

    def examples(self, n: int, seed: int, offset: int = 0) -> list[Example]:
        base = self.base.examples(n, seed, offset)
        return [self._traced(ex, f"train:{seed}:{offset + k}") for k, ex in enumerate(base)]

    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        base = self.base.eval_examples(n, seed)
        return [self._traced(ex, f"eval:{seed}:{i}") for i, ex in enumerate(base)]

    def _traced(self, example: Example, key: str) -> Example:
        """``example`` with its target in meta; ``key`` names the item's own trace generator (a string
        seed is hashed the same way on every machine, and the prefix keeps it apart from the base's)."""
        answer = example.answer
        if answer is None or DELIMITER in answer:
            raise ValueError(
                f"task {self.name!r} needs base answers without {DELIMITER!r}; "
                f"task {self.base.name!r} gave {answer!r} for prompt {example.prompt!r}"
            )
        trace = self.trace(example, random.Random(f"entroclip.trace:{key}"))
        return Example(example.prompt, answer, {**example.meta, TARGET_KEY: trace + DELIMITER + answer})


# The scratchpad forms of addition_trace. Each is a list of space-separated steps "x+y=s" (a column step
# may add a carry: "x+y+1=s"); every sum in them is true, and the order of x and y in each step is a coin
# flip, so the trace has entropy at many positions, not only at the choice of form.


def _step(x: int, y: int, rng: random.Random, carry: int = 0) -> tuple[str, int]:
    """``"x+y=s"`` or ``"y+x=s"`` (``"+1"`` before ``=`` when ``carry``) and its sum ``s``."""
    if rng.random() < 0.5:
        x, y = y, x
    total = x + y + carry
    return f"{x}+{y}{'+1' if carry else ''}={total}", total


def _column(a: int, b: int, digits: int, rng: random.Random) -> list[str]:
    """Column sums from the units up, each adding the carry of the last: 47+85 -> "7+5=12 4+8+1=13"."""
    steps, carry = [], 0
    for k in range(digits):
        text, total = _step(a // 10**k % 10, b // 10**k % 10, rng, carry)
        steps.append(text)
        carry = total // 10
    return steps


def _split(a: int, b: int, digits: int, rng: random.Random) -> list[str]:
    """Tens-and-above, then units, then their sum: 47+85 -> "40+80=120 7+5=12 120+12=132"."""
    high, h = _step(a - a % 10, b - b % 10, rng)
    low, u = _step(a % 10, b % 10, rng)
    return [high, low, _step(h, u, rng)[0]]


def _count(a: int, b: int, digits: int, rng: random.Random) -> list[str]:
    """From one operand (a coin flip), add the other's tens-and-above, then its units:
    47+85 -> "47+80=127 127+5=132" or "85+40=125 125+7=132"."""
    start, other = (a, b) if rng.random() < 0.5 else (b, a)
    first, partial = _step(start, other - other % 10, rng)
    return [first, _step(partial, other % 10, rng)[0]]


#: name -> form ``(a, b, digits, rng) -> steps``; one signature for all, though only "column" needs digits
SCRATCHPAD_FORMS: dict[str, Callable[[int, int, int, random.Random], list[str]]] = {
    "column": _column,
    "split": _split,
    "count": _count,
}


class AdditionTraceTask(TracedTask):
    """``addition`` with a scratchpad: prompt ``"47+85="``, answer ``"132"``, target e.g.
    ``"7+5=12 4+8+1=13#132"`` (one of :data:`SCRATCHPAD_FORMS`, drawn uniformly per example).

    At most 31 target characters for 2 digits (``"90+90=180 9+9=18 180+18=198#198"``), 6 of prompt.
    """

    name = "addition_trace"
    alphabet = AdditionTask.alphabet + " " + DELIMITER

    def __init__(self, digits: int = 2, eval_fraction: float = 0.1) -> None:
        super().__init__(AdditionTask(digits=digits, eval_fraction=eval_fraction))
        self.digits = digits

    def trace(self, example: Example, rng: random.Random) -> str:
        a, b = map(int, example.prompt.removesuffix("=").split("+"))
        form = rng.choice(list(SCRATCHPAD_FORMS.values()))
        return " ".join(form(a, b, self.digits, rng))


class FillerTraceTask(TracedTask):
    """Any task's answers after ``trace_len`` characters drawn uniformly from ``trace_alphabet``.

    The filler decides nothing, so at the SFT optimum its entropy is ``log(len(trace_alphabet))`` nats
    per character (the alphabet may not repeat a character). Options: ``base`` and ``base_options`` name
    the task as ``make_task`` does, e.g. ``{base: addition, base_options: {digits: 2}, trace_len: 10,
    trace_alphabet: "abcd"}`` -> for prompt ``"47+85="`` a target such as ``"cadbbacdab#132"``.
    """

    name = "trace"

    def __init__(
        self,
        base: str = "addition",
        base_options: Mapping[str, Any] | None = None,
        trace_len: int = 10,
        trace_alphabet: str = "abcd",
    ) -> None:
        if not isinstance(trace_len, int) or isinstance(trace_len, bool) or trace_len < 0:
            raise ValueError(f"trace_len must be a non-negative int, got {trace_len!r}")
        if not isinstance(trace_alphabet, str) or not trace_alphabet:
            raise ValueError(f"trace_alphabet must be a non-empty string, got {trace_alphabet!r}")
        if len(set(trace_alphabet)) != len(trace_alphabet) or DELIMITER in trace_alphabet:
            # a repeated character would skew the filler's distribution away from log(len) per character
            raise ValueError(
                f"trace_alphabet must not repeat a character or contain {DELIMITER!r}, got {trace_alphabet!r}"
            )
        super().__init__(make_task(base, **dict(base_options or {})))
        self.trace_len = trace_len
        self.trace_alphabet = trace_alphabet
        if self.base.alphabet is not None:
            self.alphabet = "".join(dict.fromkeys(self.base.alphabet + trace_alphabet + DELIMITER))

    def trace(self, example: Example, rng: random.Random) -> str:
        return "".join(rng.choices(self.trace_alphabet, k=self.trace_len))


def trace_answer_masks(responses: Tensor, response_mask: Tensor, delimiter_id: int) -> tuple[Tensor, Tensor]:
    """Split response tokens into the trace and the answer, ``(trace, answer)``, each bool ``[B, T]``.

    ``responses``: token ids ``[B, T]``; ``response_mask``: ``[B, T]``, true on the response up to and
    including EOS. ``trace`` holds the tokens up to and including the first delimiter, ``answer`` those
    after it; they partition ``response_mask``, and a response without a delimiter is all trace. The
    trace_answer reward reads only text after the last delimiter, so no trace token can change it.
    """
    if responses.shape != response_mask.shape or responses.dim() != 2:
        raise ValueError(
            f"responses and response_mask must both be [B, T], got {tuple(responses.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    # tensor methods only: this module is imported by reward workers, which do not load torch
    mask = response_mask.bool()
    is_delimiter = (responses == delimiter_id) & mask
    answer = (is_delimiter.long().cumsum(-1) - is_delimiter.long() > 0) & mask
    return mask & ~answer, answer
