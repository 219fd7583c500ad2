"""Metric sinks: JSONL (always, flushed per step), TensorBoard and Weights & Biases (optional)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from entroclip.runio import METRICS_FILE, atomic_write_text, logged_lines


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Append one JSON object per step to ``RUN/metrics.jsonl`` and mirror it to the optional sinks.

    On resume the file is first cut back to the rows of steps 1..``resume_step`` (rows written after the
    checkpoint are replayed by the resumed run); the trainer resumes only from a checkpoint the log covers.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int = 0,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.path = run_dir / METRICS_FILE
        self._truncate(resume_step)
        self._file = self.path.open("a")
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    "run.wandb_project is set but wandb is not installed: pip install wandb"
                ) from None
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")

    def _truncate(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        keep = logged_lines(self.path.parent)[:resume_step]
        atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _json_value(float(v)) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def sync(self) -> None:
        """Flush the log to disk (before a checkpoint, so that a checkpoint never outlives its rows)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
