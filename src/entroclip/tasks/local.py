"""Local datasets: ``.jsonl`` files (and ``.parquet`` when pyarrow is installed) with a prompt field."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

from entroclip.tasks.base import Example, check_eval_fraction, in_eval_split
from entroclip.tasks.dataset import FiniteTask

logger = logging.getLogger(__name__)

BadLinePolicy = Literal["error", "skip"]
BAD_LINE_POLICIES: tuple[str, ...] = get_args(BadLinePolicy)
SUFFIXES = (".jsonl", ".parquet")


class BadRowError(ValueError):
    """A row that cannot become an :class:`Example`; the message starts with ``file:line``."""


class JsonlTask(FiniteTask):
    """A local dataset (task name ``jsonl``): one JSON object per line, or one row of a ``.parquet`` file
    (needs pyarrow), per example.

    Args:
        path: the training file, ``.jsonl`` or ``.parquet``.
        prompt_field: the field holding the prompt (a non-empty string).
        answer_field: the field holding the reference answer (a string or a number); None for open-ended
            prompts without answers.
        eval_path: a held-out file in the same format, used as given. Without it, the prompts whose stable
            hash falls below ``eval_fraction`` are held out of ``path`` (0 gives no held-out split).
        on_bad_line: ``"error"`` raises a ValueError naming file and line of the first malformed row;
            ``"skip"`` leaves malformed rows out and counts them in ``skipped_lines``. Blank lines are
            ignored either way.

    ``meta`` of each example holds the whole row (``"row"``) and its location (``"source"``).
    """

    def __init__(
        self,
        path: str | Path,
        prompt_field: str = "prompt",
        answer_field: str | None = "answer",
        eval_path: str | Path | None = None,
        eval_fraction: float = 0.1,
        on_bad_line: BadLinePolicy = "error",
    ) -> None:
        if on_bad_line not in BAD_LINE_POLICIES:
            raise ValueError(f"on_bad_line must be one of {BAD_LINE_POLICIES}, got {on_bad_line!r}")
        check_eval_fraction(eval_fraction)
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.on_bad_line = on_bad_line
        self.skipped_lines = 0
        rows = self._load(Path(path))
        if eval_path is not None:
            train, held_out = rows, self._load(Path(eval_path))
        else:
            train = [ex for ex in rows if not in_eval_split(ex.prompt, eval_fraction)]
            held_out = [ex for ex in rows if in_eval_split(ex.prompt, eval_fraction)]
        super().__init__("jsonl", train, held_out)

    def _load(self, path: Path) -> list[Example]:
        if path.suffix not in SUFFIXES:
            raise ValueError(f"dataset file must end with one of {SUFFIXES}, got {str(path)!r}")
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)
        examples = []
        skipped = 0
        for location, row in rows:
            try:
                examples.append(self._example(row, location))
            except BadRowError:
                if self.on_bad_line == "error":
                    raise
                skipped += 1
        if skipped:
            logger.warning("skipped %d malformed rows of %s", skipped, path)
            self.skipped_lines += skipped
        if not examples:
            raise ValueError(f"dataset file {path} has no valid rows")
        return examples

    def _example(self, row: Any, location: str) -> Example:
        if isinstance(row, bytes):
            try:
                row = json.loads(row)
            except ValueError as e:
                raise BadRowError(f"{location}: invalid JSON ({e})") from None
        if not isinstance(row, dict):
            raise BadRowError(f"{location}: expected a JSON object, got {type(row).__name__}")
        prompt = _field(row, self.prompt_field, location)
        if not isinstance(prompt, str) or not prompt:
            raise BadRowError(
                f"{location}: field {self.prompt_field!r} must be a non-empty string, got {prompt!r:.60}"
            )
        answer = None
        if self.answer_field is not None:
            answer = _field(row, self.answer_field, location)
            if isinstance(answer, bool) or not isinstance(answer, str | int | float):
                raise BadRowError(
                    f"{location}: field {self.answer_field!r} must be a string or number, got {answer!r:.60}"
                )
            answer = str(answer)
        return Example(prompt=prompt, answer=answer, meta={"row": row, "source": location})


def _field(row: dict[str, Any], name: str, location: str) -> Any:
    if name not in row:
        raise BadRowError(f"{location}: field {name!r} is missing (fields: {', '.join(map(str, row))})")
    return row[name]


def _read_jsonl(path: Path) -> Iterator[tuple[str, bytes]]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path}:{lineno}", line


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs the pyarrow package: pip install 'entroclip[parquet]'"
        ) from e
    for index, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path} row {index}", row
