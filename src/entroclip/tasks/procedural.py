"""Built-in procedural tasks over small alphabets that a tiny character-level model can learn.

Each task enumerates its problems by an index in ``[0, space_size)``. A stable hash of the prompt holds
out ``eval_fraction`` of the problems; training items are drawn i.i.d. from the rest, item ``j`` of the
stream from its own generator seeded by (seed, j).
"""

from __future__ import annotations

import random
from abc import abstractmethod
from dataclasses import dataclass
from functools import cached_property

from entroclip.tasks.base import Example, Task, check_eval_fraction, check_request, in_eval_split

#: Problem spaces up to this size are enumerated once and sampled from lists; larger ones by rejection.
ENUMERATE_LIMIT = 100_000


class ProceduralTask(Task):
    """A task whose problems are ``problem(i)`` for ``i`` in ``[0, space_size)``."""

    eval_fraction: float

    @property
    @abstractmethod
    def space_size(self) -> int:
        """Number of distinct problems."""

    @abstractmethod
    def problem(self, index: int) -> Example:
        """The problem with this index, ``0 <= index < space_size``."""

    def _held_out(self, index: int) -> bool:
        return in_eval_split(self.problem(index).prompt, self.eval_fraction)

    @cached_property
    def _split(self) -> tuple[list[int], list[int]] | None:
        """(train, held-out) indices of a small problem space; None when it is too large to enumerate."""
        if self.space_size > ENUMERATE_LIMIT:
            return None
        train: list[int] = []
        held: list[int] = []
        for i in range(self.space_size):
            (held if self._held_out(i) else train).append(i)
        if not train:
            raise ValueError(
                f"task {self.name!r} has {self.space_size} problems and eval_fraction={self.eval_fraction} "
                "holds out all of them; lower eval_fraction or enlarge the task"
            )
        return train, held

    def examples(self, n: int, seed: int, offset: int = 0) -> list[Example]:
        check_request(n, seed, offset)
        split = self._split
        out = []
        for j in range(offset, offset + n):
            rng = random.Random((seed << 64) | j)
            if split is not None:
                index = rng.choice(split[0])
            else:
                index = rng.randrange(self.space_size)
                while self._held_out(index):
                    index = rng.randrange(self.space_size)
            out.append(self.problem(index))
        return out

    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        check_request(n, seed)
        if self.eval_fraction == 0.0:
            raise ValueError(f"task {self.name!r} has eval_fraction=0: it has no held-out split")
        rng = random.Random(seed)
        split = self._split
        if split is not None:
            held = list(split[1])
            if n > len(held):
                raise ValueError(
                    f"task {self.name!r} has {len(held)} held-out problems (eval_fraction="
                    f"{self.eval_fraction}), {n} were asked for"
                )
            rng.shuffle(held)
            return [self.problem(i) for i in held[:n]]
        chosen: dict[int, None] = {}
        attempts = 0
        while len(chosen) < n:
            attempts += 1
            if attempts > 1000 + 100 * n / self.eval_fraction:
                raise ValueError(f"could not draw {n} distinct held-out problems for task {self.name!r}")
            index = rng.randrange(self.space_size)
            if self._held_out(index):
                chosen.setdefault(index)
        return [self.problem(i) for i in chosen]


@dataclass(frozen=True)
class DigitTask(ProceduralTask):
    """A procedural task sized by a number of digits."""

    digits: int = 2
    eval_fraction: float = 0.1
    #: Python converts integers of at most 4,300 digits to text; a product has up to twice the digits
    MAX_DIGITS = 1000

    def __post_init__(self) -> None:
        d = self.digits
        if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= self.MAX_DIGITS:
            raise ValueError(f"digits must be an int in [1, {self.MAX_DIGITS}], got {d!r}")
        check_eval_fraction(self.eval_fraction)


@dataclass(frozen=True)
class AdditionTask(DigitTask):
    """``a+b``: prompt ``"12+34="``, answer ``"46"``; a and b uniform in ``[0, 10**digits)``."""

    name = "addition"
    alphabet = "0123456789+="

    @property
    def space_size(self) -> int:
        return 10 ** (2 * self.digits)

    def problem(self, index: int) -> Example:
        a, b = divmod(index, 10**self.digits)
        return Example(prompt=f"{a}+{b}=", answer=str(a + b))


@dataclass(frozen=True)
class MultiplicationTask(DigitTask):
    """``a*b`` with a one-digit b: prompt ``"123*7="``, answer ``"861"``; a uniform in ``[0, 10**digits)``."""

    name = "multiplication"
    alphabet = "0123456789*="

    @property
    def space_size(self) -> int:
        return 10 ** (self.digits + 1)

    def problem(self, index: int) -> Example:
        a, b = divmod(index, 10)
        return Example(prompt=f"{a}*{b}=", answer=str(a * b))


@dataclass(frozen=True)
class ReverseTask(DigitTask):
    """Reverse a digit string of fixed length: prompt ``"~0123="``, answer ``"3210"``."""

    digits: int = 4
    name = "reverse"
    alphabet = "0123456789~="

    @property
    def space_size(self) -> int:
        return 10**self.digits

    def problem(self, index: int) -> Example:
        text = str(index).zfill(self.digits)
        return Example(prompt=f"~{text}=", answer=text[::-1])
