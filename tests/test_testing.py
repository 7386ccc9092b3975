"""slimcli.testing: the plugin contract checks pass on the built-ins and catch plugins that break them.

That they pass on every built-in is tested where the built-ins are (test_penalties.py,
test_archs.py, test_data.py all call these functions); here each check is shown to fail,
with a message naming the broken rule, on a plugin that breaks it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import slimcli.testing
from slimcli.archs import init_weights
from slimcli.data import Dataset
from slimcli.penalties import Penalty, create_penalty
from slimcli.penalties.l1 import L1
from slimcli.registry import ARCHS, DATASETS, PENALTIES, register_arch, register_dataset, register_penalty
from slimcli.testing import (
    brute_force_prox,
    check_arch,
    check_arch_forward,
    check_arch_init,
    check_arch_prune,
    check_dataset,
    check_penalty,
    check_penalty_autograd,
    check_penalty_prox,
    randomize_batchnorms,
)


@pytest.fixture
def registered() -> Iterator[list[tuple[Any, str]]]:
    """Names registered by a test, removed afterwards: append ``(registry, name)``."""
    names: list[tuple[Any, str]] = []
    yield names
    for registry, name in names:
        registry.unregister(name)


# --------------------------------------------------------------------------------------------- penalties
class _L1(L1):
    """The built-in ℓ1 as a base (registered under another name it passes: see the test)."""


class _NotEven(_L1):
    def value(self, x: Tensor) -> Tensor:
        return (x.abs() + 0.1 * x).sum()


class _NonzeroAtZero(_L1):
    def value(self, x: Tensor) -> Tensor:
        return (x.abs() + 1).sum()


class _UndefinedAtZero(_L1):
    def subgradient(self, x: Tensor) -> Tensor:
        return x / x.abs()  # NaN at 0


class _ProxMovesZero(_L1):
    def prox(self, y: Tensor, step: float) -> Tensor:
        return y + step


class _WrongDtype(_L1):
    def value(self, x: Tensor) -> Tensor:
        return x.abs().sum().double()


class _SteepSubgradient(_L1):
    """Odd, finite, 0 at 0: only comparing with autograd of value() shows it is 1 % too steep."""

    def subgradient(self, x: Tensor) -> Tensor:
        return 1.01 * torch.sign(x)


class _SubgradientOfAnotherValue(_L1):
    """value() is ℓ1, subgradient() that of the (smooth) Huber-like x²/2 near 0: wrong for |x| < 1."""

    def subgradient(self, x: Tensor) -> Tensor:
        return x.clamp(-1, 1)


class _HalfStepProx(_L1):
    """Soft thresholding at step/2: odd, finite, 0 at 0, keeps shape; not the minimiser."""

    def prox(self, y: Tensor, step: float) -> Tensor:
        return torch.sign(y) * (y.abs() - step / 2).clamp(min=0)


class _HardThresholdProx(_L1):
    """Hard thresholding at the step: right objective only below the threshold."""

    def prox(self, y: Tensor, step: float) -> Tensor:
        return torch.where(y.abs() > step, y, torch.zeros_like(y))


class _ValueOutsideAutograd(_L1):
    """value() computed through Python floats: autograd cannot see it."""

    def value(self, x: Tensor) -> Tensor:
        return torch.tensor(sum(abs(v) for v in x.tolist()), dtype=x.dtype)


@pytest.mark.parametrize(
    ("cls", "words"),
    [
        (_NotEven, "even"),
        (_NonzeroAtZero, "R(0)"),
        (_UndefinedAtZero, "not finite"),
        (_ProxMovesZero, "prox(0"),
        (_WrongDtype, "returned torch.float64"),
        (_SteepSubgradient, "not the autograd derivative"),
        (_SubgradientOfAnotherValue, "not the autograd derivative"),
        (_HalfStepProx, "objective above brute force"),
        (_HardThresholdProx, "objective above brute force"),
        (_ValueOutsideAutograd, "differentiable by autograd"),
    ],
)
def test_check_penalty_catches_a_broken_penalty(
    cls: type[Penalty], words: str, registered: list[tuple[Any, str]]
) -> None:
    check_penalty(register_penalty("test-good-l1")(type("GoodL1", (_L1,), {})))  # the base is fine
    registered.append((PENALTIES, "test-good-l1"))
    broken = register_penalty("test-broken")(type(cls.__name__, (cls,), {}))
    registered.append((PENALTIES, "test-broken"))
    with pytest.raises(AssertionError, match=re.escape(words)):
        check_penalty(broken)
    with pytest.raises(AssertionError, match="test-broken"):
        check_penalty("test-broken")  # a spec string is checked the same way


def test_numerical_checks_alone_catch_what_check_penalty_catches(registered: list[tuple[Any, str]]) -> None:
    """check_penalty_autograd / check_penalty_prox are usable on their own, with declared kinks too."""
    for name, cls in [("test-steep", _SteepSubgradient), ("test-half", _HalfStepProx)]:
        register_penalty(name)(type(cls.__name__, (cls,), {}))
        registered.append((PENALTIES, name))
    with pytest.raises(AssertionError, match=r"test-steep.*not the autograd derivative"):
        check_penalty_autograd("test-steep", kinks=())
    check_penalty_prox("test-steep")  # its prox is the built-in ℓ1's: fine
    with pytest.raises(AssertionError, match=r"test-half, prox\(step=0.1\): objective above brute force"):
        check_penalty_prox("test-half", steps=(0.1,))
    check_penalty_autograd("test-half")  # its subgradient is fine


def test_check_penalty_prox_checks_the_minimiser_not_only_the_objective(
    registered: list[tuple[Any, str]]
) -> None:
    """A prox off by less than the objective tolerance notices, but the point is far: x is compared."""

    class _Nudged(_L1):
        def prox(self, y: Tensor, step: float) -> Tensor:
            out = super().prox(y, step)
            return torch.where(out != 0, out + 1e-5 * torch.sign(out), out)  # f rises by ~1e-10 only

    register_penalty("test-nudged")(type("Nudged", (_Nudged,), {}))
    registered.append((PENALTIES, "test-nudged"))
    with pytest.raises(AssertionError, match=r"differs from the \(unique\) brute-force minimiser"):
        check_penalty_prox("test-nudged", f_atol=1e-8, f_rtol=0)


def test_brute_force_prox_finds_the_known_minimisers() -> None:
    """ℓ1: soft thresholding (unique minimisers); l1-l2 at a tie: two minimisers, not unique."""
    l1 = create_penalty("l1")
    y = torch.tensor([-2.0, -0.3, 0.0, 0.05, 0.7, 3.0], dtype=torch.float64)
    brute = brute_force_prox(l1, y, 0.1)
    torch.testing.assert_close(brute.x, torch.sign(y) * (y.abs() - 0.1).clamp(min=0), rtol=0, atol=1e-8)
    assert brute.unique[y != 0].all()
    tie = brute_force_prox(create_penalty("l1-l2"), torch.tensor([[0.5, -0.5]], dtype=torch.float64), 1.0)
    assert not tie.unique.any()


def test_check_penalty_refuses_an_unregistered_class() -> None:
    with pytest.raises(AssertionError, match="not a registered penalty"):
        check_penalty(_L1)


# ------------------------------------------------------------------------------------------------ archs
class _Tiny(nn.Module):
    """conv-BN-ReLU, global pool, linear: follows the contract."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class _Branchy(_Tiny):
    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # branches on a tensor value: fx cannot trace it
            x = -x
        return super().forward(x)


