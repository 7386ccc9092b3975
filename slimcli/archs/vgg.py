"""VGG for CIFAR as in network slimming (Liu et al., 2017): BN after every conv, one Linear."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from slimcli.archs import check_input_shape, check_num_classes, init_weights, validate_options
from slimcli.registry import Option, register_arch

#: Channel plan per depth; "M" is a 2×2 max-pool. The final pool is adaptive (see VGG).
CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 1."""
    return max(1, round(channels * width))


@register_arch("vgg", aliases={f"vgg{d}": {"depth": d} for d in CFGS})
class VGG(nn.Module):
    """VGG-11/13/16/19 with BatchNorm, global average pool and one Linear (network slimming).

    ``features`` is a Sequential of conv3×3 (no bias) → BN → ReLU triples and 2×2 max-pools
    (module names ``features.0``, ``features.1``, …); ``classifier`` is the only Linear.
    For 32×32 inputs the adaptive pool equals the reference's 2×2 average pool.
    """

    options: ClassVar[tuple[Option, ...]] = (
        Option("depth", int, 19, "number of weight layers", choices=tuple(CFGS)),
        Option("width", float, 1.0, "channel multiplier (channels rounded, at least 1)",
               check=lambda w: w > 0, rule="width > 0"),
    )
    #: a cheap variant for the contract tests
    test_spec: ClassVar[str] = "vgg:depth=11,width=0.125"

    def __init__(
        self, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32),
        depth: int = 19, width: float = 1.0,
    ) -> None:
        super().__init__()
        check_num_classes("vgg", num_classes)
        validate_options(type(self), {"depth": depth, "width": width})
        cfg = CFGS[depth]
        # each max-pool halves the image (floor); the last feature map must keep ≥ 1 pixel
        pools = sum(1 for c in cfg if c == "M")
        self.input_shape = check_input_shape("vgg", input_shape, min_size=2**pools)
        self.num_classes = num_classes
        self.depth, self.width = depth, width

        layers: list[nn.Module] = []
        in_ch = self.input_shape[0]
        for c in cfg:
            if c == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_ch = scaled(int(c), width)
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                       nn.ReLU(inplace=True)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}"
