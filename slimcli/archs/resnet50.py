"""ImageNet ResNet with bottleneck blocks (He et al., 2016; torchvision's "v1.5"): ResNet-50/101/152.

Post-activation bottlenecks (conv1×1 → BN → ReLU → conv3×3 (stride) → BN → ReLU → conv1×1 → BN,
plus shortcut, then ReLU), the stride on the 3×3 conv, projection shortcuts (conv1×1 + BN)
where the shape changes. Module names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``), so a torchvision ``state_dict`` loads with ``strict=True``.
ResNet-50 at 1000 classes has 25,557,032 parameters, as torchvision's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from slimcli.archs import check_input_shape, check_num_classes, init_weights, validate_options
from slimcli.registry import Option, register_arch

#: blocks per stage for each depth (3 convs per block + stem + fc)
BLOCKS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


class Bottleneck(nn.Module):
    """conv1×1 → BN → ReLU → conv3×3 (stride) → BN → ReLU → conv1×1 → BN, + shortcut, ReLU."""

    expansion: ClassVar[int] = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        # a module attribute, not data: torch.fx resolves this branch at trace time
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 1."""
    return max(1, round(channels * width))


@register_arch("resnet50", aliases={f"resnet{d}": {"depth": d} for d in (101, 152)})
class ResNet50(nn.Module):
    """ImageNet bottleneck ResNet (torchvision layout): depth 26, 50, 101 or 152, width multiplier.

    ``conv1`` 7×7/2 → ``bn1`` → ReLU → 3×3/2 max-pool → ``layer1``..``layer4`` (planes
    64/128/256/512 × ``width``, expansion 4, strides 1/2/2/2) → global average pool → ``fc``.
    The stem downsamples 4× and the stages 8× more: made for 224×224 images (7×7 before the
    pool); smaller images work (the pool is adaptive) but lose resolution fast.
    """

    options: ClassVar[tuple[Option, ...]] = (
        Option("depth", int, 50, "layers: bottleneck blocks per stage 2-2-2-2 (26), 3-4-6-3 (50), "
               "3-4-23-3 (101), 3-8-36-3 (152)", choices=tuple(BLOCKS)),
        Option("width", float, 1.0, "channel multiplier of every layer (channels rounded, at least 1)",
               check=lambda w: w > 0, rule="width > 0"),
    )
    test_spec: ClassVar[str] = "resnet50:depth=26,width=0.125"

    def __init__(
        self, num_classes: int = 1000, input_shape: tuple[int, int, int] = (3, 224, 224),
        depth: int = 50, width: float = 1.0,
    ) -> None:
        super().__init__()
        check_num_classes("resnet50", num_classes)
        validate_options(type(self), {"depth": depth, "width": width})
        self.input_shape = check_input_shape("resnet50", input_shape)
        self.num_classes = num_classes
        self.depth, self.width = depth, width

        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(self.input_shape[0], stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = stem
        layers = []
        for planes, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), BLOCKS[depth], strict=True):
            blocks = []
            for i in range(count):
                blocks.append(Bottleneck(in_planes, scaled(planes, width), stride if i == 0 else 1))
                in_planes = scaled(planes, width) * Bottleneck.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}"
