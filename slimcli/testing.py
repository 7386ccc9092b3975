"""Contract checks for plugins: the checks slim's own test suite runs on every penalty, arch and dataset.

Call them from a plugin's tests, one line each::

    from slimcli.testing import check_arch, check_dataset, check_penalty

    def test_contract():
        check_penalty("logsum")            # a spec string, or the registered class
        check_arch("tinycnn:width=8")      # forward, fx trace, ONNX, pruning, init, stem, strict reload
        check_dataset("stripes:n=64")      # attributes, both splits, split validation

Each check raises :class:`AssertionError` saying what broke (and works under ``python -O``:
it does not rely on ``assert`` statements). The arch checks are also available one by one
(:func:`check_arch_forward`, …, :func:`check_arch_prune`) for finer-grained test reports;
so are the penalty's numerical checks (:func:`check_penalty_autograd`,
:func:`check_penalty_prox`, with :func:`brute_force_prox`), which take known kinks, probe
points and tolerances where a plugin's author knows more. Nothing here needs pytest.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from slimcli.archs import create_arch
from slimcli.data import Dataset, create_dataset
from slimcli.errors import UsageError
from slimcli.measure import count_params
from slimcli.penalties import Penalty, create_penalty
from slimcli.prune import apply_widths, compute_keep, masked_dense, prunable_bns, prune_model
from slimcli.registry import ARCHS, DATASETS, PENALTIES, Registry

#: |x| at which penalties are probed (each with both signs): 0, tiny values, a wide range of magnitudes.
PENALTY_MAGNITUDES = (
    0.0, 1e-12, 1e-9, 1e-6, 1e-4, 1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 0.99, 1.0, 1.7, 2.5, 3.0, 10.0,
)  # fmt: skip
#: prox steps the penalty contract tries
PROX_STEPS = (1e-3, 0.1, 1.0)
#: input shapes the arch contract builds for: CIFAR-like and (Fashion-)MNIST-like
ARCH_SHAPES: tuple[tuple[int, int, int], ...] = ((3, 32, 32), (1, 28, 28))
_CLASSES = 7  # an unusual class count, so nothing can hard-code 10


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread inside, the previous count restored after.

    The numerical checks work on tensors of a few 10⁵ elements at most; threads only slow them
    down, and on a busy 2-core machine two spin-waiting OpenMP threads made one brute-force
    prox take 1.9 s instead of 0.03 s.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _spec(registry: Registry, cls_or_spec: str | type) -> str:
    """A spec string, or the registered name of a plugin class (its cheap ``test_spec`` if it has one)."""
    if isinstance(cls_or_spec, str):
        return cls_or_spec
    name = getattr(cls_or_spec, "name", None)
    _expect(
        isinstance(name, str) and name in registry and registry.get(name).cls is cls_or_spec,
        f"{cls_or_spec.__name__} is not a registered {registry.kind}; "
        f"decorate it with @register_{registry.kind}",
    )
    return str(getattr(cls_or_spec, "test_spec", name))


# --------------------------------------------------------------------------------------
# penalties
# --------------------------------------------------------------------------------------
def penalty_points(dtype: torch.dtype = torch.float64) -> Tensor:
    """The probe vector of :func:`check_penalty`: :data:`PENALTY_MAGNITUDES` with both signs (one 0)."""
    return torch.tensor([s * m for m in PENALTY_MAGNITUDES for s in (1, -1)][1:], dtype=dtype)


def check_penalty(
    cls_or_spec: str | type[Penalty],
    *,
    lam: float = 0.05,
    dtypes: Iterable[torch.dtype] = (torch.float32, torch.float64),
) -> None:
    """The penalty contract, in every dtype of ``dtypes``.

    ``value`` is a finite 0-dim tensor of the input's dtype, R(0) = 0 and R is even; the
    subgradient keeps shape, dtype and device, is finite (also at 0) and odd; ``prox`` (where
    there is one: otherwise ``has_prox`` must be false) keeps shape and dtype, is finite,
    maps 0 to 0 and is odd for a separable penalty; the spec string round-trips.

    When ``dtypes`` includes float64, the numerical checks run too (in float64, once):
    :func:`check_penalty_autograd` (the subgradient is autograd of ``value`` wherever R is
    differentiable) and, for a penalty with a prox, :func:`check_penalty_prox` (``prox``
    minimises ½‖x − y‖² + step·R(x) as well as a brute-force search does).
    """
    spec = _spec(PENALTIES, cls_or_spec)
    dtypes = tuple(dtypes)
    for dtype in dtypes:
        _check_penalty_in(spec, lam, dtype)
    if torch.float64 in dtypes:
        check_penalty_autograd(spec, lam=lam)
        if create_penalty(spec, lam=lam).has_prox:
            check_penalty_prox(spec, lam=lam)


def _check_penalty_in(spec: str, lam: float, dtype: torch.dtype) -> None:
    pen = create_penalty(spec, lam=lam)
    where = f"penalty {spec} ({dtype})"
    x = penalty_points(dtype)
    v = pen.value(x)
    _expect(isinstance(v, Tensor) and v.dim() == 0, f"{where}: value() must return a 0-dim tensor")
    _expect(v.dtype == dtype, f"{where}: value() returned {v.dtype}")
    _expect(bool(torch.isfinite(v)), f"{where}: value() is not finite")
    zero = pen.value(torch.zeros(5, dtype=dtype)).item()
    _expect(zero == 0, f"{where}: R(0) must be 0, got {zero}")
    torch.testing.assert_close(pen.value(-x), v, msg=lambda m: f"{where}: R must be even. {m}")
    # x is symmetric, so an odd part of R cancels in the sum above; one sign alone shows it
    pos = x[x > 0]
    torch.testing.assert_close(pen.value(-pos), pen.value(pos), msg=lambda m: f"{where}: R must be even. {m}")

    g = pen.subgradient(x)
    _expect(
        g.shape == x.shape and g.dtype == dtype and g.device == x.device,
        f"{where}: subgradient() must keep shape, dtype and device, "
        f"got {tuple(g.shape)} {g.dtype} {g.device}",
    )
    _expect(bool(torch.isfinite(g).all()), f"{where}: subgradient() is not finite")
    at_zero = pen.subgradient(torch.zeros(3, dtype=dtype))
    _expect(bool(torch.isfinite(at_zero).all()), f"{where}: subgradient(0) must be defined (finite)")
    torch.testing.assert_close(
        pen.subgradient(-x), -g, msg=lambda m: f"{where}: subgradient must be odd. {m}"
    )

    for step in PROX_STEPS:
        p = pen.prox(x, step)
        if p is None:
            _expect(not pen.has_prox, f"{where}: prox() returned None but has_prox is true")
            continue
        _expect(
            p.shape == x.shape and p.dtype == dtype,
            f"{where}: prox(step={step}) must keep shape and dtype, got {tuple(p.shape)} {p.dtype}",
        )
        _expect(bool(torch.isfinite(p).all()), f"{where}: prox(step={step}) is not finite")
        z = pen.prox(torch.zeros(4, dtype=dtype), step).abs().max().item()
        _expect(z == 0, f"{where}: prox(0, step={step}) must be 0, got {z}")
        if pen.separable:
            torch.testing.assert_close(
                pen.prox(-x, step), -p, msg=lambda m, s=step: f"{where}: prox(step={s}) must be odd. {m}"
            )
    again = PENALTIES.parse(pen.spec).options
    _expect(again == PENALTIES.parse(spec).options,
            f"{where}: spec {pen.spec!r} does not round-trip ({again})")


F64 = torch.float64
#: the non-separable probe of :func:`check_penalty_prox`: 2-vectors (zero, tiny, sparse, tied, dense)
PROX_ROWS = (
    (0.0, 0.0), (1e-12, 0.0), (0.3, 0.1), (0.3, 0.3), (-0.2, 0.05), (1.5, -0.7), (2.0, 0.2),
    (0.5, 0.49), (0.08, -0.02), (1.0, 1.0), (-0.9, 0.0), (0.61, 0.6),
)  # fmt: skip


def _penalty(cls_or_spec: str | type[Penalty] | Penalty, lam: float) -> tuple[Penalty, str]:
    if isinstance(cls_or_spec, Penalty):
        return cls_or_spec, cls_or_spec.spec
    spec = _spec(PENALTIES, cls_or_spec)
    return create_penalty(spec, lam=lam), spec


def elementwise_value(pen: Penalty, x: Tensor) -> Tensor:
    """R of every element of ``x`` (a separable penalty), through the penalty's own ``value``.

    Uses :func:`torch.vmap`; a ``value`` that cannot be vmapped is called element by element.
    """
    flat = x.reshape(-1)
    try:
        out = torch.vmap(lambda v: pen.value(v.unsqueeze(0)))(flat)
    except Exception:
        out = torch.stack([pen.value(v.unsqueeze(0)) for v in flat]) if len(flat) else flat.clone()
    return out.view_as(x)


def _row_values(pen: Penalty, rows: Tensor) -> Tensor:
    """``value`` of every row of ``rows`` (…, d): a non-separable penalty, one vector per row."""
    flat = rows.reshape(-1, rows.shape[-1])
    try:
        out = torch.vmap(pen.value)(flat)
    except Exception:
        out = torch.stack([pen.value(v) for v in flat])
    return out.view(rows.shape[:-1])


@single_thread()
def check_penalty_autograd(
    cls_or_spec: str | type[Penalty] | Penalty,
    *,
    lam: float = 0.05,
    points: Tensor | None = None,
    kinks: Iterable[float] | None = None,
    n: int = 2000,
    seed: int = 0,
    rtol: float = 1e-6,
    atol: float = 1e-12,
) -> None:
    """``subgradient`` equals autograd of ``value`` (float64) wherever R is differentiable.

    The points are ``points`` as given, or else ``n`` seeded random values uniform in
    (−3, 3) with |x| > 10⁻² (away from 0, R's kink, and from smoothing near it such as lp's
    ``eps``); a non-separable penalty is probed on vectors: ``points`` is then one vector or a
    batch of rows, and the random probe is ``n // 20`` vectors of length 5.

    Where R is not differentiable is decided by one of two rules:

    * ``kinks`` given (the |x| where R has a kink, e.g. ``{0.6}`` for MCP with aθ = 0.6): the
      points within 10⁻⁶ of ±kink are dropped (for vectors: a vector with any such entry),
      and the subgradient must match autograd at every other point.
    * ``kinks`` None (unknown, the default, what :func:`check_penalty` does): a point is
      skipped where autograd is not finite, or where it disagrees with a central finite
      difference of ``value`` (step h = 10⁻⁶·max(|x|, 10⁻²), |fd − autograd| > 10⁻⁴·(1 +
      |autograd|)): R has a kink or jump within h of it. At most 5 % of the points may be
      skipped; more means ``value`` is not differentiable by autograd (a ``value`` computed
      outside autograd counts as derivative 0, right only for a constant R).

    The comparison is ``torch.testing.assert_close(subgradient, autograd, rtol, atol)``.
    """
    pen, spec = _penalty(cls_or_spec, lam)
    where = f"penalty {spec}"
    separable = pen.separable
    if points is None:
        g = torch.Generator().manual_seed(seed)
        size = (n,) if separable else (max(n // 20, 1), 5)
        x = torch.rand(size, generator=g, dtype=F64) * 6 - 3
        x = x[x.abs() > 1e-2] if separable else x[(x.abs() > 1e-2).all(-1)]
    else:
        x = torch.as_tensor(points, dtype=F64).detach().clone()
        if not separable and x.dim() == 1:
            x = x.unsqueeze(0)
    if not separable:
        x = x.reshape(-1, x.shape[-1])
    if kinks is not None:
        kinks = tuple(float(k) for k in kinks)
        away = torch.ones_like(x, dtype=torch.bool)
        for k in kinks:
            away &= (x.abs() - k).abs() > 1e-6
        x = x[away] if separable else x[away.all(-1)]

    auto = _autograd_of_value(pen, x)
    sub = pen.subgradient(x) if separable else torch.stack([pen.subgradient(v) for v in x])
    _expect(sub.shape == x.shape, f"{where}: subgradient() changed the shape {tuple(x.shape)}")
    if kinks is None:
        smooth = torch.isfinite(auto) & _agrees_with_finite_differences(pen, x, auto)
        if not separable:
            smooth = smooth.all(-1, keepdim=True).expand_as(x)
        skipped = int((~smooth).sum())
        _expect(skipped <= 0.05 * smooth.numel(),
                f"{where}: autograd of value() is not finite or disagrees with finite differences of "
                f"value() at {skipped} of {smooth.numel()} points (e.g. x = {x[~smooth][:3].tolist()}): "
                f"value() must be differentiable by autograd almost everywhere")
        x, auto, sub = x[smooth], auto[smooth], sub[smooth]
    torch.testing.assert_close(
        sub, auto, rtol=rtol, atol=atol,
        msg=lambda m: f"{where}: subgradient() is not the autograd derivative of value() "
                      f"where R is differentiable. {m}",
    )


def _autograd_of_value(pen: Penalty, x: Tensor) -> Tensor:
    """d value / dx per element (separable: one call; rows: one call per row)."""
    def grad(v: Tensor) -> Tensor:
        v = v.detach().clone().requires_grad_(True)
        out = pen.value(v)
        if not out.requires_grad:  # computed outside autograd: derivative 0 (finite differences decide)
            return torch.zeros_like(v)
        (d,) = torch.autograd.grad(out, v, allow_unused=True)
        return torch.zeros_like(v) if d is None else d

    with torch.enable_grad():
        return grad(x) if pen.separable else torch.stack([grad(v) for v in x]) if len(x) else x.clone()


def _agrees_with_finite_differences(pen: Penalty, x: Tensor, auto: Tensor) -> Tensor:
    h = 1e-6 * x.abs().clamp(min=1e-2)
    if pen.separable:
        fd = (elementwise_value(pen, x + h) - elementwise_value(pen, x - h)) / (2 * h)
    else:
        eye = torch.eye(x.shape[-1], dtype=x.dtype)  # perturb one coordinate of each row at a time
        step = h[:, None, :] * eye  # (rows, d, d)
        up, down = _row_values(pen, x[:, None, :] + step), _row_values(pen, x[:, None, :] - step)
        fd = (up - down) / (2 * h)
    return (fd - auto).abs() <= 1e-4 * (1 + auto.abs())


class BruteForce(NamedTuple):
    """A brute-force minimiser of ½‖x − y‖² + step·R(x) (see :func:`brute_force_prox`)."""

    x: Tensor  #: the best point found, per problem
    objective: Tensor  #: its objective: an upper bound on (and very close to) the minimum
    unique: Tensor  #: the minimiser is unique (only there may x be compared, not just the objective)
    spacing: Tensor  #: the coarse grid's spacing, per problem (x is accurate to far better)


@single_thread()
def brute_force_prox(
    pen: Penalty, y: Tensor, step: float, *, n: int | None = None, bound: float | None = None
) -> BruteForce:
    """argmin_x ½‖x − y‖² + step·R(x) by grid search, for comparison with ``pen.prox``.

    Separable R: ``y`` is a vector of independent 1-D problems. R ≥ 0 and R(0) = 0 put the
    minimiser within |x − y| ≤ |y| (x = 0 already scores ½y²), so x = s·y is searched on a
    grid of ``n`` (2001) values of s in [0, 2]; each of the three best coarse local minima
    is refined three times (401 points over ±2 grid steps each time, so the best point is
    within 10⁻⁹·|y| of a local minimiser) and the best kept. The minimiser counts as unique
    when the coarse grid points within (spacing² + 10⁻¹²(1 + y²)) of the minimum span at
    most 50 grid steps:
    where R is concave on x > 0 (every built-in) the neighbours of a minimiser lie within
    spacing² of it, so a wider set means several (near-)minimisers, where only the objective
    can be compared.

    Non-separable R: ``y`` holds one 2-vector per row. The grid is ``n`` (121) points per axis
    over [−bound, bound]² (default 2·max‖y‖, which holds every minimiser by the same
    argument), shared by all rows, then two local refinements of 41² points over ±2 steps.
    The minimiser counts as unique when the grid points within 8h(bound + step + 1) of the
    minimum lie within 10 grid steps h of the best point.

    R must be ≥ 0 on the grid (an :class:`AssertionError` says otherwise).
    """
    y = torch.as_tensor(y, dtype=F64)
    if pen.separable:
        return _brute_1d(pen, y, step, 2001 if n is None else n)
    if y.dim() != 2 or y.shape[-1] != 2:
        raise ValueError(f"a non-separable penalty is brute-forced on 2-vectors: y of shape (rows, 2), "
                         f"got {tuple(y.shape)}")
    if bound is None:
        bound = max(2 * float(torch.linalg.vector_norm(y, dim=-1).max()), 1e-3)
    return _brute_2d(pen, y, step, 121 if n is None else n, float(bound))


def _nonnegative(pen: Penalty, r: Tensor, x: Tensor) -> None:
    bad = r < -1e-12 * (1 + x.square())
    if bool(bad.any()):
        raise AssertionError(f"penalty {pen.spec}: R must be >= 0 (the brute-force prox check relies on it); "
                             f"R({x[bad][:3].tolist()}) = {r[bad][:3].tolist()}")


def _brute_1d(pen: Penalty, y: Tensor, t: float, n: int) -> BruteForce:
    def objective(s: Tensor) -> Tensor:
        x = y[:, None] * s
        r = elementwise_value(pen, x)
        _nonnegative(pen, r, x)
        return 0.5 * (x - y[:, None]).square() + t * r

    rows = torch.arange(len(y))
    s = torch.linspace(0, 2, n, dtype=F64).expand(len(y), n)
    f = objective(s)
    fmin, idx = f.min(1)
    h0 = 2 / (n - 1)
    # the three best coarse local minima (the global one among them), each refined twice
    inf = torch.full_like(f[:, :1], math.inf)
    left, right = torch.cat([inf, f[:, :-1]], 1), torch.cat([f[:, 1:], inf], 1)
    local = torch.where((f <= left) & (f <= right), f, math.inf)
    starts = torch.cat([idx[:, None], local.topk(min(3, n), dim=1, largest=False).indices], 1)
    best = s[rows, idx]
    for c in range(starts.shape[1]):
        cand, fc, h = s[rows, starts[:, c]], f[rows, starts[:, c]], h0
        for _ in range(3):
            lo, hi = torch.clamp(cand - 2 * h, 0, 2), torch.clamp(cand + 2 * h, 0, 2)
            s2 = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, 401, dtype=F64)
            f2 = objective(s2)
            f2min, idx2 = f2.min(1)
            better = f2min < fc
            cand = torch.where(better, s2[rows, idx2], cand)
            fc = torch.minimum(fc, f2min)
            h = 4 * h / 400
        improved = fc < fmin
        best = torch.where(improved, cand, best)
        fmin = torch.minimum(fmin, fc)
    spacing = y.abs() * h0
    delta = spacing.square() + 1e-12 * (1 + y.square())
    near = f <= fmin[:, None] + delta[:, None]
    x = y[:, None] * s
    lo_x = torch.where(near, x, math.inf).min(1).values
    hi_x = torch.where(near, x, -math.inf).max(1).values
    unique = (hi_x - lo_x) <= 50 * spacing
    return BruteForce(y * best, fmin, unique, spacing)


def _brute_2d(pen: Penalty, y: Tensor, t: float, n: int, b: float) -> BruteForce:
    def objective(x: Tensor, yy: Tensor) -> Tensor:
        r = _row_values(pen, x)
        _nonnegative(pen, r, x.abs().sum(-1))
        return 0.5 * (x - yy).square().sum(-1) + t * r

    g = torch.linspace(-b, b, n, dtype=F64)
    grid = torch.cartesian_prod(g, g)
    h = 2 * b / (n - 1)
    rows = torch.arange(len(y))
    fg = objective(grid[None].expand(len(y), -1, -1), y[:, None])
    fb, idx = fg.min(1)
    best, hh = grid[idx], h
    for _ in range(2):
        fine = torch.linspace(-2 * hh, 2 * hh, 41, dtype=F64)
        local = best[:, None] + torch.cartesian_prod(fine, fine)[None]
        fl = objective(local, y[:, None])
        flmin, il = fl.min(1)
        best = torch.where((flmin < fb)[:, None], local[rows, il], best)
        fb, hh = torch.minimum(fb, flmin), 4 * hh / 40
    unique = torch.stack([
        (grid[fg[i] <= fb[i] + 8 * h * (b + t + 1)] - best[i]).abs().max() <= 10 * h for i in range(len(y))
    ]) if len(y) else torch.zeros(0, dtype=torch.bool)
    return BruteForce(best, fb, unique, torch.full((len(y),), h, dtype=F64))


@single_thread()
def check_penalty_prox(
    cls_or_spec: str | type[Penalty] | Penalty,
    *,
    lam: float = 0.05,
    steps: Iterable[float] = PROX_STEPS,
    ys: Tensor | None = None,
    f_atol: float = 1e-10,
    f_rtol: float = 1e-10,
    x_tol: float = 1e-6,
    bound: float | None = None,
) -> None:
    """``prox(y, step)`` minimises ½‖x − y‖² + step·R(x) as well as :func:`brute_force_prox` (float64).

    For every step of ``steps`` and every probe y: the prox keeps shape and dtype, its
    objective is at most the brute-force minimum + ``f_atol`` + ``f_rtol``·‖y‖², and where the
    minimiser is unique it is the brute-force point: within ``x_tol``·(1 + |y|) for a
    separable R, within 12 grid steps for a non-separable one. The probe ``ys`` defaults to
    :func:`penalty_points` and 41 values in [−4, 4] (separable), or :data:`PROX_ROWS`, one
    2-vector a row, each passed to ``prox`` alone (non-separable); ``bound`` is the
    non-separable grid's half-width (see :func:`brute_force_prox`).
    """
    pen, spec = _penalty(cls_or_spec, lam)
    _expect(pen.has_prox, f"penalty {spec} has no prox to check")
    if ys is None:
        ys = (torch.cat([penalty_points(F64), torch.linspace(-4, 4, 41, dtype=F64)]) if pen.separable
              else torch.tensor(PROX_ROWS, dtype=F64))
    y = torch.as_tensor(ys, dtype=F64)
    for t in steps:
        where = f"penalty {spec}, prox(step={t})"
        x = pen.prox(y, t) if pen.separable else torch.stack([pen.prox(v, t) for v in y])  # type: ignore[misc]
        _expect(isinstance(x, Tensor) and x.dtype == F64 and x.shape == y.shape,
                f"{where} must keep shape and dtype {tuple(y.shape)} float64")
        brute = brute_force_prox(pen, y, t, bound=bound)
        if pen.separable:
            f = 0.5 * (x - y).square() + t * elementwise_value(pen, x)
            y2 = y.square()
        else:
            f = 0.5 * (x - y).square().sum(-1) + t * _row_values(pen, x)
            y2 = y.square().sum(-1)
        bad = ~(f <= brute.objective + f_atol + f_rtol * y2)
        _expect(not bool(bad.any()),
                f"{where}: objective above brute force at y={y[bad].tolist()[:5]}: prox gives "
                f"{f[bad].tolist()[:5]}, brute force {brute.objective[bad].tolist()[:5]}")
        if pen.separable:
            far = brute.unique & ~((x - brute.x).abs() <= x_tol * (1 + y.abs()))
        else:
            far = brute.unique & ~((x - brute.x).abs().amax(-1) <= 12 * brute.spacing)
        _expect(not bool(far.any()),
                f"{where}: x differs from the (unique) brute-force minimiser at y={y[far].tolist()[:5]}: "
                f"{x[far].tolist()[:5]} vs {brute.x[far].tolist()[:5]}")


# --------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------
def build_arch(
    spec: str, shape: tuple[int, int, int] = ARCH_SHAPES[0], classes: int = _CLASSES, seed: int = 0
) -> nn.Module:
    """``create_arch`` under a fixed seed, in eval mode (what the arch checks test)."""
    torch.manual_seed(seed)
    return create_arch(spec, num_classes=classes, input_shape=shape).eval()


def _batch(shape: tuple[int, int, int]) -> Tensor:
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def check_arch_forward(
    cls_or_spec: str | type[nn.Module], shape: tuple[int, int, int] = ARCH_SHAPES[0]
) -> None:
    """Finite logits of shape (batch, classes), equal to the fx trace's; train mode works at batch 2."""
    spec = _spec(ARCHS, cls_or_spec)
    where = f"arch {spec} on {shape}"
    model = build_arch(spec, shape)
    x = _batch(shape)
    with torch.no_grad():
        out = model(x)
        try:
            traced = torch.fx.symbolic_trace(model)(x)
        except Exception as exc:
            raise AssertionError(
                f"{where}: torch.fx cannot trace the model ({type(exc).__name__}: {exc}); "
                f"slim prunes through the fx graph, so forward must not branch on tensor values"
            ) from exc
    _expect(out.shape == (2, _CLASSES), f"{where}: output shape {tuple(out.shape)}, expected (2, {_CLASSES})")
    _expect(bool(torch.isfinite(out).all()), f"{where}: output is not finite")
    _expect(torch.equal(traced, out), f"{where}: the fx-traced model computes something else than forward")
    model.train()  # batch statistics: must work on a batch of 2 as well
    train_out = model(x)
    _expect(train_out.shape == (2, _CLASSES) and bool(torch.isfinite(train_out).all()),
            f"{where}: training-mode output is {tuple(train_out.shape)} or not finite")


