"""A stage's backward in two passes: B, the input's gradient, and W, the weights' gradient (zero-bubble schedules).

The forward runs the stage's layers one at a time, each on a detached copy of the previous layer's
output, so each layer's autograd graph stands alone (a `Segment`). B walks the layers backwards
asking autograd for each layer's input gradient only: autograd then skips the weight branches
(a Linear's dW = dy^T x, a convolution's weight gradient) and keeps the graph. W asks each layer
with parameters for the parameters' gradients from the output gradient B left it, accumulating
into .grad as a plain backward would. The split is per top-level layer: inside a compound layer
(a block of several ops) W walks the block's own activation-gradient path again, which B has
already walked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass
class Segment:
    """One layer's forward: its (detached) input, its output, its trainable parameters, and the output's gradient once B ran."""

    x: torch.Tensor
    y: torch.Tensor
    params: list[nn.Parameter]
    dy: torch.Tensor | None = field(default=None)


def forward(layers: Iterable[nn.Module], x: torch.Tensor,
            tail: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[Segment]:
    """Run the layers (and `tail`, e.g. the loss, as one more layer) on x, one graph per layer."""
    segments = []
    fns: list[tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Parameter]]] = [
        (layer, [p for p in layer.parameters() if p.requires_grad]) for layer in layers]
    if tail is not None:
        fns.append((tail, []))
    for fn, params in fns:
        y = fn(x)
        segments.append(Segment(x, y, params))
        # the next layer starts its own graph from a leaf on the same memory (a view: nothing copied)
        x = y.detach().requires_grad_(y.requires_grad)
    return segments


def backward_input(segments: list[Segment], dy: torch.Tensor | None) -> torch.Tensor | None:
    """B: the gradient of the first layer's input from the last layer's output gradient (None: a scalar loss)."""
    for s in reversed(segments):
        if not s.y.requires_grad:
            return None  # nothing before this layer needs a gradient (the data, a frozen prefix)
        if s.params:
            # W needs this output gradient; a scalar loss's is 1
            s.dy = dy if dy is not None else torch.ones_like(s.y)
        if not s.x.requires_grad:
            return None  # the stage's input (data on the first stage): only W has work left
        # the input's gradient alone; the graph stays for W when the layer has parameters
        (dx,) = torch.autograd.grad(s.y, s.x, dy, retain_graph=bool(s.params), allow_unused=True)
        dy = dx if dx is not None else torch.zeros_like(s.x)  # an output that ignores its input
    return dy


def backward_weight(segments: list[Segment]) -> None:
    """W: accumulate every layer's parameter gradients into .grad, and free the graphs."""
    for s in segments:
        if s.params and s.dy is not None:
            torch.autograd.backward(s.y, s.dy, inputs=s.params)
        s.dy = None
    segments.clear()


def held_bytes(segments: list[Segment]) -> int:
    """Bytes of the output gradients B left for W."""
    return sum(s.dy.numel() * s.dy.element_size() for s in segments if s.dy is not None)
