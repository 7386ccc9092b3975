"""ℓp quasi-norm |x|^p, 0 < p < 1 (the paper's ℓ½, ℓ¾, ...)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimcli.penalties import Penalty, check_step
from slimcli.registry import Option, register_penalty

#: Default smoothing of the subgradient near 0. The reference code has none and returns NaN at
#: γ = 0 (0·∞) and huge kicks for γ ≈ 0; with ε = 1e-8 the update equals the reference's up to a
#: relative (1−p)·ε/|γ| (< 1e-6 wherever |γ| > 1e-2), stays finite in float32 for every p and
#: is bounded by p·ε^(p−1).
DEFAULT_EPS = 1e-8


@register_penalty("lp")
class Lp(Penalty):
    """ℓp quasi-norm |x|^p, 0 < p < 1; prox = half (p=½), ⅔ thresholding, or a Newton solve."""

    options = (
        Option("p", float, 0.5, "exponent; smaller p pushes harder towards 0 (paper: 0.25, 0.5, 0.75)",
               check=lambda v: 0 < v < 1, rule="0 < p < 1"),
        Option("eps", float, DEFAULT_EPS,
               "smoothing of the subgradient: p·sign(x)/(|x|+eps)^(1−p); 0 = the reference code",
               check=lambda v: 0 <= v < math.inf, rule="eps >= 0"),
    )

    def value(self, x: Tensor) -> Tensor:
        return x.abs().pow(self.p).sum()

    def subgradient(self, x: Tensor) -> Tensor:
        g = self.p * torch.sign(x) / (x.abs() + self.eps).pow(1 - self.p)
        return torch.where(x == 0, 0.0, g)  # 0·∞ = NaN at 0 when eps = 0

    def threshold(self, step: float) -> tuple[float, float]:
        """(τ, x_τ): prox(y) = 0 for |y| ≤ τ, and |prox(y)| > x_τ beyond it."""
        p = self.p
        x_tau = (2 * step * (1 - p)) ** (1 / (2 - p))
        return (2 - p) / (2 - 2 * p) * x_tau, x_tau

    def prox(self, y: Tensor, step: float) -> Tensor:
        check_step(step)
        if step == 0:
            return y.clone()
        tau, x_tau = self.threshold(step)
        ay = y.abs()
        big = ay > tau
        ys = torch.clamp(ay, min=tau)  # keeps the closed forms' domains valid where the result is 0
        if self.p == 0.5:
            mag = _half(ys, step)
        elif math.isclose(self.p, 2 / 3, rel_tol=1e-12):
            mag = _two_thirds(ys, step)
        else:
            mag = _newton(ys, step, self.p, x_tau)
        return torch.where(big, torch.sign(y) * mag, 0.0)


def _half(ys: Tensor, t: float) -> Tensor:
    """Half thresholding (Xu et al. 2012) for ½(x−y)² + t·|x|^½, |y| above the threshold."""
    phi = torch.arccos(torch.clamp((t / 4) * (3 / ys).pow(1.5), max=1.0))
    return (2 / 3) * ys * (1 + torch.cos(2 * math.pi / 3 - (2 / 3) * phi))


def _two_thirds(ys: Tensor, t: float) -> Tensor:
    """⅔ thresholding for ½(x−y)² + t·|x|^⅔, |y| above the threshold.

    With x = u³ the stationarity condition is the quartic u⁴ − y·u + c = 0 (c = 2t/3); its
    Ferrari resolvent m³ − c·m − y²/8 = 0 has one real root above the threshold (Cardano,
    cosh form), and the larger real u follows from a quadratic.
    """
    c = 2 * t / 3
    arg = torch.clamp((3 * math.sqrt(3) / 16) * ys.square() * c ** -1.5, min=1.0)
    m = 2 * math.sqrt(c / 3) * torch.cosh(torch.arccosh(arg) / 3)
    phi = torch.sqrt(2 * m)
    u = (phi + torch.sqrt(torch.clamp(2 * ys / phi - phi.square(), min=0))) / 2
    return u.pow(3)


def _newton(ys: Tensor, t: float, p: float, x_tau: float) -> Tensor:
    """Largest root of x − y + t·p·x^(p−1) = 0 on [x_τ, y], any p.

    The left side is increasing and convex on x > x_τ, so Newton from x = y decreases
    monotonically to the root (no bracketing needed); x_τ = (2t(1−p))^(1/(2−p)) keeps the
    curvature ≥ 1 − p/2.
    """
    x = ys.clone()
    tol = 8 * torch.finfo(ys.dtype).eps
    for _ in range(100):
        g = x - ys + t * p * x.pow(p - 1)
        h = 1 + t * p * (p - 1) * x.pow(p - 2)
        new = torch.clamp(x - g / h, min=x_tau)
        done = bool(((new - x).abs() <= tol * new).all())
        x = new
        if done:
            break
    return x
