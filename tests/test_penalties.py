"""Penalties: contracts for every registered penalty, formulas, autograd, prox == brute force.

The autograd and brute-force checks are slimcli.testing's (check_penalty_autograd,
check_penalty_prox, brute_force_prox), the functions plugins run; here they get the
built-ins' known kinks, breakpoints and prox steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from slimcli.errors import UsageError
from slimcli.penalties import Penalty, create_penalty
from slimcli.registry import PENALTIES
from slimcli.testing import (
    PROX_ROWS,
    check_penalty,
    check_penalty_autograd,
    check_penalty_prox,
    elementwise_value,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")

# --- helpers -----------------------------------------------------------------------------


#: R of every element of ``x`` (separable penalties), through the penalty's own ``value``
elementwise = elementwise_value


def sample_points(dtype: torch.dtype = F64) -> Tensor:
    """0, tiny values, both signs, a wide range of magnitudes."""
    mags = [0.0, 1e-12, 1e-6, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.5, 0.99, 1.0, 1.7, 3.0, 10.0]
    return torch.tensor([s * m for m in mags for s in (1, -1)][1:], dtype=dtype)


# --- contract: every registered penalty, plugins included -----------------------------------

ALL_NAMES = PENALTIES.names()


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_every_registered_penalty(name: str, dtype: torch.dtype) -> None:
    check_penalty(name, dtypes=(dtype,))  # slimcli.testing: the checks plugins run too


def test_all_builtins_registered() -> None:
    assert {"none", "l1", "lp", "tl1", "mcp", "scad", "l1-l2"} <= set(ALL_NAMES)
    for name in ("lp", "tl1", "mcp", "scad", "l1-l2"):
        pen = create_penalty(name)
        assert pen.has_prox
        assert pen.subgradient(torch.zeros(3, dtype=F64)).abs().max().item() == 0  # 0 at 0
    assert create_penalty("l1-l2").separable is False


# --- independent formulas (reference.md "Penalties") ---------------------------------------


def sgn(v: float) -> float:
    return (v > 0) - (v < 0)


def ref_value_grad(name: str, o: dict, v: float) -> tuple[float, float]:
    """R(v) and the subgradient, written from the reference table with math only."""
    a = abs(v)
    if name == "l1":
        return a, sgn(v)
    if name == "lp":
        p, eps = o["p"], o["eps"]
        return a**p, (0.0 if v == 0 else p * sgn(v) / (a + eps) ** (1 - p))
    if name == "tl1":
        k = o["a"]
        return (k + 1) * a / (k + a), k * (k + 1) * sgn(v) / (k + a) ** 2
    if name == "mcp":
        k, th = o["a"], o["theta"]
        if a <= k * th:
            return a - v * v / (2 * k * th), sgn(v) - v / (k * th)
        return k * th / 2, 0.0
    if name == "scad":
        k, th = o["a"], o["theta"]
        if a <= th:
            return a, sgn(v)
        if a <= k * th:
            r = (2 * k * th * a - v * v - th * th) / (2 * (k - 1) * th)
            return r, (k * th * sgn(v) - v) / ((k - 1) * th)
        return th * (k + 1) / 2, 0.0
    raise AssertionError(name)


FORMULA_CASES = [
    ("l1", {}, 0.1),
    ("lp", {"p": 0.5, "eps": 1e-8}, 0.1),
    ("lp", {"p": 0.25, "eps": 0.0}, 0.1),
    ("lp", {"p": 0.75, "eps": 1e-3}, 0.1),
    ("tl1", {"a": 1.0}, 0.1),
    ("tl1", {"a": 0.5}, 0.1),
    ("mcp", {"a": 3.0, "theta": 0.2}, 0.1),
    ("mcp", {"a": 3.0, "theta": None}, 0.4),  # θ = λ
    ("mcp", {"a": 1.5, "theta": 1e-2}, 1e-4),
    ("scad", {"a": 3.7, "theta": 0.2}, 0.1),
    ("scad", {"a": 3.7, "theta": None}, 0.3),
    ("scad", {"a": 2.5, "theta": None}, 1e-4),
]


def make(name: str, opts: dict, lam: float) -> Penalty:
    spec = name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
    return create_penalty(spec, lam=lam)


@pytest.mark.parametrize(("name", "opts", "lam"), FORMULA_CASES, ids=lambda c: str(c))
def test_value_and_subgradient_match_reference_formulas(name: str, opts: dict, lam: float) -> None:
    pen = make(name, opts, lam)
    o = dict(opts)
    if o.get("theta", 0) is None:
        o["theta"] = lam
    th = o.get("theta", 1.0)
    k = o.get("a", 1.0)
    pts = [float(v) for v in sample_points()]
    for b in (th, k * th):  # both sides of every breakpoint
        pts += [s * b * f for s in (1, -1) for f in (1 - 1e-6, 1.0, 1 + 1e-6, 0.5, 2.0)]
    x = torch.tensor(pts, dtype=F64)
    want_r, want_g = zip(*(ref_value_grad(name, o, v) for v in pts), strict=True)
    torch.testing.assert_close(elementwise(pen, x), torch.tensor(want_r, dtype=F64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(pen.value(x), torch.tensor(want_r, dtype=F64).sum(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(pen.subgradient(x), torch.tensor(want_g, dtype=F64), rtol=1e-12, atol=1e-15)


def test_l1l2_value_and_subgradient_formula() -> None:
    x = torch.tensor([0.3, -1.2, 0.0, 2.0, -1e-12], dtype=F64)
    for alpha in (1.0, 0.4):
        pen = create_penalty(f"l1-l2:alpha={alpha}")
        n2 = math.sqrt(sum(v * v for v in x.tolist()))
        assert pen.value(x).item() == pytest.approx(sum(abs(v) for v in x.tolist()) - alpha * n2, rel=1e-14)
        want = [sgn(v) - alpha * v / n2 for v in x.tolist()]
        torch.testing.assert_close(pen.subgradient(x), torch.tensor(want, dtype=F64))
        assert pen.subgradient(torch.zeros(4, dtype=F64)).abs().max().item() == 0


@pytest.mark.parametrize("name", ["mcp", "scad"])
def test_theta_none_is_theta_lambda(name: str) -> None:
    lam = 0.07
    default, explicit = create_penalty(name, lam=lam), create_penalty(f"{name}:theta={lam}", lam=lam)
    assert default.theta is None and default.theta_value == lam
    x = torch.linspace(-1, 1, 401, dtype=F64)
    torch.testing.assert_close(default.value(x), explicit.value(x), rtol=0, atol=0)
    torch.testing.assert_close(default.subgradient(x), explicit.subgradient(x), rtol=0, atol=0)
    for step in (0.01, 0.1, 1.0):
        torch.testing.assert_close(default.prox(x, step), explicit.prox(x, step), rtol=0, atol=0)
    # a fixed θ does not follow λ; θ = λ does
    fixed = create_penalty(f"{name}:theta=0.01", lam=lam)
    assert fixed.theta_value == 0.01 and create_penalty(name, lam=1e-4).theta_value == 1e-4


def test_theta_lambda_reproduces_the_classical_unnormalised_penalties() -> None:
    """λ·R with θ = λ is MCP_{λ,a} / SCAD_{λ,a} itself, and its update the reference code's."""
    lam, a = 1e-2, 3.0
    x = torch.tensor([0.0, 1e-12, 0.004, -0.009, 0.011, 0.02, -0.029, 0.031, 0.5], dtype=F64)
    mcp = create_penalty(f"mcp:a={a}", lam=lam)
    inside = x.abs() <= a * lam
    classical = torch.where(inside, lam * x.abs() - x.square() / (2 * a), a * lam * lam / 2)
    torch.testing.assert_close(lam * elementwise(mcp, x), classical)
    reference_update = torch.where(inside, lam * torch.sign(x) - x / a, 0.0)
    torch.testing.assert_close(lam * mcp.subgradient(x), reference_update)

    a = 3.7
    scad = create_penalty(f"scad:a={a}", lam=lam)
    ax = x.abs()
    d = torch.where(ax <= lam, lam, torch.clamp(a * lam - ax, min=0) / (a - 1))  # Fan & Li's P'_λ
    torch.testing.assert_close(lam * scad.subgradient(x), torch.sign(x) * d)


