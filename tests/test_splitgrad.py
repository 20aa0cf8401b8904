"""The split backward (B then W) against one plain backward, layer by layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dmlmpi.parallel import splitgrad


def model() -> nn.Sequential:
    """Linear, convolution, BatchNorm, views and a parameterless layer: every kind the split meets."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (2, 6)), nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(18, 7), nn.ReLU(), nn.Linear(7, 4))


@pytest.mark.parametrize("input_grad", [False, True], ids=["data-input", "received-input"])
def test_b_then_w_equals_one_backward(input_grad: bool) -> None:
    """Input gradient from B, parameter gradients from W: the same as loss.backward() (float64, tight)."""
    torch.manual_seed(1)
    x = torch.randn(5, 12, dtype=torch.float64)
    target = torch.randint(0, 4, (5,))
    ref, mine = model().double(), model().double()
    xr = x.clone().requires_grad_(input_grad)
    ref_loss = nn.functional.cross_entropy(ref(xr), target)
    ref_loss.backward()
    xm = x.clone().requires_grad_(input_grad)
    segments = splitgrad.forward(mine, xm, lambda out: nn.functional.cross_entropy(out, target))
    assert segments[-1].y.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    dx = splitgrad.backward_input(segments, None)
    # after B no parameter has a gradient yet, and the output gradients wait for W
    assert all(p.grad is None for p in mine.parameters())
    assert splitgrad.held_bytes(segments) > 0
    if input_grad:
        torch.testing.assert_close(dx, xr.grad, rtol=1e-12, atol=1e-14)
    else:
        assert dx is None
    splitgrad.backward_weight(segments)
    assert segments == []
    for p, q in zip(mine.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    # running statistics were updated once, as by the plain forward
    torch.testing.assert_close(mine[2].running_mean, ref[2].running_mean)


def test_weight_gradients_accumulate_and_frozen_layers_are_skipped() -> None:
    """W adds into .grad like backward; a frozen layer gets none; an upstream gradient is taken as given."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    net[0].weight.requires_grad_(False)
    x = torch.randn(6, 4, requires_grad=True)
    dy = torch.randn(6, 3)
    ref = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    ref.load_state_dict(net.state_dict())
    ref[0].weight.requires_grad_(False)
    xr = x.detach().clone().requires_grad_(True)
    for _ in range(2):
        ref(xr).backward(dy)
        segments = splitgrad.forward(net, x)
        dx = splitgrad.backward_input(segments, dy)
        splitgrad.backward_weight(segments)
    assert net[0].weight.grad is None
    for p, q in zip(net.parameters(), ref.parameters()):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad)  # two accumulated steps
    torch.testing.assert_close(dx, xr.grad / 2)  # dx is this step's alone, never accumulated
