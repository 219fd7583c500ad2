"""The machine's free memory, and byte counts as people read them."""

from __future__ import annotations

import os

import torch


def format_bytes(n: float) -> str:
    """``n`` bytes in MiB or GiB, with three significant digits below 1,000 (``2.49 MiB``, ``13,400 GiB``)."""
    unit, scale = ("GiB", 2**30) if n >= 2**30 else ("MiB", 2**20)
    value = n / scale
    return f"{value:.3g} {unit}" if value < 1000 else f"{float(f'{value:.3g}'):,.0f} {unit}"


def available_memory(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (CPU: the kernel's MemAvailable), or None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
