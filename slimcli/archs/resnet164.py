"""Pre-activation bottleneck ResNet for CIFAR (He et al., 2016), as pruned in network slimming."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from slimcli.archs import check_input_shape, check_num_classes, depth_problem, init_weights, validate_options
from slimcli.registry import Option, register_arch


class PreActBottleneck(nn.Module):
    """BN → ReLU → conv1×1 → BN → ReLU → conv3×3 (stride) → BN → ReLU → conv1×1, plus shortcut.

    The shortcut is the identity, or a strided conv1×1 without BN where the shape changes.
    The block's input (a residual sum) is not normalised in place: ``bn1`` reads it, so the
    pruning engine puts a channel selection in front of ``bn1`` instead of narrowing the trunk.
    """

    expansion: ClassVar[int] = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        # a module attribute, not data: torch.fx resolves this branch at trace time
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        residual = x if self.shortcut is None else self.shortcut(x)
        return out + residual


@register_arch("resnet164")
class ResNet164(nn.Module):
    """Pre-activation bottleneck ResNet, depth 9n+2 (ResNet-164: 3 stages × 18 blocks).

    ``stem`` conv3×3 → ``stage1``..``stage3`` (planes 16/32/64, expansion 4, stride 1/2/2)
    → ``bn`` → ReLU → global average pool → ``fc``. Block layers are named
    ``stage1.0.bn1``, ``stage1.0.conv1``, … ``stage1.0.shortcut``.
    """

    options: ClassVar[tuple[Option, ...]] = (
        Option("depth", int, 164, "layers: 3 stages × n bottleneck blocks × 3 convs + 2",
               rule="depth = 9n+2, n >= 1 (11, 20, …, 164)"),
    )
    test_spec: ClassVar[str] = "resnet164:depth=11"

    def __init__(
        self, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32), depth: int = 164
    ) -> None:
        super().__init__()
        check_num_classes("resnet164", num_classes)
        validate_options(type(self), {"depth": depth})
        self.input_shape = check_input_shape("resnet164", input_shape)
        self.num_classes = num_classes
        self.depth = depth
        n = (depth - 2) // 9

        self.stem = nn.Conv2d(self.input_shape[0], 16, 3, padding=1, bias=False)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(PreActBottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * PreActBottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}"

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> str | None:
        return depth_problem(values["depth"], 9, 2)