# --- subgradient == autograd away from non-smooth points --------------------------------------

AUTOGRAD_CASES = [
    ("l1", set()),
    ("lp:p=0.5,eps=0", set()),
    ("lp:p=0.3", set()),  # default eps: relative difference (1−p)·eps/|x| < 1e-6 for |x| ≥ 1e-2
    ("lp:p=0.9", set()),
    ("tl1:a=0.5", set()),
    ("tl1:a=2", set()),
    ("mcp:theta=0.2", {0.6}),
    ("mcp:a=1.5", {0.45}),  # θ = λ = 0.3
    ("mcp:a=1", {0.3}),  # the authors' a = 1
    ("scad:theta=0.2", {0.2, 0.74}),
    ("scad:a=2.5", {0.3, 0.75}),
    ("scad:a=1.5", {0.3, 0.45}),
]


@pytest.mark.parametrize(("spec", "kinks"), AUTOGRAD_CASES, ids=[c[0] for c in AUTOGRAD_CASES])
def test_subgradient_is_autograd_of_value(spec: str, kinks: set[float]) -> None:
    # 2000 seeded points in (−3, 3), |x| > 1e-2, none within 1e-6 of a kink: every one must agree
    check_penalty_autograd(spec, lam=0.3, kinks=kinks, n=2000, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("spec", [c[0] for c in AUTOGRAD_CASES])
def test_subgradient_is_autograd_of_value_with_unknown_kinks(spec: str) -> None:
    """What check_penalty does for a plugin: kinks found by finite differences, not declared."""
    check_penalty_autograd(spec, lam=0.3)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_l1l2_subgradient_is_autograd(alpha: float) -> None:
    x = torch.tensor([0.5, -0.2, 1.3, -2.0, 0.01], dtype=F64)
    check_penalty_autograd(f"l1-l2:alpha={alpha}", lam=1e-4, points=x, kinks=(), rtol=1e-7, atol=1e-12)
    # and on random vectors, kinks unknown (what check_penalty does)
    check_penalty_autograd(f"l1-l2:alpha={alpha}", lam=1e-4)


# --- prox == brute-force minimisation ------------------------------------------------------


def lp_threshold(p: float, t: float) -> float:
    if p == 0.5:
        return 1.5 * t ** (2 / 3)  # reference.md half thresholding
    return (2 - p) / (2 - 2 * p) * (2 * t * (1 - p)) ** (1 / (2 - p))


def tl1_threshold(a: float, t: float) -> float:
    return t * (a + 1) / a if t <= a * a / (2 * (a + 1)) else math.sqrt(2 * t * (a + 1)) - a / 2


def breakpoints(pen: Penalty, t: float) -> list[float]:
    """|y| where the prox (or R) changes regime; the tests probe both sides of each."""
    if pen.name == "l1":
        return [t]
    if pen.name == "lp":
        return [lp_threshold(pen.p, t)]
    if pen.name == "tl1":
        return [tl1_threshold(pen.a, t)]
    th, a = pen.theta_value, pen.a
    if pen.name == "mcp":
        return [t, a * th, math.sqrt(a * th * t)]
    if pen.name == "scad":
        return [t, th, a * th, th + t, scad_switch(pen, t)]
    raise AssertionError(pen.name)


def scad_switch(pen: Penalty, t: float) -> float:
    """|y| where the SCAD prox jumps in the nonconvex case t ≥ (a−1)θ (docs/penalties.md)."""
    th, a = pen.theta_value, pen.a
    return (t + (a + 1) * th) / 2 if t < (a + 1) * th else math.sqrt((a + 1) * th * t)


def probe_y(pen: Penalty, t: float) -> Tensor:
    ys = [0.0, 1e-12, -1e-12, *torch.linspace(-4, 4, 41).tolist()]
    for b in breakpoints(pen, t):
        ys += [s * b * f for s in (1, -1) for f in (1 - 1e-3, 1 - 1e-9, 1.0, 1 + 1e-9, 1 + 1e-3)]
    return torch.tensor(ys, dtype=F64)


PROX_CASES = [
    ("l1", 0.1),
    ("lp:p=0.5", 0.1),
    ("lp:p=0.6666666666666666", 0.1),
    ("lp:p=0.25", 0.1),
    ("lp:p=0.75", 0.1),
    ("lp:p=0.9,eps=0", 0.1),
    ("tl1:a=1", 0.1),
    ("tl1:a=0.5", 0.1),
    ("tl1:a=4", 0.1),
    ("mcp", 0.4),  # θ = λ: aθ = 1.2
    ("mcp:a=2,theta=0.3", 0.1),  # aθ = 0.6
    ("mcp:a=1.5,theta=1", 0.1),
    ("mcp:a=1,theta=0.3", 0.1),  # the authors' a = 1
    ("mcp:a=0.5,theta=0.4", 0.1),  # aθ = 0.2: hard thresholding from step 0.2 on
    ("scad", 0.3),  # θ = λ: aθ = 1.11, (a−1)θ = 0.81
    ("scad:theta=0.2", 0.1),  # (a−1)θ = 0.54
    ("scad:a=2.5,theta=0.5", 0.1),  # (a−1)θ = 0.75
    ("scad:a=1.5,theta=0.4", 0.1),  # 1 < a ≤ 2: valid, (a−1)θ = 0.2
    ("scad:a=2,theta=0.3", 0.1),  # Fan & Li's excluded boundary
]


def steps_for(pen: Penalty) -> list[float]:
    steps = [1e-3, 0.05, 0.3, 1.2, 3.0]
    if pen.name == "mcp":
        steps.append(pen.a * pen.theta_value)  # boundary of the nonconvex (hard thresholding) case
    if pen.name == "scad":
        steps.append((pen.a - 1) * pen.theta_value)  # the quadratic piece turns linear
    return steps


@pytest.mark.parametrize(("spec", "lam"), PROX_CASES, ids=[c[0] for c in PROX_CASES])
def test_prox_matches_brute_force(spec: str, lam: float) -> None:
    """slimcli.testing.check_penalty_prox on both sides of every breakpoint, at every regime's steps.

    The brute force (slimcli.testing.brute_force_prox) searches x = s·y, s in [0, 2], and
    refines; the prox's objective must be within 1e-10·(1 + y²) of it, and where the
    minimiser is unique x itself within 1e-6·(1 + |y|).
    """
    pen = create_penalty(spec, lam=lam)
    for t in steps_for(pen):
        y = probe_y(pen, t)
        check_penalty_prox(pen, steps=(t,), ys=y, f_atol=1e-10, f_rtol=1e-10, x_tol=1e-6)
        x = pen.prox(y, t)
        assert (x * y >= 0).all() and (x.abs() <= y.abs()).all()  # shrinkage with sign kept


@pytest.mark.parametrize(("spec", "lam"), PROX_CASES, ids=[c[0] for c in PROX_CASES])
def test_prox_threshold_is_sharp(spec: str, lam: float) -> None:
    """Exact zeros strictly inside the threshold, nonzero just outside (sparsity of proximal slimming)."""
    pen = create_penalty(spec, lam=lam)
    for t in steps_for(pen):
        tau = breakpoints(pen, t)
        if pen.name == "mcp":
            b = pen.a * pen.theta_value
            tau = t if t < b else math.sqrt(b * t)
        elif pen.name == "scad":
            th, a = pen.theta_value, pen.a
            tau = t if t < (a + 1) * th else scad_switch(pen, t)
        else:
            tau = tau[0]
        inside = torch.tensor([0.0, 1e-12, tau * 0.5, tau * (1 - 1e-6)], dtype=F64)
        outside = torch.tensor([tau * (1 + 1e-6), tau * 1.01, tau * 2], dtype=F64)
        assert pen.prox(inside, t).abs().max().item() == 0
        assert pen.prox(-inside, t).abs().max().item() == 0
        assert (pen.prox(outside, t).abs() > 0).all()


def test_prox_nonconvex_cases_are_hard_thresholding() -> None:
    mcp = create_penalty("mcp:a=2,theta=0.3")  # aθ = 0.6 ≤ step: hard thresholding at √(aθ·step)
    y = torch.tensor([0.9, 0.95, 1.5, -2.0], dtype=F64)
    torch.testing.assert_close(mcp.prox(y, 1.5), torch.where(y.abs() > math.sqrt(0.9), y, 0.0))
    scad = create_penalty("scad:theta=0.2")
    y = torch.tensor([5.0, -4.0], dtype=F64)  # far out: identity in every regime
    for t in (0.1, 1.0, 3.0):
        torch.testing.assert_close(scad.prox(y, t), y)


@pytest.mark.parametrize(("theta", "a"), [(0.2, 3.7), (0.5, 2.5), (0.05, 3.0)])
def test_scad_prox_nonconvex_case_formula(theta: float, a: float) -> None:
    """t ≥ (a−1)θ: soft thresholding capped at θ below the switch y*, the identity above it."""
    pen = create_penalty(f"scad:a={a},theta={theta}")
    for t in ((a - 1) * theta * 1.01, a * theta, (a + 1) * theta * 0.99, (a + 1) * theta * 1.5, 5.0):
        ys = scad_switch(pen, t)
        y = torch.cat([torch.linspace(-4, 4, 801, dtype=F64),
                       torch.tensor([ys * (1 - 1e-6), ys * (1 + 1e-6)], dtype=F64)])
        y = y[(y.abs() - ys).abs() > 1e-9]
        soft = torch.sign(y) * torch.clamp(y.abs() - t, 0, theta)
        want = torch.where(y.abs() < ys, soft, y)
        torch.testing.assert_close(pen.prox(y, t), want, rtol=1e-12, atol=1e-12)


def test_scad_prox_convex_case_is_fan_li() -> None:
    """With step = θ (the classical setting) the prox is Fan & Li's thresholding rule."""
    th, a = 0.5, 3.7
    pen = create_penalty(f"scad:a={a},theta={th}")
    y = torch.linspace(-3, 3, 601, dtype=F64)
    ay = y.abs()
    want = torch.where(
        ay <= 2 * th,
        torch.sign(y) * torch.clamp(ay - th, min=0),
        torch.where(ay <= a * th, ((a - 1) * y - torch.sign(y) * a * th) / (a - 2), y),
    )
    torch.testing.assert_close(pen.prox(y, th), want)


@pytest.mark.parametrize("spec", ["lp:p=0.5", "lp:p=0.6666666666666666", "lp:p=0.3", "tl1", "mcp", "scad"])
def test_prox_float32_matches_float64(spec: str) -> None:
    pen = create_penalty(spec, lam=0.2)
    t = 0.3
    y = torch.linspace(-3, 3, 301, dtype=F64)
    keep = torch.stack([(y.abs() - b).abs() > 1e-2 for b in breakpoints(pen, t)]).all(0)
    y = y[keep]
    x64 = pen.prox(y, t)
    x32 = pen.prox(y.float(), t)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), x64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("a", [0.5, 1.0, 3.0])
