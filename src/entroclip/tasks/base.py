"""Examples and the task interface: a deterministic training stream plus a disjoint held-out split."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One prompt, its reference answer (None for open-ended prompts) and free-form metadata.

    ``meta`` carries what a reward may need beyond the answer, e.g. a reasoning-gym entry. It takes part
    in equality but not in the hash.
    """

    prompt: str
    answer: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


class Task(ABC):
    """A source of prompts.

    ``name`` identifies the task; ``alphabet`` is the set of characters its prompts and answers use (for a
    character-level tokenizer), or None for open text. The training stream is an infinite sequence fixed by
    a seed; ``eval_examples`` draws from a held-out split that the training stream never yields.
    """

    name: str
    alphabet: str | None = None

    @abstractmethod
    def examples(self, n: int, seed: int, offset: int = 0) -> list[Example]:
        """Items ``offset .. offset + n - 1`` of the training stream fixed by ``seed``.

        The same (seed, offset, n) always gives the same examples; ``examples(a + b, s)`` is
        ``examples(a, s) + examples(b, s, offset=a)``, so a run can resume from a data position.
        """

    @abstractmethod
    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` distinct held-out examples in an order fixed by ``seed`` (a prefix of a larger request)."""


def check_request(n: int, seed: int, offset: int = 0) -> None:
    """Validate the arguments of :meth:`Task.examples` / :meth:`Task.eval_examples`."""
    for name, value in (("n", n), ("seed", seed), ("offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_eval_fraction(eval_fraction: float) -> None:
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")


def in_eval_split(prompt: str, eval_fraction: float) -> bool:
    """Whether ``prompt`` belongs to the held-out split: a stable hash of the prompt below the fraction.

    The assignment depends on the prompt text only, so a prompt is held out in every run, on every
    machine, and identical prompts always land on the same side.
    """
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < eval_fraction * 2**64
