"""PPO value head pieces against plain references."""

import torch

from entroclip.value import ValueHead, clipped_value_loss, terminal_rewards


def test_terminal_rewards_sit_on_the_last_valid_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).bool()
    got = terminal_rewards(torch.tensor([1.0, -2.0, 3.0, 5.0]), mask)
    expected = torch.tensor([[0, 0, 1.0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 3.0], [0, 0, 0, 0]])
    assert torch.equal(got, expected)


def test_clipped_value_loss_matches_reference(gen):
    values = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    old = values + 0.5 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    returns = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=gen) < 0.7
    total, n = 0.0, 0
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
                vc = o + min(max(v - o, -0.2), 0.2)
                total += 0.5 * max((v - r) ** 2, (vc - r) ** 2)
                n += 1
    got = clipped_value_loss(values, old, returns, mask, clip=0.2)
    assert abs(got.item() - total / n) < 1e-12


def test_value_head_starts_at_zero():
    head = ValueHead(8)
    out = head(torch.randn(2, 3, 8))
    assert out.shape == (2, 3) and torch.equal(out, torch.zeros(2, 3))