def test_tl1_prox_just_above_the_threshold_is_accurate_relative_to_y(a: float) -> None:
    """Regression: |x| = u − a cancelled to an error ~eps·a, so small y (γ ≪ a) near the
    threshold came out with the wrong sign in float64 and up to 10 % of |y| off in float32."""
    pen = create_penalty(f"tl1:a={a}")
    c = a * (a + 1)
    for t in (1e-8, 1e-6, 1e-5, 1e-3):
        y = tl1_threshold(a, t) * (1 + torch.logspace(-9, 1, 200, dtype=F64))
        y = torch.cat([y, -y])
        x = pen.prox(y, t)
        assert (x * y >= 0).all() and (x.abs() <= y.abs()).all()
        # stationarity of ½(x−y)² + t·R on the nonzero branch: |x| = |y| − t·a(a+1)/(a+|x|)²
        resid = x.abs() - (y.abs() - t * c / (a + x.abs()).square())
        rel = resid.abs() / y.abs()
        assert (rel <= 1e-13).all(), f"t={t}: max residual/|y| {rel.max()}"
        x32 = pen.prox(y.float(), t).double()
        assert (x32 * y >= 0).all()
        rel32 = (x32 - x).abs() / y.abs()
        assert (rel32 <= 2e-6).all(), f"t={t}: float32 off by {rel32.max()} of |y|"


