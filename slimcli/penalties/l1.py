"""ℓ1, the penalty of the original network slimming (Liu et al., 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from slimcli.penalties import Penalty
from slimcli.registry import register_penalty


@register_penalty("l1")
class L1(Penalty):
    """ℓ1 norm |x| (original network slimming); prox = soft thresholding."""

    def value(self, x: Tensor) -> Tensor:
        return x.abs().sum()

    def subgradient(self, x: Tensor) -> Tensor:
        return torch.sign(x)

    def prox(self, y: Tensor, step: float) -> Tensor:
        return torch.sign(y) * torch.clamp(y.abs() - step, min=0)
