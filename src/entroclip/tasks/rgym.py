"""reasoning-gym datasets as tasks (optional extra ``reasoning``)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

try:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS
except ImportError as e:
    raise ImportError(
        "reasoning-gym tasks and rewards need the reasoning-gym package: pip install 'entroclip[reasoning]'"
    ) from e

from entroclip.tasks.base import Example
from entroclip.tasks.dataset import FiniteTask


class ReasoningGymTask(FiniteTask):
    """A reasoning-gym dataset: ``question`` becomes the prompt, ``answer`` the reference answer.

    Args:
        dataset: a registered reasoning-gym dataset name, e.g. ``"basic_arithmetic"``.
        size: number of training items, generated with ``create_dataset(dataset, size=size,
            seed=dataset_seed, **config)``.
        eval_size: number of held-out items, generated from the next ``eval_size`` item seeds
            (reasoning-gym seeds item i with ``seed + i``), minus any question also in the training items.
        dataset_seed: seed of the generated items (the ``seed`` of ``examples`` only orders them).
        config: further options of the dataset's config class.

    ``meta`` holds the item (``"entry"``), the dataset name and ``config``, so that the ``reasoning_gym``
    reward can score a completion with the dataset's own ``score_answer``, also in a worker process.
    """

    def __init__(
        self,
        dataset: str,
        size: int = 1000,
        eval_size: int = 100,
        dataset_seed: int = 0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if dataset not in DATASETS:
            close = difflib.get_close_matches(dataset, DATASETS, n=5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}{hint}")
        config = dict(config or {})
        for key in ("size", "seed"):
            if key in config:
                raise ValueError(
                    f"set {key!r} through the task options (size, eval_size, dataset_seed), not config"
                )
        for name, value, low in (
            ("size", size, 1),
            ("eval_size", eval_size, 0),
            ("dataset_seed", dataset_seed, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.dataset = dataset
        self.config = config
        train = self._generate(size, dataset_seed)
        seen = {ex.prompt for ex in train}
        held_out = [ex for ex in self._generate(eval_size, dataset_seed + size) if ex.prompt not in seen]
        super().__init__("reasoning_gym", train, held_out)

    def _generate(self, size: int, seed: int) -> list[Example]:
        if size == 0:
            return []
        try:
            items = list(reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.config))
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(f"invalid config for reasoning-gym dataset {self.dataset!r}: {e}") from e
        meta = {"dataset": self.dataset, "config": self.config}
        return [
            Example(
                prompt=item["question"],
                answer=None if item["answer"] is None else str(item["answer"]),
                meta={"entry": item, **meta},
            )
            for item in items
        ]
