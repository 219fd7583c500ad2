"""Advantage estimators: group-relative (GRPO, Dr.GRPO, RLOO) and GAE for PPO with a value head.

All functions are pure functions of tensors and return detached results (advantages and returns are
targets, never differentiated through).

Group-relative estimators take one scalar reward per response, ``[N]`` with N = prompts * group_size and
the G responses of each prompt stored consecutively; they return one advantage per response ``[N]``.
GAE works per token on ``[B, T]`` tensors with a response mask.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

AdvantageKind = Literal["grpo", "drgrpo", "rloo"]
ADVANTAGE_KINDS: tuple[str, ...] = get_args(AdvantageKind)


def group_advantages(rewards: Tensor, group_size: int, kind: AdvantageKind, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages, float32 ``[N]``, from rewards ``[N]`` laid out as consecutive groups.

    - ``grpo``: (r - group mean) / (group std + eps), with the unbiased std (Bessel's correction, as
      ``torch.std`` in TRL and verl). A group of equal rewards gets advantage 0.
    - ``drgrpo``: r - group mean (Dr.GRPO: no std normalisation).
    - ``rloo``: r - mean of the other G-1 rewards of the group, i.e. G / (G-1) * (r - group mean).
    """
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"kind must be one of {ADVANTAGE_KINDS}, got {kind!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    min_size = 1 if kind == "drgrpo" else 2
    if not isinstance(group_size, int) or group_size < min_size:
        raise ValueError(f"group_size must be an int >= {min_size} for kind={kind!r}, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size} "
            "(expected prompts * group_size)"
        )
    if kind == "grpo" and not eps > 0.0:
        raise ValueError(f"eps must be > 0 for kind='grpo', got {eps}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.detach().to(dtype).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if kind == "grpo":
        adv = centred / (r.std(dim=1, keepdim=True, correction=1) + eps)
    elif kind == "rloo":
        adv = centred * (group_size / (group_size - 1))
    else:
        adv = centred
    return adv.reshape(-1).to(torch.float32)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the valid tokens of each response.

    Args:
        rewards: token-level rewards ``[B, T]`` (usually the sequence reward on the last valid token).
        values: value estimates ``[B, T]`` of the state before each token.
        mask: response mask ``[B, T]`` (bool or 0/1).
        gamma: discount in [0, 1]; lam: GAE lambda in [0, 1].

    Returns:
        ``(advantages, returns)``, each ``[B, T]`` in at least float32, 0 on masked positions.

    The backward recursion runs over valid tokens only: a masked position (padding, or an interior token
    that is not part of the response) is skipped, so the TD error of a valid token bootstraps from the
    value of the next *valid* token (0 after the last one), and rewards and values on masked positions
    are ignored. ``returns = advantages + values`` on valid tokens. Whiten with :func:`masked_whiten`.
    """
    if not (rewards.shape == values.shape == mask.shape and rewards.dim() == 2):
        raise ValueError(
            "rewards, values and mask must share one [B, T] shape, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {x}")
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    r, v, valid = rewards.detach().to(dtype), values.detach().to(dtype), mask.bool()
    zero = torch.zeros(r.shape[0], dtype=dtype, device=r.device)
    next_value, last_gae = zero, zero
    adv = torch.zeros_like(r)
    for t in range(r.shape[1] - 1, -1, -1):
        valid_t = valid[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        last_gae = torch.where(valid_t, delta + gamma * lam * last_gae, last_gae)
        next_value = torch.where(valid_t, v[:, t], next_value)
        adv[:, t] = torch.where(valid_t, last_gae, zero)
    returns = torch.where(valid, adv + v, torch.zeros_like(v))
    return adv, returns


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the valid entries of ``x``; 0 on masked entries.

    Mean and unbiased variance (Bessel's correction, as verl) are taken over all valid entries together;
    ``x`` and ``mask`` have the same shape. Needs at least two valid entries.
    """
    if x.shape != mask.shape:
        raise ValueError(f"x and mask must have the same shape, got {tuple(x.shape)} and {tuple(mask.shape)}")
    valid = mask.bool()
    count = int(valid.sum())
    if count < 2:
        raise ValueError(f"masked_whiten needs at least 2 valid entries in mask, got {count}")
    zeros = torch.zeros_like(x)
    mean = torch.where(valid, x, zeros).sum() / count
    centred = torch.where(valid, x - mean, zeros)
    var = centred.pow(2).sum() / (count - 1)
    return centred * torch.rsqrt(var + eps)
