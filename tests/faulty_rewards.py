"""Rewards that fail on purpose, for the failure tests (tests/e2e/test_run_failures.py and others).

``reward.name: faulty_rewards:faulty`` with ``reward.options: {mode: ...}``: half of the completions (by a
stable hash) score 1.0; the other half fail in the way ``mode`` names, or score 0.0 with ``mode: ok``.
Reward worker processes import this module by name (pytest puts tests/ on sys.path).
"""

import math
import os
import time
import zlib


def fails(completion: str) -> bool:
    """Whether ``completion`` is one of the samples that fail (the same in every process)."""
    return zlib.crc32(completion.encode()) % 2 == 0


def faulty(completion: str, example: object, *, mode: str) -> float:
    if mode == "always_raise":
        raise RuntimeError("this reward always crashes")
    if not fails(completion):
        return 1.0
    if mode == "ok":
        return 0.0
    if mode == "raise":
        raise RuntimeError("this reward crashed")
    if mode == "nan":
        return math.nan
    if mode == "hang":
        time.sleep(3600)
    if mode == "exit":
        os._exit(3)
    raise ValueError(f"unknown mode {mode!r}")
