"""The trainer helpers: add_penalty_grad and apply_prox over all BN scales at once."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from slimcli.errors import UsageError
from slimcli.penalties import Penalty, add_penalty_grad, apply_prox, create_penalty

SPECS = ["l1", "lp:p=0.5", "lp:p=0.3", "tl1:a=0.5", "mcp:theta=0.05", "scad:theta=0.05", "l1-l2",
         "l1-l2:alpha=0.5"]
SIZES = [3, 7, 16, 1, 64]


def gammas(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[nn.Parameter]:
    """BN-like scales of several layer sizes, with zeros, tiny and large entries and a gradient each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in SIZES:
        v = torch.randn(n, generator=g, dtype=dtype) * 0.3
        v[0] = 0.0
        if n > 2:
            v[1], v[2] = 1e-12, -2.0
        p = nn.Parameter(v)
        p.grad = torch.randn(n, generator=g, dtype=dtype)
        out.append(p)
    return out


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_penalty_grad_equals_per_layer_loop(spec: str, dtype: torch.dtype) -> None:
    lam = 1e-2
    pen = create_penalty(spec, lam=lam)
    params = gammas(dtype)
    params[1].grad = None  # e.g. a layer outside the graph this step: skipped, stays None
    before = [None if p.grad is None else p.grad.clone() for p in params]
    want = [None if b is None else b + lam * pen.subgradient(p.detach())
            for p, b in zip(params, before, strict=True)]
    add_penalty_grad(pen, params)
    for p, w in zip(params, want, strict=True):
        if w is None:
            assert p.grad is None
        else:
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad, w)
    assert not torch.equal(params[-1].grad, before[-1])  # the penalty did act


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_prox_equals_per_layer_loop(spec: str, dtype: torch.dtype) -> None:
    lam, lr = 0.5, 0.1
    pen = create_penalty(spec, lam=lam)
    params = gammas(dtype, seed=1)
    want = [pen.prox(p.detach().clone(), lr * lam) for p in params]
    grads = [p.grad.clone() for p in params]
    apply_prox(pen, params, lr)
    for p, w, g in zip(params, want, grads, strict=True):
        assert isinstance(p, nn.Parameter) and p.dtype == dtype
        torch.testing.assert_close(p.detach(), w)  # SIMD vs scalar loops may differ by an ulp
        assert torch.equal(p.detach() == 0, w == 0)  # the same exact zeros
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)  # gradients are left alone


def test_separable_many_equals_one_layer_at_a_time() -> None:
    """The one-call path over a concatenation gives what each layer alone gives."""
    pen = create_penalty("tl1", lam=0.1)
    xs: list[Tensor] = [p.detach() for p in gammas()] + [torch.randn(2, 3, dtype=torch.float64)]
    for got, x in zip(pen.subgradient_many(xs), xs, strict=True):
        torch.testing.assert_close(got, pen.subgradient(x.reshape(-1)).view_as(x))
    prox = pen.prox_many(xs, 0.2)
    assert prox is not None
    for got, x in zip(prox, xs, strict=True):
        assert got.shape == x.shape
        torch.testing.assert_close(got, pen.prox(x.reshape(-1), 0.2).view_as(x))
    torch.testing.assert_close(pen.value_many(xs), sum(pen.value(x) for x in xs))


def test_l1_proximal_step_gives_exact_zeros() -> None:
    lam, lr = 1e-2, 0.5  # threshold lr·λ = 5e-3
    pen = create_penalty("l1", lam=lam)
    params = [nn.Parameter(torch.tensor([0.004, -0.0049, 0.006, -1.0, 0.0])),
              nn.Parameter(torch.tensor([1e-9, 0.3]))]
    apply_prox(pen, params, lr)
    assert params[0].detach().tolist()[:2] == [0.0, 0.0] and params[0].detach()[4].item() == 0.0
    assert params[1].detach()[0].item() == 0.0
    torch.testing.assert_close(params[0].detach()[2:4], torch.tensor([0.001, -0.995]))
    torch.testing.assert_close(params[1].detach()[1], torch.tensor(0.295))
    assert int(sum((p == 0).sum() for p in params)) == 4


class _NoProx(Penalty):
    """A penalty with a subgradient but no proximal map (as a third-party plugin may be)."""

    name = "noprox"

    def value(self, x: Tensor) -> Tensor:
        return x.square().sum()

    def subgradient(self, x: Tensor) -> Tensor:
        return 2 * x


def test_apply_prox_without_prox_names_the_fix() -> None:
    pen = _NoProx(lam=0.1)
    assert not pen.has_prox and pen.prox_many([torch.ones(2)], 0.1) is None
    params = gammas()
    before = [p.detach().clone() for p in params]
    with pytest.raises(UsageError, match="--update subgradient") as info:
        apply_prox(pen, params, 0.1)
    assert "noprox" in str(info.value) and "l1" in str(info.value)
    for p, b in zip(params, before, strict=True):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    add_penalty_grad(pen, params)  # the subgradient path still works for it


@pytest.mark.parametrize("spec", ["none", "l1", "mcp", "l1-l2"])
def test_zero_lambda_and_zero_penalty_change_nothing(spec: str) -> None:
    for pen in (create_penalty(spec, lam=0.0), create_penalty("none", lam=0.3)):
        params = gammas()
        before = [(p.detach().clone(), p.grad.clone()) for p in params]
        add_penalty_grad(pen, params)
        apply_prox(pen, params, 0.1)
        for p, (v, g) in zip(params, before, strict=True):
            torch.testing.assert_close(p.detach(), v, rtol=0, atol=0)
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_helpers_accept_empty_and_gradless_lists() -> None:
    pen = create_penalty("l1", lam=0.1)
    add_penalty_grad(pen, [])
    apply_prox(pen, [], 0.1)
    p = nn.Parameter(torch.ones(3))
    add_penalty_grad(pen, [p])
    assert p.grad is None
    assert pen.value_many([]).item() == 0
