"""The fixed probe set: prompts with continuations sampled once from the initial policy, kept in
``RUN/probe.safetensors``, on which the entropy before and after every update is measured exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save

from entroclip.policy.sampling import Rollout, SharedPrompts
from entroclip.runio import atomic_write_bytes


def write_probe(probe: Rollout, logp: torch.Tensor, path: Path) -> None:
    """Write the probe set and its log-probs ``[B, T]`` under the initial policy to ``path`` atomically."""
    tensors = {
        "input_ids": probe.input_ids,
        "attention_mask": probe.attention_mask,
        "response_mask": probe.response_mask.to(torch.uint8),
        "logp": logp,
        "prompt_len": torch.tensor(probe.prompt_len),
    }
    atomic_write_bytes(path, save({k: v.cpu() for k, v in tensors.items()}))


def read_probe(path: Path, device: torch.device) -> Rollout:
    """The probe set written by :func:`write_probe`, on ``device``."""
    t = {k: v.to(device) for k, v in load_file(str(path)).items()}
    prompt_len = int(t["prompt_len"])
    prompts = t["input_ids"][:, :prompt_len], t["attention_mask"][:, :prompt_len]
    return Rollout(
        t["input_ids"],
        t["attention_mask"],
        prompt_len,
        t["response_mask"].bool(),
        t["logp"],
        [],
        SharedPrompts.of_rows(*prompts),
    )


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean of ``values`` over the positions where ``mask`` is true (0 when there are none)."""
    return float((values * mask).sum() / mask.sum().clamp(min=1))