class _BiasBeforeBN(_Tiny):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__(num_classes, input_shape, bias=True)


class _DefaultGamma(_Tiny):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__(num_classes, input_shape)
        nn.init.ones_(self.bn.weight)  # PyTorch's default γ = 1, not slim's 0.5


class _ResidualOnly(_Tiny):
    """The BN's output is added to its own input: no channel of it can go (nothing to prune)."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return self.fc(torch.relu(self.bn(h) + h).mean((2, 3)))


def test_check_arch_passes_a_good_arch_and_catches_broken_ones(registered: list[tuple[Any, str]]) -> None:
    good = register_arch("test-tiny")(type("Tiny", (_Tiny,), {}))
    registered.append((ARCHS, "test-tiny"))
    check_arch(good, onnx=False)

    for name, cls, check, words in [
        ("test-branchy", _Branchy, check_arch_forward, "torch.fx cannot trace"),
        ("test-bias", _BiasBeforeBN, check_arch_init, "must have no bias"),
        ("test-gamma", _DefaultGamma, check_arch_init, "0.5"),
        ("test-residual", _ResidualOnly, check_arch_prune, "no BatchNorm can be pruned"),
    ]:
        register_arch(name)(type(cls.__name__, (cls,), {}))
        registered.append((ARCHS, name))
        with pytest.raises(AssertionError, match=words):
            check(name)


# --------------------------------------------------------------------------------------------- datasets
class _Dots(Dataset):
    """Two classes of random uint8 images."""

    num_classes = 2
    input_shape = (1, 4, 4)
    classes = ["a", "b"]  # noqa: RUF012
    mean, std = (0.5,), (0.25,)
    augment = {"crop_pad": 0, "hflip": False}  # noqa: RUF012

    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        self.check_split(split)
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (6, 1, 4, 4), generator=g, dtype=torch.uint8), torch.arange(6) % 2


class _FloatImages(_Dots):
    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        x, y = super().load(split, root)
        return x.float(), y


class _AnySplit(_Dots):
    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        return super().load("train", root)


class _LabelOutOfRange(_Dots):
    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        x, y = super().load(split, root)
        return x, y + 1


def test_check_dataset_passes_a_good_dataset_and_catches_broken_ones(
    registered: list[tuple[Any, str]], tmp_path: Path
) -> None:
    register_dataset("test-dots")(type("Dots", (_Dots,), {}))
    registered.append((DATASETS, "test-dots"))
    check_dataset("test-dots", tmp_path)

    for name, cls, words in [
        ("test-float", _FloatImages, "uint8"),
        ("test-any-split", _AnySplit, "must raise"),
        ("test-labels", _LabelOutOfRange, r"in \[0, 2\)"),
    ]:
        register_dataset(name)(type(cls.__name__, (cls,), {}))
        registered.append((DATASETS, name))
        with pytest.raises(AssertionError, match=words):
            check_dataset(name)


# ------------------------------------------------------------------------------------ arch pruning
def _perturbed(model: nn.Module, amount: float) -> nn.Module:
    """``model`` with one kept channel's β moved by ``amount``: a slim model that is subtly wrong."""
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and bool((m.weight != 0).any()))
    with torch.no_grad():
        bn.bias[int((bn.weight != 0).nonzero()[0])] += amount
    return model