def test_lp_closed_forms_agree_with_the_newton_solve() -> None:
    """p = ½ and ⅔ closed forms vs the generic Newton solve at the same p."""
    from slimcli.penalties.lp import _newton

    y = torch.linspace(0.5, 6, 200, dtype=F64)
    for p, spec in ((0.5, "lp:p=0.5"), (2 / 3, "lp:p=0.6666666666666666")):
        pen = create_penalty(spec)
        t = 0.4
        tau, x_tau = pen.threshold(t)
        yy = y[y > tau]
        torch.testing.assert_close(pen.prox(yy, t), _newton(yy, t, p, x_tau), rtol=1e-12, atol=1e-12)


def test_prox_with_zero_step_is_identity_and_negative_step_is_rejected() -> None:
    y = torch.tensor([0.0, 1e-3, -2.0], dtype=F64)
    for name in ("lp", "tl1", "mcp", "scad", "l1-l2"):
        pen = create_penalty(name, lam=0.1)
        torch.testing.assert_close(pen.prox(y, 0.0), y)
        with pytest.raises(ValueError, match="step"):
            pen.prox(y, -1.0)


def test_mcp_scad_with_lambda_zero_do_nothing() -> None:
    y = torch.tensor([0.0, 0.5, -2.0], dtype=F64)
    for name in ("mcp", "scad"):
        pen = create_penalty(name, lam=0.0)
        assert pen.is_zero
        assert pen.value(y).item() == 0 and pen.subgradient(y).abs().max().item() == 0
        torch.testing.assert_close(pen.prox(y, 0.1), y)


