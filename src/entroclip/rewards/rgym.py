"""reasoning-gym reward: the dataset's own ``score_answer`` on the example's reasoning-gym entry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

try:
    import reasoning_gym
except ImportError as e:
    raise ImportError(
        "reasoning-gym tasks and rewards need the reasoning-gym package: pip install 'entroclip[reasoning]'"
    ) from e

from entroclip.rewards.base import Reward
from entroclip.rewards.extract import ExtractMode, check_extraction, extract_answer
from entroclip.tasks.base import Example


def reasoning_gym_reward(*, extract: ExtractMode = "answer_tag", stop: Sequence[str] = ()) -> Reward:
    """Score with ``score_answer(answer, entry)`` of the dataset that generated the example.

    Needs examples from the ``reasoning_gym`` task (``meta`` holds the entry, dataset name and config).
    The default extraction is reasoning-gym's convention, the last ``<answer>...</answer>``; a completion
    without one passes ``None``, which the scorers give 0.
    """
    stop = check_extraction(extract, stop)
    fn = partial(_reasoning_gym_score, extract=extract, stop=stop)
    return Reward(fn=fn, name="reasoning_gym", isolation="process")


_SCORERS: dict[str, Callable[..., float]] = {}


def _scorer(dataset: str, config: dict[str, Any]) -> Callable[..., float]:
    """``score_answer`` of a dataset built with this config, one per process."""
    key = repr((dataset, sorted(config.items())))
    if key not in _SCORERS:
        _SCORERS[key] = reasoning_gym.create_dataset(dataset, **config).score_answer
    return _SCORERS[key]


def _reasoning_gym_score(
    completion: str, example: Example, *, extract: ExtractMode, stop: tuple[str, ...]
) -> float:
    meta: Any = example.meta
    if not all(key in meta for key in ("entry", "dataset", "config")):
        raise ValueError(
            "the reasoning_gym reward needs examples of the reasoning_gym task (meta has no entry)"
        )
    score_answer = _scorer(meta["dataset"], meta["config"])
    return float(score_answer(answer=extract_answer(completion, extract, stop), entry=meta["entry"]))
