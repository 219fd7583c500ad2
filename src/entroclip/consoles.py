"""The rich consoles that commands print their messages, results and progress bars to."""

from __future__ import annotations

from rich.console import Console


def unwrapped_console(*, stderr: bool = True, quiet: bool = False) -> Console:
    """A console (on stderr, or stdout) that does not cut lines at its width, so that sentences, paths and
    values stay whole in logs and pipes (a terminal still wraps long lines for display); tables still
    fit the width. ``quiet``: it prints nothing."""
    return Console(stderr=stderr, soft_wrap=True, quiet=quiet)