# --- l1-l2 prox: brute force in 2-D and 3-D --------------------------------------------------


def l1l2_objective(x: Tensor, y: Tensor, t: float, alpha: float) -> Tensor:
    """½‖x − y‖² + t(‖x‖₁ − α‖x‖₂) for a batch of rows x."""
    r = x.abs().sum(-1) - alpha * torch.linalg.vector_norm(x, dim=-1)
    return 0.5 * (x - y).square().sum(-1) + t * r


Y2 = torch.tensor(PROX_ROWS, dtype=F64)  # zero, tiny, 1-sparse, tied and dense 2-vectors


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.2])
def test_l1l2_prox_matches_brute_force_2d(alpha: float) -> None:
    """check_penalty_prox's 2-D brute force: a 121² grid over [−2.2, 2.2]² shared by every y, two
    local refinements; the prox's objective within 1e-10 of it, x within 12 grid steps where
    the minimiser is unique."""
    check_penalty_prox(f"l1-l2:alpha={alpha}", lam=1e-4, steps=(0.1, 0.4, 1.0), ys=Y2,
                       f_atol=1e-10, f_rtol=0, bound=2.2)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_l1l2_prox_matches_random_search_3d(alpha: float) -> None:
    """Random search plus a shrinking local search, all y at once; the closed form must do as well."""
    pen = create_penalty(f"l1-l2:alpha={alpha}")
    gen = torch.Generator().manual_seed(1)
    ys = torch.tensor(
        [(0.2, -0.1, 0.05), (1.2, 0.4, -0.8), (0.5, 0.5, 0.1), (0.0, 0.0, 0.0), (3.0, -0.05, 0.0)], dtype=F64
    )
    ys = torch.cat([ys, torch.randn(5, 3, generator=gen, dtype=F64)])
    rows = torch.arange(len(ys))
    for t in (0.1, 0.6, 2.0):
        x = torch.stack([pen.prox(y, t) for y in ys])
        f = l1l2_objective(x, ys, t, alpha)
        b = float(ys.abs().max()) + 0.2
        cand = (torch.rand(len(ys), 5000, 3, generator=gen, dtype=F64) * 2 - 1) * b
        # every 1-sparse and 0 pattern at y's coordinates, so sparse optima are reachable
        cand = torch.cat([cand, torch.zeros(len(ys), 1, 3, dtype=F64), torch.diag_embed(ys)], 1)
        fc = l1l2_objective(cand, ys[:, None], t, alpha)
        fb, idx = fc.min(1)
        best, scale = cand[rows, idx], b / 10
        for _ in range(30):
            trial = best[:, None] + torch.randn(len(ys), 300, 3, generator=gen, dtype=F64) * scale
            trial = torch.cat([trial, trial * (torch.rand(len(ys), 300, 3, generator=gen) > 0.5)], 1)
            ft = l1l2_objective(trial, ys[:, None], t, alpha)
            ftmin, it = ft.min(1)
            best = torch.where((ftmin < fb)[:, None], trial[rows, it], best)
            fb, scale = torch.minimum(fb, ftmin), scale * 0.7
        assert (f <= fb + 1e-10).all(), (alpha, t, ys[f > fb + 1e-10], x[f > fb + 1e-10])