def check_arch_onnx(
    cls_or_spec: str | type[nn.Module], shape: tuple[int, int, int] = ARCH_SHAPES[0]
) -> None:
    """The ONNX export runs in onnxruntime and matches PyTorch (max diff ≤ 1e-4 × max |logit|)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            'check_arch_onnx needs onnxruntime: pip install "slim-prune[onnx]" '
            "(or call check_arch(..., onnx=False))"
        ) from None
    spec = _spec(ARCHS, cls_or_spec)
    model = build_arch(spec, shape)
    x = _batch(shape)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    with tempfile.TemporaryDirectory(prefix="slim-check-") as work:
        path = str(Path(work) / "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            try:  # the TorchScript exporter is much faster; fall back when a torch drops it
                torch.onnx.export(model, (x,), path, dynamo=False, **names)
            except Exception:
                torch.onnx.export(model, (x,), path, dynamo=True, **names)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = model(x)
    where = f"arch {spec} on {shape}"
    _expect(got.shape == want.shape, f"{where}: ONNX output shape {tuple(got.shape)} vs {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    _expect(diff <= 1e-4 * want.abs().max().item(), f"{where}: ONNX differs from PyTorch by {diff:.3g}")


def _approx(value: float, expected: float, rel: float) -> bool:
    return abs(value - expected) <= max(rel * abs(expected), 1e-12)


def check_arch_init(cls_or_spec: str | type[nn.Module]) -> None:
    """BatchNorm layers exist with γ = 0.5, β = 0; convs feeding a BN have no bias; He / N(0, 0.01) init."""
    spec = _spec(ARCHS, cls_or_spec)
    where = f"arch {spec}"
    model = build_arch(spec)
    bns = [m for m in model.modules() if _is_bn(m)]
    _expect(bool(bns), f"{where}: has no BatchNorm layers, which network slimming needs")
    for bn in bns:
        _expect(bool(torch.all(bn.weight == 0.5) and torch.all(bn.bias == 0)),
                f"{where}: BN γ must start at 0.5 and β at 0 (slimcli.archs.init_weights does it)")
    modules = dict(model.named_modules())
    for node in torch.fx.symbolic_trace(model).graph.nodes:
        if node.op == "call_module" and _is_bn(modules[node.target]):
            producer = node.args[0]
            if producer.op == "call_module" and isinstance(modules[producer.target], nn.modules.conv._ConvNd):
                _expect(modules[producer.target].bias is None,
                        f"{where}: {producer.target} feeds BN {node.target} and must have no bias")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.weight.numel() >= 2000:
            fan_out = m.out_channels * math.prod(m.kernel_size) // m.groups
            std, want = m.weight.std().item(), math.sqrt(2 / fan_out)
            _expect(_approx(std, want, 0.15),
                    f"{where}: {name} weight std {std:.4g}, He init wants {want:.4g}")
        if isinstance(m, nn.Linear):
            _expect(m.bias is None or bool(torch.all(m.bias == 0)), f"{where}: {name} bias must start at 0")
            if m.weight.numel() >= 200:
                std = m.weight.std().item()
                _expect(_approx(std, 0.01, 0.25), f"{where}: {name} weight std {std:.4g}, N(0, 0.01) wanted")


def check_arch_stem(cls_or_spec: str | type[nn.Module]) -> None:
    """The input shape changes the input channels of the first layer only (same names, same other shapes)."""
    spec = _spec(ARCHS, cls_or_spec)
    rgb = build_arch(spec, (3, 32, 32)).state_dict()
    gray = build_arch(spec, (1, 28, 28)).state_dict()
    where = f"arch {spec}"
    _expect(list(rgb) == list(gray), f"{where}: parameter names depend on the input shape")
    differ = [k for k in rgb if rgb[k].shape != gray[k].shape]
    _expect(len(differ) == 1, f"{where}: 3×32×32 and 1×28×28 inputs change {differ}, expected the stem only")
    a, b = rgb[differ[0]].shape, gray[differ[0]].shape
    _expect(a[1] == 3 and b[1] == 1 and a[0] == b[0] and a[2:] == b[2:],
            f"{where}: {differ[0]} is {tuple(a)} vs {tuple(b)}; only its input channels may differ")


def check_arch_rebuild(cls_or_spec: str | type[nn.Module]) -> None:
    """A model rebuilt from the spec loads another's state dict strictly and computes the same outputs."""
    spec = _spec(ARCHS, cls_or_spec)
    a, b = build_arch(spec, seed=0), build_arch(spec, seed=1)
    x = _batch(ARCH_SHAPES[0])
    b.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        _expect(torch.equal(a(x), b(x)),
                f"arch {spec}: a rebuilt model with loaded weights computes otherwise")


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random γ, β and running statistics on every BatchNorm of ``model`` (in place; returns it).

    |γ| are distinct across the whole model (a shuffled even spread over [0.05, 1], random
    signs), so a global ratio threshold is never a tie; β ~ N(0, 0.1²), running mean
    ~ N(0, 0.1²) and running variance ~ U(0.5, 1.5), so that eval-mode BatchNorm does
    something a wrong channel would show.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if _is_bn(m)]
    total = sum(m.num_features for m in bns)
    mags = (0.05 + 0.95 * (torch.randperm(total, generator=g, dtype=F64) + 1) / max(total, 1)).split(
        [m.num_features for m in bns])
    with torch.no_grad():
        for bn, mag in zip(bns, mags, strict=True):
            c = bn.num_features
            sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)
            beta = torch.randn(c, generator=g) * 0.1
            mean, var = torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5
            if bn.weight is not None:
                bn.weight.copy_(sign * mag)
            if bn.bias is not None:
                bn.bias.copy_(beta)
            if bn.running_mean is not None and bn.running_var is not None:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    return model


