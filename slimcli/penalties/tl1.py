"""Transformed ℓ1 (Tℓ1), the paper's best penalty for accuracy right after pruning."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimcli.penalties import Penalty, check_step
from slimcli.registry import Option, register_penalty


@register_penalty("tl1")
class TL1(Penalty):
    """Transformed ℓ1 (a+1)|x|/(a+|x|); → ℓ0 as a → 0, → ℓ1 as a → ∞; prox = Zhang & Xin thresholding."""

    options = (
        Option("a", float, 1.0, "shape: small a is closer to ℓ0, large a to ℓ1 (paper: 0.5, 1)",
               check=lambda v: 0 < v < math.inf, rule="a > 0"),
    )

    def value(self, x: Tensor) -> Tensor:
        ax = x.abs()
        return ((self.a + 1) * ax / (self.a + ax)).sum()

    def subgradient(self, x: Tensor) -> Tensor:
        a = self.a
        return a * (a + 1) * torch.sign(x) / (a + x.abs()).square()

    def threshold(self, step: float) -> float:
        """τ: prox(y) = 0 exactly when |y| ≤ τ (Zhang & Xin 2017)."""
        a = self.a
        if step <= a * a / (2 * (a + 1)):
            return step * (a + 1) / a
        return math.sqrt(2 * step * (a + 1)) - a / 2

    def prox(self, y: Tensor, step: float) -> Tensor:
        check_step(step)
        if step == 0:
            return y.clone()
        a = self.a
        ay = y.abs()
        c = step * a * (a + 1)
        w = a + ay
        phi = torch.arccos(torch.clamp(1 - 27 * c / (2 * w.pow(3)), -1.0, 1.0))
        # u = a + |x| is the root of u³ − w·u² + c = 0 (Zhang & Xin); the textbook |x| = u − a
        # cancels to an error ~eps·a (wrong sign near the threshold, 10 % off in float32), while
        # the stationarity |x| = |y| − c/u² keeps it ~eps·|y|.
        u = w * (2 * torch.cos(phi / 3) + 1) / 3
        mag = (ay - c / u.square()).clamp_min(0)
        return torch.where(ay > self.threshold(step), torch.sign(y) * mag, 0.0)
