"""The log-sum penalty R(x) = ε·log(1 + |x|/ε) (Candès, Wakin & Boyd, 2008), as a slim plugin.

R is scaled so that its slope at 0 is 1, like ℓ1: for |x| ≪ ε it behaves as |x|, for
|x| ≫ ε it grows only logarithmically, so large scales are barely shrunk (like the
nonconvex penalties of the paper). Small ε is closer to ℓ0.

This module is the whole plugin: importing it registers the penalty. slim imports it
through the ``slim.penalties`` entry point declared in this distribution's pyproject.toml.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimcli.penalties import Penalty
from slimcli.registry import Option, register_penalty


@register_penalty("logsum")
class LogSum(Penalty):
    """Log-sum ε·log(1 + |x|/ε) (slope 1 at 0, → ℓ0 as ε → 0); prox = closed-form log-sum thresholding."""

    options = (
        Option(
            "eps",
            float,
            0.01,
            "scale where the penalty turns from ℓ1-like to logarithmic",
            check=lambda v: 0 < v < math.inf,
            rule="eps > 0",
        ),
    )

    def value(self, x: Tensor) -> Tensor:
        return (self.eps * torch.log1p(x.abs() / self.eps)).sum()

    def subgradient(self, x: Tensor) -> Tensor:
        # R'(x) = sign(x)/(1 + |x|/ε); sign(0) = 0 picks 0 from ∂R(0) = [-1, 1].
        return torch.sign(x) / (1 + x.abs() / self.eps)

    def prox(self, y: Tensor, step: float) -> Tensor:
        """argmin_x ½(x − y)² + step·R(x), exactly.

        For y ≥ 0 the minimiser lies in [0, y]. There the stationarity condition
        x − y + step·ε/(ε + x) = 0 is the quadratic x² + (ε − y)x + ε(step − y) = 0, whose
        larger root x* = ((y − ε) + √((y + ε)² − 4·step·ε))/2 is the only local minimum
        with x > 0. The global minimum is x* or 0, whichever has the smaller objective
        (with small ε and a large step, R is very concave and 0 often wins: exact zeros).
        """
        if not 0 <= step < math.inf:
            raise ValueError(f"prox step must be a finite number >= 0, got {step!r}")
        if step == 0:
            return y.clone()
        eps = self.eps
        ay = y.abs()
        disc = (ay + eps).square() - 4 * step * eps
        sq = torch.sqrt(disc.clamp(min=0))
        b = eps - ay
        # The larger root of x² + b·x + ε(step − y); for b > 0 the textbook form cancels, so
        # use the equivalent 2·(−c)/(b + √disc) there.
        root = torch.where(b > 0, 2 * eps * (ay - step) / (b + sq), (sq - b) / 2).clamp(min=0)
        # objective(0) − objective(x*), written without the ½y² terms that would cancel
        gain = root * (ay - root / 2) - step * eps * torch.log1p(root / eps)
        keep = (disc >= 0) & (gain > 0)
        return torch.where(keep, torch.sign(y) * root, torch.zeros_like(y))
