"""DenseNet for CIFAR (Huang et al., 2017) without bottleneck or compression, as in network slimming."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from slimcli.archs import check_input_shape, check_num_classes, depth_problem, init_weights, validate_options
from slimcli.registry import Option, register_arch


class DenseLayer(nn.Module):
    """BN → ReLU → conv3×3 (in → growth), concatenated after the input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_planes, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    """BN → ReLU → conv1×1 (same width: no compression) → 2×2 average pool."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(planes, planes, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


@register_arch("densenet40")
class DenseNet40(nn.Module):
    """DenseNet-40 (growth 12): 3 dense blocks of (depth−4)/3 layers, no compression.

    ``stem`` conv3×3 → ``block1`` → ``trans1`` → ``block2`` → ``trans2`` → ``block3`` → ``bn``
    → ReLU → global average pool → ``fc``. Layers are named ``block1.0.bn``,
    ``block1.0.conv``, ``trans1.conv``, …. ``stem=16`` reproduces the paper's parameter counts;
    ``stem=24`` (2 × growth) is the public PyTorch port.
    """

    options: ClassVar[tuple[Option, ...]] = (
        Option("depth", int, 40, "layers: 3 dense blocks × n layers + 4",
               rule="depth = 3n+4, n >= 1 (7, 10, …, 40)"),
        Option("growth", int, 12, "channels each dense layer adds",
               check=lambda g: g >= 1, rule="growth >= 1"),
        Option("stem", int, 16, "output channels of the first conv (24 = the public PyTorch port)",
               check=lambda s: s >= 1, rule="stem >= 1"),
    )
    test_spec: ClassVar[str] = "densenet40:depth=7,growth=4,stem=8"

    def __init__(
        self, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32),
        depth: int = 40, growth: int = 12, stem: int = 16,
    ) -> None:
        super().__init__()
        check_num_classes("densenet40", num_classes)
        validate_options(type(self), {"depth": depth, "growth": growth, "stem": stem})
        # two 2×2 average pools (floor): the last block needs at least one pixel
        self.input_shape = check_input_shape("densenet40", input_shape, min_size=4)
        self.num_classes = num_classes
        self.depth, self.growth = depth, growth
        n = (depth - 4) // 3

        self.stem = nn.Conv2d(self.input_shape[0], stem, 3, padding=1, bias=False)
        planes = stem
        blocks, transitions = [], []
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth))
                planes += growth
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                transitions.append(Transition(planes))
        self.block1, self.block2, self.block3 = blocks
        self.trans1, self.trans2 = transitions
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.trans1(self.block1(self.stem(x)))
        x = self.trans2(self.block2(x))
        x = self.pool(self.relu(self.bn(self.block3(x))))
        return self.fc(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, growth={self.growth}"

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> str | None:
        return depth_problem(values["depth"], 3, 4)
