"""The logsum plugin: formula, subgradient == autograd, prox == brute force, slim's penalty contract."""

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
from slimcli.testing import check_penalty  # noqa: E402

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
    pen = create_penalty(f"logsum:eps={eps}")
    x = points()
    x = x[x != 0].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(pen.value(x), x)
    torch.testing.assert_close(pen.subgradient(x.detach()), grad, rtol=1e-12, atol=1e-15)
    assert pen.subgradient(torch.zeros(3, dtype=F64)).abs().max().item() == 0  # defined at 0: 0 ∈ [-1, 1]


def objective(pen, x: torch.Tensor, y: torch.Tensor, step: float) -> torch.Tensor:
    """½(x − y)² + step·R(x), elementwise over candidate x."""
    return 0.5 * (x - y) ** 2 + step * pen.eps * torch.log1p(x.abs() / pen.eps)


@pytest.mark.parametrize("eps", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("step", [1e-3, 0.01, 0.05, 0.3, 2.0])
def test_prox_equals_brute_force(eps: float, step: float) -> None:
    """Both the convex (step ≤ eps) and the nonconvex (step > eps, jump at the threshold) regimes."""
    pen = create_penalty(f"logsum:eps={eps}")
    ys = torch.linspace(-3, 3, 241, dtype=F64)
    prox = pen.prox(ys, step)
    # a grid over [min(0, y) − 0.1, max(0, y) + 0.1] for every y at once, then a finer one around the best
    lo, hi = ys.clamp(max=0) - 0.1, ys.clamp(min=0) + 0.1
    grid = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, 20001, dtype=F64)
    best = grid.gather(1, objective(pen, grid, ys[:, None], step).argmin(1, keepdim=True))
    fine = best + torch.linspace(-2e-4, 2e-4, 2001, dtype=F64)
    fine_vals = objective(pen, fine, ys[:, None], step)
    best_val, idx = fine_vals.min(1)
    best = fine.gather(1, idx[:, None]).squeeze(1)

    got_val = objective(pen, prox, ys, step)
    assert (got_val <= best_val + 1e-12).all(), (got_val - best_val).max()
    # away from the 0-vs-x* tie (where both are optimal) the minimiser itself matches
    clear = (objective(pen, torch.zeros_like(ys), ys, step) - best_val).abs() > 1e-9
    torch.testing.assert_close(prox[clear], best[clear], rtol=0, atol=1e-6)


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
