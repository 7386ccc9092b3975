"""ℓ1 − ℓ2 of each layer's γ vector (Yin, Lou et al.), a non-separable penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from slimcli.penalties import Penalty, check_step
from slimcli.registry import Option, register_penalty


@register_penalty("l1-l2")
class L1MinusL2(Penalty):
    """ℓ1 − α·ℓ2 of each layer's γ vector (scale invariant for α = 1); prox = Lou & Yan 2018."""

    separable = False
    options = (
        Option("alpha", float, 1.0, "weight of the ℓ2 term: ‖x‖₁ − alpha·‖x‖₂",
               check=lambda v: 0 < v <= 1, rule="0 < alpha <= 1"),
    )

    def value(self, x: Tensor) -> Tensor:
        return x.abs().sum() - self.alpha * torch.linalg.vector_norm(x)

    def subgradient(self, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x)
        return torch.sign(x) - self.alpha * x / torch.where(norm > 0, norm, 1.0)  # 0 at x = 0

    def prox(self, y: Tensor, step: float) -> Tensor:
        """Lou & Yan (2018): with m = ‖y‖∞ and z = soft(y, step),

        m > step → z·(‖z‖ + α·step)/‖z‖; (1−α)·step < m ≤ step → 1-sparse, the largest |y_i|
        minus (1−α)·step; m ≤ (1−α)·step → 0. Written without data-dependent branches.
        """
        check_step(step)
        if step == 0 or y.numel() == 0:
            return y.clone()
        a, t = self.alpha, step
        flat = y.reshape(-1)
        ay = flat.abs()
        m, i = ay.max(), ay.argmax()
        z = torch.sign(flat) * torch.clamp(ay - t, min=0)
        nz = torch.linalg.vector_norm(z)
        dense = z * (1 + a * t / torch.where(nz > 0, nz, 1.0))
        one = torch.zeros_like(flat)
        one[i] = torch.sign(flat[i]) * torch.clamp(m - (1 - a) * t, min=0)
        return torch.where(m > t, dense, one).view_as(y)

