"""MobileNetV2 (Sandler et al., 2018), torchvision's layout and width multiplier.

Inverted residual blocks: conv1×1 expansion (×t) → BN → ReLU6 → depthwise conv3×3 → BN →
ReLU6 → conv1×1 projection → BN (linear bottleneck), plus the identity where stride 1 and
the width are unchanged. Module names are torchvision's (``features.0.0``,
``features.1.conv.0.0``, ``classifier.1``), so a torchvision ``state_dict`` loads with
``strict=True``; at 1000 classes and width 1.0 it has 3,504,872 parameters.

Pruning (``slim inspect`` lists each BatchNorm's status): at least the BatchNorm after each
depthwise conv and the last 1×1 conv's prune; whether those feeding a grouped conv or a residual
sum do depends on the pruning engine's support for channel groups.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimcli.archs import check_input_shape, check_num_classes, init_weights, validate_options
from slimcli.registry import Option, register_arch

#: (expansion t, output channels c, repeats n, first stride s), the paper's Table 2
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's rounding of scaled channels: nearest multiple of ``divisor``, never below 90 %."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ReLU6(nn.Module):
    """min(max(x, 0), 6) through ``F.relu6``: the fx graph then shows a function the pruning
    engine knows maps 0 to 0 (``nn.ReLU6`` is a Hardtanh module it does not list)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """conv (no bias) → BN → ReLU6 (torchvision's Conv2dNormActivation: indices 0, 1, 2)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        ReLU6(),
    )


class InvertedResidual(nn.Module):
    """Expansion (skipped when t = 1) → depthwise → linear projection; identity shortcut when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(in_ch * expand)
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_relu(in_ch, hidden, 1))
        layers += [conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # a Python bool fixed at construction: torch.fx resolves it at trace time
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


@register_arch("mobilenetv2")
class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision layout): conv3×3/2 stem, 17 inverted residual blocks, conv1×1 to 1280,
    global average pool, dropout 0.2, one Linear. ``width`` scales every layer (rounded to a
    multiple of 8; the last conv keeps 1280 below width 1). Downsamples 32×: made for 224×224.
    """

    options: ClassVar[tuple[Option, ...]] = (
        Option("width", float, 1.0, "width multiplier (channels rounded to multiples of 8)",
               check=lambda w: w > 0, rule="width > 0"),
    )
    test_spec: ClassVar[str] = "mobilenetv2:width=0.25"

    def __init__(
        self, num_classes: int = 1000, input_shape: tuple[int, int, int] = (3, 224, 224), width: float = 1.0,
    ) -> None:
        super().__init__()
        check_num_classes("mobilenetv2", num_classes)
        validate_options(type(self), {"width": width})
        self.input_shape = check_input_shape("mobilenetv2", input_shape)
        self.num_classes = num_classes
        self.width = width

        in_ch = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [conv_bn_relu(self.input_shape[0], in_ch, 3, stride=2)]
        for t, c, n, s in SETTINGS:
            out_ch = make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(conv_bn_relu(in_ch, last, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        init_weights(self)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                # He-normal over the true fan-out of a grouped conv: out/groups·k·k (kaiming_normal_
                # would count all out_channels and start depthwise convs √groups too small)
                fan_out = m.out_channels // m.groups * math.prod(m.kernel_size)
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        return f"width={self.width}"
