"""The counterfactual clip probe: the step's update taken again, on copies, without clip-low and without
clip-high, to measure what each side of the clip did to the probe entropy."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import PreTrainedModel

from entroclip.config import Config
from entroclip.control import ControlAction
from entroclip.rl.optim import make_scheduler, trainable_parameters
from entroclip.update import RunSettings, UpdateBatch, run_update


def counterfactual_probe(
    model: PreTrainedModel,
    value_head: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    update: tuple[UpdateBatch, RunSettings, ControlAction, int],
    probe_entropy: Callable[[PreTrainedModel], float],
    config: Config,
) -> dict[str, float]:
    """Probe entropy (nats) after ``update`` = (batch, settings, action, shuffle seed) taken from the
    current state without clip-low (``no_low``) and without clip-high (``no_high``); nothing of the real
    model, optimizer or schedule changes."""
    batch, settings, action, shuffle_seed = update
    out = {}
    for name, variant in (
        ("no_low", replace(action, eps_low=None)),
        ("no_high", replace(action, eps_high=None)),
    ):
        model_copy, head_copy = copy.deepcopy(model), copy.deepcopy(value_head)
        optimizer_copy = torch.optim.AdamW(trainable_parameters(model_copy, head_copy))
        optimizer_copy.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        scheduler_copy = make_scheduler(optimizer_copy, config)
        scheduler_copy.load_state_dict(scheduler.state_dict())
        quiet = replace(settings, attribution=False)
        run_update(
            model_copy, optimizer_copy, scheduler_copy, batch, quiet, variant, shuffle_seed, 0, head_copy
        )
        out[name] = probe_entropy(model_copy)
    return out