def test_l1l2_prox_regimes() -> None:
    """‖y‖∞ > t: dense; (1−α)t < ‖y‖∞ ≤ t: 1-sparse on the largest entry; below: zero."""
    t = 1.0
    y = torch.tensor([0.2, -0.9, 0.5], dtype=F64)
    x = create_penalty("l1-l2").prox(y, t)  # α = 1: keep the largest entry as it is
    torch.testing.assert_close(x, torch.tensor([0.0, -0.9, 0.0], dtype=F64))
    x = create_penalty("l1-l2:alpha=0.5").prox(y, t)
    torch.testing.assert_close(x, torch.tensor([0.0, -0.4, 0.0], dtype=F64))
    assert create_penalty("l1-l2:alpha=0.05").prox(y, t).abs().max().item() == 0  # 0.9 ≤ 0.95
    y = torch.tensor([1.5, -1.2, 0.3], dtype=F64)
    z = torch.tensor([0.5, -0.2, 0.0], dtype=F64)
    want = z * (1 + t / torch.linalg.vector_norm(z))
    torch.testing.assert_close(create_penalty("l1-l2").prox(y, t), want)
    tie = create_penalty("l1-l2").prox(torch.tensor([0.5, -0.5], dtype=F64), t)  # two minimisers
    assert sorted(tie.abs().tolist()) == [0.0, 0.5]


