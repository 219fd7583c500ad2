"""Tasks over fixed lists of examples: a training list walked epoch by epoch and a held-out list."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from entroclip.tasks.base import Example, Task, check_request


class FiniteTask(Task):
    """A task over a fixed training list and a fixed held-out list.

    The training stream visits every training example once per epoch, each epoch in its own order drawn
    from (seed, epoch). ``alphabet`` is the set of characters of all prompts and answers.
    """

    def __init__(self, name: str, train: Sequence[Example], held_out: Sequence[Example]) -> None:
        if not train:
            raise ValueError(f"task {name!r} has no training examples")
        self.name = name
        self.train = tuple(train)
        self.held_out = tuple(held_out)
        chars = {c for ex in (*self.train, *self.held_out) for c in ex.prompt + (ex.answer or "")}
        self.alphabet = "".join(sorted(chars))
        self._order: tuple[int, int, np.ndarray] | None = None

    def _epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        if self._order is None or self._order[:2] != (seed, epoch):
            perm = np.random.default_rng([seed, epoch]).permutation(len(self.train))
            self._order = (seed, epoch, perm)
        return self._order[2]

    def examples(self, n: int, seed: int, offset: int = 0) -> list[Example]:
        check_request(n, seed, offset)
        out = []
        for j in range(offset, offset + n):
            epoch, position = divmod(j, len(self.train))
            out.append(self.train[int(self._epoch_order(seed, epoch)[position])])
        return out

    def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
        check_request(n, seed)
        if n > len(self.held_out):
            raise ValueError(
                f"task {self.name!r} has {len(self.held_out)} held-out examples, {n} were asked for"
            )
        order = np.random.default_rng(seed).permutation(len(self.held_out))
        return [self.held_out[int(i)] for i in order[:n]]