def test_check_arch_prune_catches_a_slim_model_that_differs(
    registered: list[tuple[Any, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    register_arch("test-tiny-prune")(type("Tiny", (_Tiny,), {}))
    registered.append((ARCHS, "test-tiny-prune"))
    check_arch_prune("test-tiny-prune")  # the arch itself prunes fine
    real_prune, real_widths = slimcli.testing.prune_model, slimcli.testing.apply_widths

    def wrong_prune(model: nn.Module, plan: Any, **kwargs: Any) -> Any:
        slim, report = real_prune(model, plan, **kwargs)
        return _perturbed(slim, 0.1), report

    monkeypatch.setattr(slimcli.testing, "prune_model", wrong_prune)
    where = r"test-tiny-prune on \(3, 32, 32\), ratio 0\.3: "
    with pytest.raises(AssertionError, match=where + "the slim model's output differs .*masked dense"):
        check_arch_prune("test-tiny-prune")
    monkeypatch.setattr(slimcli.testing, "prune_model", real_prune)

    def one_channel_more(model: nn.Module, widths: dict[str, int], **kwargs: Any) -> Any:
        kwargs.pop("keep", None)  # the widths alone, first channels
        return real_widths(model, {n: min(w + 1, 8) for n, w in widths.items()}, **kwargs)

    monkeypatch.setattr(slimcli.testing, "apply_widths", one_channel_more)
    with pytest.raises(AssertionError, match=where + r"the model rebuilt from the widths has \d+ parameters"):
        check_arch_prune("test-tiny-prune")

    def same_widths_other_weights(model: nn.Module, widths: dict[str, int], **kwargs: Any) -> Any:
        class Shifted(nn.Module):  # loads strictly, computes otherwise
            def __init__(self) -> None:
                super().__init__()
                self.inner = real_widths(model, widths, **kwargs)

            def load_state_dict(self, state: Any, strict: bool = True) -> Any:
                out = self.inner.load_state_dict(state, strict=strict)
                _perturbed(self.inner, 1e-9)
                return out

            def forward(self, x: Tensor) -> Tensor:
                return self.inner(x)

        return Shifted()

    monkeypatch.setattr(slimcli.testing, "apply_widths", same_widths_other_weights)
    with pytest.raises(AssertionError, match="rebuilt from the widths computes otherwise"):
        check_arch_prune("test-tiny-prune", ratios=(0.7,))


def test_check_arch_prune_catches_a_masked_reference_that_differs(
    registered: list[tuple[Any, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reference that is off (one kept channel's β shifted by 0.1) fails the comparison."""
    register_arch("test-tiny-mask")(type("Tiny", (_Tiny,), {}))
    registered.append((ARCHS, "test-tiny-mask"))
    real = slimcli.testing.masked_dense
    monkeypatch.setattr(slimcli.testing, "masked_dense", lambda m, masks: _perturbed(real(m, masks), 0.1))
    with pytest.raises(AssertionError, match=r"ratio 0\.7: the slim model's output differs"):
        check_arch_prune("test-tiny-mask", ratios=(0.7,))


def test_randomize_batchnorms_gives_distinct_gammas_and_is_seeded() -> None:
    a = randomize_batchnorms(_Tiny(3, (3, 8, 8)), seed=5)
    b = randomize_batchnorms(_Tiny(3, (3, 8, 8)), seed=5)
    assert torch.equal(a.bn.weight, b.bn.weight) and torch.equal(a.bn.running_var, b.bn.running_var)
    mags = a.bn.weight.abs()
    assert len(set(mags.tolist())) == 8 and bool((mags >= 0.05).all()) and bool((a.bn.weight < 0).any())
    assert bool((a.bn.bias != 0).all()) and bool((a.bn.running_mean != 0).all())
    assert not torch.equal(randomize_batchnorms(_Tiny(3, (3, 8, 8)), seed=6).bn.weight, a.bn.weight)