def test_l1l2_is_per_layer() -> None:
    """Non-separable: prox_many/value_many treat each layer's vector on its own."""
    pen = create_penalty("l1-l2", lam=0.1)
    a = torch.tensor([0.3, -0.2, 1.0], dtype=F64)
    b = torch.tensor([[0.05, 0.8]], dtype=F64)
    out = pen.prox_many([a, b], 0.4)
    assert out is not None
    torch.testing.assert_close(out[0], pen.prox(a, 0.4))
    torch.testing.assert_close(out[1], pen.prox(b.reshape(-1), 0.4).view_as(b))
    torch.testing.assert_close(pen.value_many([a, b]), pen.value(a) + pen.value(b.reshape(-1)))
    assert not torch.allclose(pen.value_many([a, b]), pen.value(torch.cat([a, b.reshape(-1)])))


# --- options ----------------------------------------------------------------------------------

INVALID = [
    ("lp:p=1.5", "0 < p < 1"),
    ("lp:p=0", "0 < p < 1"),
    ("lp:p=1", "0 < p < 1"),
    ("lp:eps=-1e-3", "eps >= 0"),
    ("tl1:a=-1", "a > 0"),
    ("tl1:a=0", "a > 0"),
    ("tl1:a=inf", "a > 0"),
    ("mcp:a=0", "a > 0"),
    ("mcp:a=-1", "a > 0"),
    ("mcp:theta=0", "theta > 0"),
    ("mcp:theta=-0.1", "theta > 0"),
    ("scad:a=1", "a > 1"),
    ("scad:a=0.5", "a > 1"),
    ("scad:theta=-1", "theta > 0"),
    ("l1-l2:alpha=0", "0 < alpha <= 1"),
    ("l1-l2:alpha=1.5", "0 < alpha <= 1"),
    ("lp:p=abc", "must be a number"),
]


