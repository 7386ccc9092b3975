"""Smoothly clipped absolute deviation (Fan & Li 2001), normalised by its threshold θ."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimcli.penalties import THETA_OPTION, _ThetaPenalty, check_step
from slimcli.registry import Option, register_penalty


@register_penalty("scad")
class SCAD(_ThetaPenalty):
    """SCAD_{θ,a}/θ: |x| up to θ, quadratic up to aθ, (a+1)θ/2 beyond; θ = λ by default."""

    options = (
        # The quadratic piece needs a > 1 (it divides by a − 1); Fan & Li's a > 2 only makes
        # their step-θ rule convex. The prox below covers every a > 1 (its concave case compares
        # the two convex pieces).
        Option("a", float, 3.7, "SCAD is flat beyond |x| = a·theta (3.7: Fan & Li)",
               check=lambda v: 1 < v < math.inf, rule="a > 1"),
        THETA_OPTION,
    )

    def _r(self, ax: Tensor) -> Tensor:
        """R elementwise on |x|."""
        a, th = self.a, self.theta_value
        mid = (2 * a * th * ax - ax.square() - th * th) / (2 * (a - 1) * th)
        return torch.where(ax <= th, ax, torch.where(ax <= a * th, mid, (a + 1) * th / 2))

    def value(self, x: Tensor) -> Tensor:
        if self.theta_value == 0:
            return x.new_zeros(())
        return self._r(x.abs()).sum()

    def subgradient(self, x: Tensor) -> Tensor:
        a, th = self.a, self.theta_value
        if th == 0:
            return torch.zeros_like(x)
        ax = x.abs()
        mid = (a * th * torch.sign(x) - x) / ((a - 1) * th)
        return torch.where(ax <= th, torch.sign(x), torch.where(ax <= a * th, mid, 0.0))

    def prox(self, y: Tensor, step: float) -> Tensor:
        check_step(step)
        a, th, t = self.a, self.theta_value, step
        if t == 0 or th == 0:
            return y.clone()
        ay, sy = y.abs(), torch.sign(y)
        if t < (a - 1) * th:
            # ½x² + t·R is convex: soft thresholding up to θ+t, a linear piece up to aθ, identity beyond
            mid = ((a - 1) * th * ay - a * th * t) / ((a - 1) * th - t)
            mid = torch.minimum(mid, ay)  # at |y| = aθ rounding could overshoot y
            mag = torch.where(ay <= th + t, torch.clamp(ay - t, min=0), torch.where(ay <= a * th, mid, ay))
            return sy * mag
        # t ≥ (a−1)θ: concave (or linear) on [θ, aθ], so the minimiser is the best of the two
        # convex pieces' minimisers, soft thresholding capped at θ or the identity floored at aθ
        low = torch.clamp(ay - t, min=0, max=th)
        high = torch.clamp(ay, min=a * th)
        f_low = 0.5 * (low - ay).square() + t * self._r(low)
        f_high = 0.5 * (high - ay).square() + t * (a + 1) * th / 2
        return sy * torch.where(f_low <= f_high, low, high)
