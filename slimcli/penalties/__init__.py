"""Sparsity penalties R on BatchNorm scales γ; the objective is loss + λ·Σ R(γ).

Each penalty is a plugin class (one module each in this package) registered with
``@register_penalty``. The public interface is :func:`create_penalty` and the
:class:`Penalty` methods ``value``, ``subgradient`` and ``prox``. The trainer owns λ and
applies every penalty to all BN γ at once through :func:`add_penalty_grad` (the paper's
subgradient step) or :func:`apply_prox` (proximal step, exact zeros).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from slimcli.errors import UsageError
from slimcli.registry import PENALTIES, Option, Spec


class Penalty:
    """Base class: an elementwise (``separable``) or per-layer penalty R.

    Subclasses implement ``value``, ``subgradient`` and, where a closed form exists,
    ``prox``. Options declared in ``options`` arrive as attributes of the instance.
    """

    name: ClassVar[str] = "?"
    options: ClassVar[tuple[Option, ...]] = ()
    #: R acts on each element alone; a non-separable penalty (l1-l2) sees one layer's vector.
    separable: ClassVar[bool] = True

    def __init__(self, lam: float = 1e-4, **options: Any) -> None:
        self.lam = float(lam)
        self.spec_options = options
        for key, value in options.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.spec_options.items())
        return f"{type(self).__name__}({self.name}{':' + opts if opts else ''}, lam={self.lam:g})"

    @property
    def spec(self) -> str:
        """The canonical spec string of this penalty (its name and non-default options)."""
        return str(PENALTIES.parse(self.name, **self.spec_options))

    # the math: subclasses override --------------------------------------------------
    def value(self, x: Tensor) -> Tensor:
        """Σ R(x) over the vector ``x`` (a scalar tensor)."""
        raise NotImplementedError

    def subgradient(self, x: Tensor) -> Tensor:
        """An element of ∂R(x), with a defined value at 0 (the paper's Table 1)."""
        raise NotImplementedError

    def prox(self, y: Tensor, step: float) -> Tensor | None:
        """argmin_x ½‖x − y‖² + step·R(x), or ``None`` when there is no closed form."""
        return None

    @property
    def has_prox(self) -> bool:
        return type(self).prox is not Penalty.prox

    @property
    def is_zero(self) -> bool:
        """True when the penalty does nothing (so the trainer can skip it)."""
        return False

    # many layers at once: the trainer calls these --------------------------------------
    def value_many(self, xs: list[Tensor]) -> Tensor:
        """Σ over layers of ``value`` (a separable penalty sees one flat vector)."""
        if not xs:
            return torch.zeros(())
        if self.separable:
            return self.value(torch.cat([x.reshape(-1) for x in xs]))
        return torch.stack([self.value(x.reshape(-1)) for x in xs]).sum()

    def subgradient_many(self, xs: list[Tensor]) -> list[Tensor]:
        """``subgradient`` of every layer's vector, computed in one call for separable R."""
        if self.separable and xs:
            flat = self.subgradient(torch.cat([x.reshape(-1) for x in xs]))
            return [g.view_as(x) for g, x in zip(torch.split(flat, [x.numel() for x in xs]), xs, strict=True)]
        return [self.subgradient(x.reshape(-1)).view_as(x) for x in xs]

    def prox_many(self, ys: list[Tensor], step: float) -> list[Tensor] | None:
        """``prox`` of every layer's vector (None when the penalty has no prox)."""
        if not self.has_prox:
            return None
        if self.separable and ys:
            flat = self.prox(torch.cat([y.reshape(-1) for y in ys]), step)
            assert flat is not None
            return [p.view_as(y) for p, y in zip(torch.split(flat, [y.numel() for y in ys]), ys, strict=True)]
        out = [self.prox(y.reshape(-1), step) for y in ys]
        return [o.view_as(y) for o, y in zip(out, ys, strict=True)]  # type: ignore[union-attr]


#: The ``theta`` option of the penalties normalised by their threshold θ (MCP, SCAD).
THETA_OPTION = Option(
    "theta", float, None,
    "threshold θ; none = lam, which reproduces the reference code (acts on |γ| ≤ a·lam only)",
    check=lambda v: 0 < v < math.inf, rule="theta > 0, or none (= lam)",
)  # fmt: skip


class _ThetaPenalty(Penalty):
    """Base of R_{θ,a}/θ penalties: declare :data:`THETA_OPTION`; θ = λ while it is none."""

    theta: float | None

    @property
    def theta_value(self) -> float:
        """The θ in use: the ``theta`` option, or λ when it is none."""
        return float(self.lam if self.theta is None else self.theta)

    @property
    def is_zero(self) -> bool:
        return self.theta_value == 0  # θ = λ = 0: R_{0,a} ≡ 0


def check_step(step: float) -> None:
    """Reject a prox step that is negative or not finite (a caller bug, not user input)."""
    if not (0 <= step < math.inf):
        raise ValueError(f"prox step must be a finite number >= 0, got {step!r}")


def create_penalty(spec: str | Spec, lam: float = 1e-4) -> Penalty:
    """Build the penalty named by ``spec`` (``NAME[:k=v,…]``) for regularisation strength ``lam``."""
    if not lam >= 0:
        raise UsageError(f"lambda must be >= 0, got {lam}")
    return PENALTIES.create(spec, lam=lam)


@torch.no_grad()
def add_penalty_grad(penalty: Penalty, gammas: list[Tensor]) -> None:
    """γ.grad += λ·∂R(γ) for every BN scale at once (the paper's update, after backward).

    Gradients must be unscaled (call after ``GradScaler.unscale_`` under fp16), otherwise the
    penalty is drowned by the loss scale — the failure users report from other tools.
    """
    if penalty.is_zero or penalty.lam == 0:
        return
    live = [g for g in gammas if g.grad is not None]
    if not live:
        return
    subgrads = penalty.subgradient_many([g.detach() for g in live])
    torch._foreach_add_([g.grad for g in live], subgrads, alpha=penalty.lam)


@torch.no_grad()
def apply_prox(penalty: Penalty, gammas: list[Tensor], lr: float) -> None:
    """γ ← prox(γ, lr·λ) for every BN scale at once (after the optimizer step)."""
    if penalty.is_zero or penalty.lam == 0:
        return
    if not penalty.has_prox:
        raise UsageError(
            f"penalty '{penalty.name}' has no proximal map; use --update subgradient "
            f"or a penalty with one (l1, lp, tl1, mcp, scad, l1-l2)"
        )
    if not gammas:
        return
    new = penalty.prox_many([g.detach() for g in gammas], lr * penalty.lam)
    assert new is not None
    torch._foreach_copy_([g.data for g in gammas], new)


__all__ = ["Option", "Penalty", "add_penalty_grad", "apply_prox", "check_step", "create_penalty"]