def _max_excess(got: Tensor, want: Tensor, rtol: float, atol: float) -> tuple[bool, float]:
    """(|got − want| ≤ atol + rtol·|want| everywhere, max |got − want|)."""
    diff = (got - want).abs()
    ok = got.shape == want.shape and bool(torch.all(diff <= atol + rtol * want.abs()))
    return ok, float(diff.max()) if diff.numel() else 0.0


@single_thread()
def check_arch_prune(
    cls_or_spec: str | type[nn.Module],
    ratios: Sequence[float] = (0.3, 0.7),
    seed: int = 0,
    shape: tuple[int, int, int] = ARCH_SHAPES[0],
) -> None:
    """The arch prunes: slim == masked dense to 1e-5, and its widths rebuild it with a strict load.

    The model is built in float64 (eval mode) with :func:`randomize_batchnorms`. For every
    global ratio of ``ratios``: ``compute_keep(model, "ratio", r)`` and ``prune_model``
    give a slim model with fewer channels whose output equals ``masked_dense``'s (the
    dense model with the pruned γ and β zeroed) to rtol = atol = 1e-5; a fresh dense model
    from the spec, narrowed by ``apply_widths`` to the plan's widths, has the slim model's
    parameter count, loads its ``state_dict`` with ``strict=True`` and then computes exactly
    its output. An arch without a prunable BatchNorm fails, naming each BN's reason.
    """
    spec = _spec(ARCHS, cls_or_spec)
    where = f"arch {spec} on {shape}"
    model = randomize_batchnorms(build_arch(spec, shape, seed=seed).double(), seed)
    x = _batch(shape).double()
    bns = prunable_bns(model, shape)
    if not any(b.prunable for b in bns.values()):
        why = "; ".join(f"{n}: {b.reason}" for n, b in bns.items()) or "it has no BatchNorm at all"
        raise AssertionError(f"{where}: no BatchNorm can be pruned ({why})")
    for r in ratios:
        at = f"{where}, ratio {r:g}"
        plan = compute_keep(model, "ratio", r, input_shape=shape, bns=bns)
        slim, report = prune_model(model, plan, input_shape=shape)
        _expect(report.channels_after < report.channels_before,
                f"{at}: pruning removed no channel ({report.channels_before} before and after)")
        kept = {r.name: r.kept for r in report.layers if r.prunable}
        _expect(kept == plan.widths,
                f"{at}: the slim model keeps {kept} channels, not the plan's {plan.widths}")
        with torch.no_grad():
            out = slim(x)
            want = masked_dense(model, plan.masks)(x)
        ok, diff = _max_excess(out, want, 1e-5, 1e-5)
        _expect(ok, f"{at}: the slim model's output differs from the masked dense model's (pruned γ and β "
                    f"zeroed) by up to {diff:.3g} (allowed: 1e-5 + 1e-5·|output|)")
        fresh = create_arch(spec, num_classes=_CLASSES, input_shape=shape).double()
        rebuilt = apply_widths(fresh, plan.widths, input_shape=shape, keep=report.keep,
                               coupling=plan.coupling)
        _expect(count_params(rebuilt) == count_params(slim) == report.params_after,
                f"{at}: the model rebuilt from the widths has {count_params(rebuilt)} parameters, the slim "
                f"model {count_params(slim)} (report: {report.params_after})")
        try:
            rebuilt.load_state_dict(slim.state_dict(), strict=True)
        except RuntimeError as exc:
            raise AssertionError(f"{at}: the slim state dict does not load strictly into the model rebuilt "
                                 f"from its widths: {exc}") from None
        with torch.no_grad():
            again = rebuilt.eval()(x)
        _expect(again.shape == out.shape and torch.equal(again, out),
                f"{at}: the model rebuilt from the widths computes otherwise than the slim model "
                f"(max difference {_max_excess(again, out, 0, 0)[1]:.3g})")


