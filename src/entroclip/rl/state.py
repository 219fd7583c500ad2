"""What a run's checkpoint holds besides the optimizer (``CHECKPOINT_STATE_KEYS``), which checkpoint a
resumed run starts from, and the policy's weights in and out of it."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from entroclip.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, list_checkpoints
from entroclip.distributed import full_state_dict, load_full_state_dict
from entroclip.runio import METRICS_FILE, logged_lines

#: the value head's weights sit in the checkpoint's model.safetensors under this prefix
VALUE_PREFIX = "value_head."
#: the trainer state saved in a checkpoint's state.pt besides the optimizer's own
CHECKPOINT_STATE_KEYS = (
    "step",
    "optimizer",
    "scheduler",
    "consecutive_skips",
    "controller",
    "skipped_total",
    "tied_weights",
)


def gather_weights(model: torch.nn.Module, value_head: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The whole weights of the policy and its value head (every rank takes part in gathering them)."""
    weights = full_state_dict(model)
    if value_head is not None:
        weights.update({VALUE_PREFIX + k: v for k, v in full_state_dict(value_head).items()})
    return weights


def resume_point(run_dir: Path, fingerprint: str, console: Console) -> Checkpoint | None:
    """The newest checkpoint that ``metrics.jsonl`` covers, verified (None: start from step 0). A log cut,
    emptied or edited before a later checkpoint's step makes the run replay from an earlier one (or from
    the start), with a warning, so that the log never has holes."""
    logged = len(logged_lines(run_dir))
    newest = list_checkpoints(run_dir)[-1:]
    ckpt = latest_checkpoint(run_dir, fingerprint, up_to_step=logged)
    if newest and (ckpt is None or ckpt.step < newest[0][0]):
        start = f"checkpoint step {ckpt.step}" if ckpt is not None else "the start"
        console.print(
            f"[yellow]warning:[/] {METRICS_FILE} logs steps 1-{logged} only, before checkpoint step "
            f"{newest[0][0]}: replaying from {start}",
            highlight=False,
        )
    if ckpt is not None:
        missing = [k for k in CHECKPOINT_STATE_KEYS if k not in ckpt.state]
        if missing:
            raise CheckpointError(f"{ckpt.path}: state.pt lacks {', '.join(missing)}")
    return ckpt


def load_weights(ckpt: Checkpoint, model: torch.nn.Module, value_head: torch.nn.Module | None) -> None:
    """Put the checkpoint's weights into the policy (and value head); refuse weights that do not fit."""
    model_weights = {k: v for k, v in ckpt.weights.items() if not k.startswith(VALUE_PREFIX)}
    result = load_full_state_dict(model, model_weights, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(ckpt.state["tied_weights"]):
        raise CheckpointError(
            f"{ckpt.path}: weights do not fit the model (missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys})"
        )
    if value_head is not None:
        head = {
            k.removeprefix(VALUE_PREFIX): v for k, v in ckpt.weights.items() if k.startswith(VALUE_PREFIX)
        }
        load_full_state_dict(value_head, head, strict=True)
