"""The logsum plugin: formula, subgradient == autograd, prox == brute force, slim's penalty contract.

The autograd and brute-force checks are slimcli.testing's (check_penalty runs them with its
own probe points; the tests below run them again where this plugin's author knows more).
"""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

logsum = pytest.importorskip(
    "slim_plugin_example.logsum", reason="pip install -e plugins/slim-plugin-example"
)

from slimcli.errors import UsageError  # noqa: E402
from slimcli.penalties import add_penalty_grad, apply_prox, create_penalty  # noqa: E402
from slimcli.registry import PENALTIES  # noqa: E402
from slimcli.testing import (  # noqa: E402
    brute_force_prox,
    check_penalty,
    check_penalty_autograd,
    check_penalty_prox,
)

F64 = torch.float64


def points(dtype: torch.dtype = F64) -> torch.Tensor:
    mags = [0.0, 1e-9, 1e-4, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0, 2.5, 10.0]
    return torch.tensor([s * m for m in mags for s in (1, -1)][1:], dtype=dtype)


def test_registered_through_the_entry_point() -> None:
    eps = importlib.metadata.entry_points(group="slim.penalties")
    assert any(ep.name == "logsum" and ep.value == "slim_plugin_example.logsum" for ep in eps)
    assert "logsum" in PENALTIES and PENALTIES.get("logsum").cls is logsum.LogSum
    assert str(PENALTIES.parse("logsum:eps=0.01")) == "logsum"  # the default is dropped
    assert str(PENALTIES.parse("logsum:eps=0.1")) == "logsum:eps=0.1"


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "nan", "abc"])
def test_eps_is_validated(bad: str) -> None:
    with pytest.raises(UsageError, match="eps"):
        create_penalty(f"logsum:eps={bad}")


@pytest.mark.parametrize("eps", [0.01, 0.5])
def test_value_formula_and_unit_slope_at_zero(eps: float) -> None:
    pen = create_penalty(f"logsum:eps={eps}")
    x = points()
    expected = sum(eps * math.log(1 + abs(v) / eps) for v in x.tolist())
    assert pen.value(x).item() == pytest.approx(expected, rel=1e-12)
    h = 1e-9
    assert (pen.value(torch.tensor([h], dtype=F64)).item() / h) == pytest.approx(1.0, rel=1e-6)
    big = torch.tensor([100.0], dtype=F64)  # logarithmic growth: far below ℓ1 for |x| ≫ eps
    assert pen.value(big).item() < 0.05 * 100


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_subgradient_equals_autograd(eps: float) -> None:
    """slimcli.testing.check_penalty_autograd at the probe points (R's only kink is 0, left out)."""
    x = points()
    check_penalty_autograd(f"logsum:eps={eps}", points=x[x != 0], kinks=(), rtol=1e-12, atol=1e-15)
    pen = create_penalty(f"logsum:eps={eps}")
    assert pen.subgradient(torch.zeros(3, dtype=F64)).abs().max().item() == 0  # defined at 0: 0 ∈ [-1, 1]


@pytest.mark.parametrize("eps", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("step", [1e-3, 0.01, 0.05, 0.3, 2.0])
def test_prox_equals_brute_force(eps: float, step: float) -> None:
    """Both the convex (step ≤ eps) and the nonconvex (step > eps, jump at the threshold) regimes.

    slimcli.testing.check_penalty_prox: the prox's objective ½(x − y)² + step·R(x) is at most
    the brute-force minimum + 1e-12 (slimcli.testing.brute_force_prox: a grid over x = s·y,
    s in [0, 2], refined around its best local minima), and x matches a unique minimiser.
    """
    pen = create_penalty(f"logsum:eps={eps}")
    ys = torch.linspace(-3, 3, 241, dtype=F64)
    check_penalty_prox(pen, steps=(step,), ys=ys, f_atol=1e-12, f_rtol=0, x_tol=1e-6)
    # away from the 0-vs-x* tie (where both are optimal) the minimiser itself matches, to 1e-6
    prox, brute = pen.prox(ys, step), brute_force_prox(pen, ys, step)
    clear = (0.5 * ys.square() - brute.objective).abs() > 1e-9  # objective(0) = ½y²
    torch.testing.assert_close(prox[clear], brute.x[clear], rtol=0, atol=1e-6)


def test_prox_properties() -> None:
    pen = create_penalty("logsum:eps=0.01")
    ys = torch.linspace(-2, 2, 4001, dtype=F64)
    for step in (1e-3, 0.05, 0.5):
        p = pen.prox(ys, step)
        assert (torch.diff(p) >= 0).all()  # a 1-D prox is monotone
        torch.testing.assert_close(pen.prox(-ys, step), -p)  # odd
        assert (p.abs() <= ys.abs()).all()  # shrinks
        assert (p == 0).any()  # exact zeros near 0
    # nonconvex regime: the prox jumps from 0 straight to a large value (hard-threshold-like)
    p = pen.prox(ys, 0.5)
    assert p[p > 0].min().item() > 0.1  # ≈ 0.13 here, for |y| ≈ 0.17 at the jump
    assert torch.equal(pen.prox(ys, 0.0), ys)
    with pytest.raises(ValueError, match="step"):
        pen.prox(ys, -1.0)


def test_slim_penalty_contract() -> None:
    """The checks slim runs on every built-in penalty (tests/test_penalties.py uses the same function)."""
    check_penalty(logsum.LogSum)  # float32 and float64
    pen = create_penalty("logsum")
    assert pen.has_prox and pen.separable


def test_float32_prox_matches_float64() -> None:
    pen = create_penalty("logsum:eps=0.01")
    ys = torch.linspace(-1.5, 1.5, 3001, dtype=F64)
    for step in (1e-4, 1e-3, 0.02):
        p64 = pen.prox(ys, step)
        p32 = pen.prox(ys.float(), step).double()
        # identical except possibly at the threshold itself, where both answers are optimal
        differ = (p64 - p32).abs() > 1e-6
        assert differ.sum().item() <= 2, step


def test_trainer_helpers_use_it() -> None:
    """What sparsify-train does with a penalty: subgradient step on γ.grad, or the prox after the step."""
    pen = create_penalty("logsum:eps=0.01", lam=0.5)
    gammas = [torch.tensor([0.5, -0.002, 0.03]), torch.tensor([1.0, 0.0])]
    for g in gammas:
        g.grad = torch.zeros_like(g)
    add_penalty_grad(pen, gammas)
    for g in gammas:
        torch.testing.assert_close(g.grad, 0.5 * pen.subgradient(g))
    before = [g.clone() for g in gammas]
    apply_prox(pen, gammas, lr=0.1)
    for g, b in zip(gammas, before, strict=True):
        torch.testing.assert_close(g, pen.prox(b, 0.1 * 0.5))
    assert gammas[0][1].item() == 0 and gammas[1][1].item() == 0
