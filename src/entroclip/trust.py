"""The trust model of configs: a config is data, and code runs only where the user says so.

A task or reward named by a registered name (``addition``, ``math``, ...) runs entroclip's own code. A
``package.module:attribute`` import path instead imports and calls whatever it names, so a config holding
one (including the ``config.yaml`` of a run folder read by ``--resume`` or ``sweep``) is code. Such names
are refused unless the user allows code: ``--allow-code`` on the command line or
``ENTROCLIP_ALLOW_CODE=1`` in the environment (which worker processes inherit). Even then an import path
may not point into the standard library or the builtins (``os:system``, ``builtins:eval``): a task or
reward is always the user's own module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from entroclip.config import Config, ConfigError
from entroclip.registry import check_import_path, is_import_path

ALLOW_CODE_ENV = "ENTROCLIP_ALLOW_CODE"


def code_allowed() -> bool:
    """Whether the environment allows configs to name code (``ENTROCLIP_ALLOW_CODE=1``)."""
    return os.environ.get(ALLOW_CODE_ENV, "") == "1"


def allow_code() -> None:
    """Allow import paths in configs for this process and the workers it starts."""
    os.environ[ALLOW_CODE_ENV] = "1"


def _named_code(config: Config) -> Iterator[tuple[str, str]]:
    """``(field, name)`` for every field of ``config`` that names a task or reward factory."""
    yield "task.name", config.task.name
    yield "reward.name", config.reward.name
    yield "eval.reward", config.eval.reward


def check_config_code(config: Config, allowed: bool | None = None) -> None:
    """Refuse a config whose task or reward names are import paths, unless code is ``allowed`` (default:
    ``code_allowed()``); refuse standard-library import paths always."""
    allowed = code_allowed() if allowed is None else allowed
    for field, name in _named_code(config):
        if not is_import_path(name):
            continue
        try:
            check_import_path(name)
        except ValueError as err:
            raise ConfigError(f"{field}: {err}") from None
        if not allowed:
            raise ConfigError(
                f"{field}={name!r} is an import path, which runs that module's code; configs are data, so "
                f"run code they name only with --allow-code (or {ALLOW_CODE_ENV}=1), or register it under a "
                "name (entroclip.tasks.register_task, entroclip.rewards.register_reward)"
            )
