"""The zero penalty (plain training, and the default of ``slim finetune``)."""

from __future__ import annotations

import torch
from torch import Tensor

from slimcli.penalties import Penalty
from slimcli.registry import register_penalty


@register_penalty("none")
class NoPenalty(Penalty):
    """No sparsity penalty: R(x) = 0."""

    @property
    def is_zero(self) -> bool:
        return True

    def value(self, x: Tensor) -> Tensor:
        return x.new_zeros(())

    def subgradient(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def prox(self, y: Tensor, step: float) -> Tensor:
        return y.clone()
