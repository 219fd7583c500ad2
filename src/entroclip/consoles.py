"""The rich console that commands print their messages and progress bars to."""

from __future__ import annotations

from rich.console import Console


def message_console(quiet: bool = False) -> Console:
    """A console on stderr that does not cut lines at its width, so that paths and values stay whole in
    logs and pipes (a terminal still wraps long lines for display). ``quiet``: it prints nothing."""
    return Console(stderr=True, soft_wrap=True, quiet=quiet)