def check_arch(
    cls_or_spec: str | type[nn.Module],
    *,
    shapes: Sequence[tuple[int, int, int]] = ARCH_SHAPES,
    onnx: bool = True,
) -> None:
    """The whole architecture contract: every ``check_arch_*`` (ONNX unless ``onnx=False``), on ``shapes``.

    Forward, ONNX and pruning (:func:`check_arch_prune`) are checked on each shape; init,
    stem and rebuild once.
    """
    spec = _spec(ARCHS, cls_or_spec)
    for shape in shapes:
        check_arch_forward(spec, shape)
        if onnx:
            check_arch_onnx(spec, shape)
        check_arch_prune(spec, shape=shape)
    check_arch_init(spec)
    check_arch_stem(spec)
    check_arch_rebuild(spec)


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------
def check_dataset(cls_or_spec: str | type[Dataset], root: str | Path | None = None) -> None:
    """The dataset contract; ``root`` is passed to ``load`` (where a file-based dataset finds its files).

    The attributes are consistent (classes, input shape, per-channel mean/std in (0, 1),
    augmentation settings), the spec string round-trips, both splits load as contiguous,
    writable uint8 N×C×H×W images with int64 labels in range, and an unknown split is a
    :class:`~slimcli.errors.UsageError` that says "split".
    """
    spec = _spec(DATASETS, cls_or_spec)
    root = Path(root) if root is not None else None
    ds = create_dataset(spec)
    where = f"dataset {spec}"
    _expect(isinstance(ds, Dataset) and ds.name == DATASETS.parse(spec).name,
            f"{where}: not a registered slimcli.data.Dataset")
    _expect(isinstance(ds.num_classes, int) and ds.num_classes >= 2,
            f"{where}: num_classes must be an int >= 2")
    _expect(isinstance(ds.input_shape, tuple) and len(ds.input_shape) == 3
            and all(isinstance(v, int) and v > 0 for v in ds.input_shape),
            f"{where}: input_shape must be a tuple (C, H, W) of positive ints, got {ds.input_shape!r}")
    _expect(isinstance(ds.classes, list) and len(ds.classes) == ds.num_classes
            and all(isinstance(c, str) and c for c in ds.classes) and len(set(ds.classes)) == ds.num_classes,
            f"{where}: classes must be a list of num_classes distinct non-empty names")
    channels = ds.input_shape[0]
    _expect(len(ds.mean) == len(ds.std) == channels, f"{where}: mean and std need one value per channel")
    _expect(all(0 < m < 1 for m in ds.mean) and all(0 < s < 1 for s in ds.std),
            f"{where}: mean and std are in [0, 1] pixel units, got {ds.mean} / {ds.std}")
    aug: Any = ds.augment
    _expect(isinstance(aug, dict) and set(aug) == {"crop_pad", "hflip"},
            f"{where}: augment must be {{'crop_pad': int, 'hflip': bool}}, got {aug!r}")
    _expect(isinstance(aug["crop_pad"], int) and aug["crop_pad"] >= 0 and isinstance(aug["hflip"], bool),
            f"{where}: augment must be {{'crop_pad': int >= 0, 'hflip': bool}}, got {aug!r}")
    _expect(create_dataset(ds.spec).spec == ds.spec, f"{where}: spec {ds.spec!r} does not round-trip")
    for split in ("train", "test"):
        x, y = ds.load(split, root)
        _expect(x.dtype == torch.uint8 and x.is_contiguous() and tuple(x.shape[1:]) == ds.input_shape,
                f"{where}: {split} images must be contiguous uint8 N×{'×'.join(map(str, ds.input_shape))}, "
                f"got {x.dtype} {tuple(x.shape)}")
        _expect(y.dtype == torch.int64 and y.shape == (len(x),) and len(x) > 0,
                f"{where}: {split} labels must be int64 of shape (N,) with N > 0, "
                f"got {y.dtype} {tuple(y.shape)} for {len(x)} images")
        _expect(0 <= int(y.min()) and int(y.max()) < ds.num_classes,
                f"{where}: {split} labels must be in [0, {ds.num_classes})")
        try:
            x[0, 0, 0, 0] = 1
        except RuntimeError as exc:
            raise AssertionError(f"{where}: {split} images must own writable memory ({exc})") from None
    try:
        ds.load("val", root)
    except UsageError as exc:
        _expect("split" in str(exc), f"{where}: the error for split 'val' must mention the split: {exc}")
    else:
        raise AssertionError(f"{where}: load('val') must raise slimcli.errors.UsageError (use check_split)")


__all__ = [
    "ARCH_SHAPES",
    "PENALTY_MAGNITUDES",
    "PROX_ROWS",
    "PROX_STEPS",
    "BruteForce",
    "brute_force_prox",
    "build_arch",
    "check_arch",
    "check_arch_forward",
    "check_arch_init",
    "check_arch_onnx",
    "check_arch_prune",
    "check_arch_rebuild",
    "check_arch_stem",
    "check_dataset",
    "check_penalty",
    "check_penalty_autograd",
    "check_penalty_prox",
    "elementwise_value",
    "penalty_points",
    "randomize_batchnorms",
    "single_thread",
]
