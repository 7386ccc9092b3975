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

from slimcli.archs import init_weights
from slimcli.data import Dataset
from slimcli.penalties import Penalty
from slimcli.penalties.l1 import L1
from slimcli.registry import ARCHS, DATASETS, PENALTIES, register_arch, register_dataset, register_penalty
from slimcli.testing import (
    check_arch,
    check_arch_forward,
    check_arch_init,
    check_dataset,
    check_penalty,
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


@pytest.mark.parametrize(
    ("cls", "words"),
    [
        (_NotEven, "even"),
        (_NonzeroAtZero, "R(0)"),
        (_UndefinedAtZero, "not finite"),
        (_ProxMovesZero, "prox(0"),
        (_WrongDtype, "returned torch.float64"),
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


def test_check_arch_passes_a_good_arch_and_catches_broken_ones(registered: list[tuple[Any, str]]) -> None:
    good = register_arch("test-tiny")(type("Tiny", (_Tiny,), {}))
    registered.append((ARCHS, "test-tiny"))
    check_arch(good, onnx=False)

    for name, cls, check, words in [
        ("test-branchy", _Branchy, check_arch_forward, "torch.fx cannot trace"),
        ("test-bias", _BiasBeforeBN, check_arch_init, "must have no bias"),
        ("test-gamma", _DefaultGamma, check_arch_init, "0.5"),
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
