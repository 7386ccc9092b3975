"""The channel-selection layer: keeps some channels of its input (dim 1), in order.

It is what network slimming puts in front of a BatchNorm whose input cannot be narrowed at
its source — a residual sum in pre-activation ResNets, a concatenation in DenseNets, the
network input. The kept indices are a buffer, so they travel with the ``state_dict`` but are
not parameters (they never count in ``params``), and ONNX export turns the layer into one
``Gather``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelSelection(nn.Module):
    """``x.index_select(1, indices)``: the kept channels of ``x``, in increasing order."""

    indices: Tensor

    def __init__(self, indices: Tensor | list[int]) -> None:
        super().__init__()
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long).reshape(-1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.indices)

    def extra_repr(self) -> str:
        return f"channels={self.indices.numel()}"
