"""CIFAR ResNet with basic blocks (He et al., 2016 §4.2): ResNet-20/32/44/56/110."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimcli.archs import check_input_shape, check_num_classes, depth_problem, init_weights, validate_options
from slimcli.registry import Option, register_arch


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride = stride
        self.before = extra // 2
        self.after = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels=({self.before}, {self.after})"


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus shortcut, then ReLU (post-activation)."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        # a module attribute, not data: torch.fx resolves this branch at trace time
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(stride, planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + residual)


@register_arch(
    "resnet56", aliases={f"resnet{d}": {"depth": d} for d in (20, 32, 44, 110)}
)
class ResNet56(nn.Module):
    """CIFAR ResNet, basic blocks, depth 6n+2 (ResNet-56: 3 stages × 9 blocks, 16/32/64 channels).

    ``stem`` conv3×3 → ``bn1`` → ReLU → ``stage1``..``stage3`` → global average pool → ``fc``;
    block layers are named ``stage1.0.conv1``, ``stage1.0.bn1``, …. Shortcuts where the shape
    changes: ``A`` = subsample + zero-pad channels (the original paper's CIFAR option and
    the usual pruning benchmark, 0.85M parameters), ``B`` = conv1×1 + BN (projection).
    """

    options: ClassVar[tuple[Option, ...]] = (
        Option("depth", int, 56, "layers: 3 stages × n basic blocks × 2 convs + 2",
               rule="depth = 6n+2, n >= 1 (8, 14, 20, …, 56, 110)"),
        Option("shortcut", str, "A", "where the shape changes: A = zero-pad identity, B = conv1×1+BN",
               choices=("A", "B")),
    )
    test_spec: ClassVar[str] = "resnet56:depth=8"

    def __init__(
        self, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32),
        depth: int = 56, shortcut: str = "A",
    ) -> None:
        super().__init__()
        check_num_classes("resnet56", num_classes)
        validate_options(type(self), {"depth": depth, "shortcut": shortcut})
        self.input_shape = check_input_shape("resnet56", input_shape)
        self.num_classes = num_classes
        self.depth, self.shortcut_type = depth, shortcut
        n = (depth - 2) // 6

        self.stem = nn.Conv2d(self.input_shape[0], 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.stem(x)))
        x = self.pool(self.stage3(self.stage2(self.stage1(x))))
        return self.fc(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, shortcut={self.shortcut_type}"

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> str | None:
        return depth_problem(values["depth"], 6, 2)
