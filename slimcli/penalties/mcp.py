"""Minimax concave penalty (Zhang 2010), normalised by its threshold θ."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimcli.penalties import THETA_OPTION, _ThetaPenalty, check_step
from slimcli.registry import Option, register_penalty


@register_penalty("mcp")
class MCP(_ThetaPenalty):
    """MCP_{θ,a}/θ: |x| − x²/(2aθ) for |x| ≤ aθ, aθ/2 beyond; θ = λ by default; prox = firm thresholding."""

    options = (
        # Any a > 0 defines MCP and its prox (firm thresholding while step < aθ, hard
        # thresholding beyond). a > 1 is only the classical least-squares condition (a convex
        # prox at step θ); the authors' code uses a = 1.
        Option("a", float, 3.0, "concavity: MCP is flat beyond |x| = a·theta (the authors' code: 1)",
               check=lambda v: 0 < v < math.inf, rule="a > 0"),
        THETA_OPTION,
    )

    def value(self, x: Tensor) -> Tensor:
        b = self.a * self.theta_value
        if b == 0:
            return x.new_zeros(())
        ax = x.abs()
        return torch.where(ax <= b, ax - x.square() / (2 * b), b / 2).sum()

    def subgradient(self, x: Tensor) -> Tensor:
        b = self.a * self.theta_value
        if b == 0:
            return torch.zeros_like(x)
        return torch.where(x.abs() <= b, torch.sign(x) - x / b, 0.0)

    def prox(self, y: Tensor, step: float) -> Tensor:
        check_step(step)
        b = self.a * self.theta_value
        if step == 0 or b == 0:
            return y.clone()
        ay = y.abs()
        if step < b:
            # firm thresholding: 0 up to step, linear (slope b/(b−step)) up to b, identity beyond
            mid = torch.sign(y) * (ay - step) * (b / (b - step))
            return torch.where(ay <= step, 0.0, torch.where(ay <= b, mid, y))
        # step ≥ aθ: the objective is concave on [0, aθ], so the prox is hard thresholding
        return torch.where(ay > math.sqrt(b * step), y, 0.0)