@pytest.mark.parametrize(("spec", "rule"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_options_name_the_valid_range(spec: str, rule: str) -> None:
    with pytest.raises(UsageError, match=rule):
        create_penalty(spec)


def test_unknown_option_key_lists_valid_options() -> None:
    with pytest.raises(UsageError) as info:
        create_penalty("lp:pp=0.5")
    msg = str(info.value)
    assert "unknown option 'pp'" in msg and "Did you mean 'p'" in msg and "eps" in msg
    with pytest.raises(UsageError, match="takes no options"):
        create_penalty("l1:a=1")
    with pytest.raises(UsageError, match="Did you mean 'scad'"):
        create_penalty("scda")


def test_valid_specs_and_defaults() -> None:
    lp = create_penalty("lp")
    assert (lp.p, lp.eps) == (0.5, 1e-8)
    assert create_penalty("tl1").a == 1.0
    mcp = create_penalty("mcp:theta=none")
    assert (mcp.a, mcp.theta) == (3.0, None)
    assert create_penalty("scad").a == 3.7
    assert create_penalty("l1-l2").alpha == 1.0
    assert PENALTIES.parse(create_penalty("mcp:a=2,theta=0.01").spec).options == {"a": 2.0, "theta": 0.01}
    assert create_penalty("lp:p=0.5").spec == "lp"


def test_listing_shows_every_penalty_with_its_rules() -> None:
    """What ``slim list penalties`` prints: each built-in's options with their valid ranges."""
    rules = {info.name: {o["name"]: o["rule"] for o in info.as_dict()["options"]} for info in PENALTIES}
    assert rules["lp"] == {"p": "0 < p < 1", "eps": "eps >= 0"}
    assert rules["tl1"] == {"a": "a > 0"}
    assert rules["mcp"]["a"] == "a > 0" and rules["scad"]["a"] == "a > 1"
    assert rules["mcp"]["theta"] == rules["scad"]["theta"] == "theta > 0, or none (= lam)"
    assert rules["l1-l2"] == {"alpha": "0 < alpha <= 1"}
    assert all(PENALTIES.get(n).description for n in ("lp", "tl1", "mcp", "scad", "l1-l2"))
