"""PPO's value head: a linear map from the policy's final hidden states to a state value, and its loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ValueHead(nn.Module):
    """V(s_t) for every response position from hidden states ``[B, T, H]``; returns float32 ``[B, T]``.

    Zero-initialised, so PPO starts from V = 0 and the first advantages are the discounted rewards.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


def terminal_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Token-level rewards ``[B, T]``: each sequence's reward ``[B]`` on its last valid token, 0 elsewhere."""
    last = (mask.long().cumsum(-1) == mask.long().sum(-1, keepdim=True)) & mask.bool()
    last &= last.long().cumsum(-1) == 1  # the first position reaching the count is the last valid token
    return torch.where(last, rewards[:, None].to(torch.float32), torch.zeros(mask.shape, dtype=torch.float32))


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> Tensor:
    """PPO value loss 0.5 * max((V - R)^2, (V_clipped - R)^2), mean over valid tokens.

    V_clipped = V_old + clamp(V - V_old, -clip, clip) keeps the value from moving further than ``clip``
    from its rollout-time estimate.
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns).square(), (clipped - returns).square())
    valid = mask.bool()
    return torch.where(valid, per_token, torch.zeros_like(per_token)).sum() / valid.sum().clamp(min=1)
