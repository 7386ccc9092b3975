"""Small networks in the styles of the model zoos (timm, pytorchcv), written here so the tests
need no zoo: each family's coupling pattern, at a few channels and 16×16 inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused BatchNorm + activation: a BatchNorm subclass whose forward adds drop and act."""

    def __init__(self, c: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class Head(nn.Module):
    def __init__(self, c: int, n: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(c, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PostActBottleneckNet(nn.Module):
    """ResNet-50 style: bottlenecks whose last BN feeds the residual sum, a projection shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1 = nn.ModuleList([cbr(8, 4, 1), cbr(4, 4), cbr(4, 16, 1, act=False)])
        self.proj = cbr(8, 16, 1, act=False)
        self.b2 = nn.ModuleList([cbr(16, 4, 1), cbr(4, 4), cbr(4, 16, 1, act=False)])
        self.head = Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.b1[2](self.b1[1](self.b1[0](x)))
        x = F.relu(y + self.proj(x))
        y = self.b2[2](self.b2[1](self.b2[0](x)))
        return self.head(F.relu(x + y))


class MobileNetV2ish(nn.Module):
    """Inverted residuals: expand → depthwise → project, fused BN+ReLU6 (timm style), residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.stem_bn = BatchNormAct2d(8, nn.ReLU6)
        self.exp = nn.Conv2d(8, 16, 1, bias=False)
        self.exp_bn = BatchNormAct2d(16, nn.ReLU6)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
        self.dw_bn = BatchNormAct2d(16, nn.ReLU6)
        self.proj = nn.Conv2d(16, 8, 1, bias=False)
        self.proj_bn = nn.BatchNorm2d(8)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_bn(self.stem(x))
        y = self.proj_bn(self.proj(self.dw_bn(self.dw(self.exp_bn(self.exp(x))))))
        return self.head(x + y)


class SEBlockNet(nn.Module):
    """EfficientNet style: SiLU, squeeze-excite gate multiplying the channels, hard-swish by arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 12, act=False)
        self.se_reduce = nn.Conv2d(12, 4, 1)
        self.se_expand = nn.Conv2d(4, 12, 1)
        self.conv2 = cbr(12, 10, act=False)
        self.head = Head(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv(x))
        s = x.mean((2, 3), keepdim=True)
        x = x * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        y = self.conv2(x)
        y = y * F.relu6(y + 3.0) / 6.0  # hard-swish written as arithmetic
        return self.head(y)


class RepVGGish(nn.Module):
    """Branch sums: BN(conv3×3) + BN(conv1×1) + BN(identity), twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.k3 = cbr(8, 8, 3, act=False)
        self.k1 = cbr(8, 8, 1, act=False)
        self.idbn = nn.BatchNorm2d(8)
        self.k3b = cbr(8, 8, 3, act=False)
        self.k1b = cbr(8, 8, 1, act=False)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.k3(x) + self.k1(x) + self.idbn(x))
        x = F.relu(self.k3b(x) + self.k1b(x))
        return self.head(x)


class GhostNetish(nn.Module):
    """Ghost modules: a primary conv plus a cheap depthwise one, concatenated and sliced back."""

    def __init__(self) -> None:
        super().__init__()
        self.primary = cbr(3, 6, 1)
        self.cheap = cbr(6, 6, 3, groups=6)
        self.oup = 10
        self.primary2 = cbr(10, 6, 1)
        self.cheap2 = cbr(6, 6, 3, groups=6)
        self.head = Head(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        x = torch.cat([x1, self.cheap(x1)], 1)[:, : self.oup]
        x1 = self.primary2(x)
        return self.head(torch.cat([x1, self.cheap2(x1)], 1)[:, : self.oup])


class CSPish(nn.Module):
    """Cross-stage partial: split the channels, transform one half, concatenate, chunk again."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.part = nn.Sequential(cbr(8, 8), cbr(8, 8))
        self.fuse = cbr(16, 12, 1)
        self.side = cbr(6, 6)
        self.head = Head(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.stem(x), [8, 8], dim=1)
        x = self.fuse(torch.cat([a, self.part(b)], 1))
        c, d = x.chunk(2, dim=1)
        return self.head(torch.cat([c, self.side(d)], dim=1))


class ShuffleNetish(nn.Module):
    """ShuffleNet V2 units: chunk, a branch, concatenation, channel shuffle (slim freezes the shuffle)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.branch = nn.Sequential(cbr(4, 4, 1), cbr(4, 4, 3, groups=4, act=False), cbr(4, 4, 1))
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(x)


class DenseNetish(nn.Module):
    """Dense connectivity: every layer reads the concatenation of all earlier features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, 1, 1, bias=False)
        self.layers = nn.ModuleList()
        c = 6
        for _ in range(3):
            conv = nn.Conv2d(c, 4, 3, 1, 1, bias=False)
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), conv))
            c += 4
        self.bn = nn.BatchNorm2d(c)
        self.head = Head(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.head(F.relu(self.bn(x)))


class ResNeXtish(nn.Module):
    """Grouped 3×3 convs (groups 2): their channels stay, the rest prunes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.reduce = cbr(8, 8, 1)
        self.grouped = cbr(8, 8, 3, groups=2)
        self.expand = cbr(8, 8, 1, act=False)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(F.relu(x + self.expand(self.grouped(self.reduce(x)))))


class SpatialAttentionNet(nn.Module):
    """CBAM-style spatial gate (N, 1, H, W) from a channel mean, a VGG tail with flatten to a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.gate = nn.Conv2d(1, 1, 3, 1, 1)
        self.b = cbr(8, 6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x = x * torch.sigmoid(self.gate(x.mean(1, keepdim=True)))
        x = F.max_pool2d(self.b(x), 4)
        return self.fc(x.view(x.size(0), -1))


class PreActNet(nn.Module):
    """Pre-activation residuals: BatchNorms read the trunk (a channel selection in auto mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return self.head(F.relu(self.bn(x)))


ZOO: dict[str, type[nn.Module]] = {
    "postact-bottleneck": PostActBottleneckNet,
    "mobilenetv2": MobileNetV2ish,
    "se-hardswish": SEBlockNet,
    "repvgg": RepVGGish,
    "ghostnet": GhostNetish,
    "csp": CSPish,
    "shufflenet": ShuffleNetish,
    "densenet": DenseNetish,
    "resnext": ResNeXtish,
    "spatial-attention": SpatialAttentionNet,
    "preact": PreActNet,
}
SHAPE = (3, 16, 16)


class ShuffleChunkNet(nn.Module):
    """pytorchcv's ShuffleNetV2 order: shuffle, then chunk the shuffled tensor (two rewrites in a row)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.branch = nn.Sequential(cbr(4, 4, 1), cbr(4, 4, 3, groups=4, act=False), cbr(4, 4, 1))
        self.branch2 = nn.Sequential(cbr(4, 4, 1), cbr(4, 4, 1))
        self.head = Head(8)

    @staticmethod
    def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        batch, channels, height, width = x.size()
        x = x.view(batch, groups, channels // groups, height, width)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(batch, channels, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = torch.chunk(x, chunks=2, dim=1)
        x = self.shuffle(torch.cat([a, self.branch(b)], 1), 2)
        a, b = torch.chunk(x, chunks=2, dim=1)
        x = self.shuffle(torch.cat([a, self.branch2(b)], 1), 2)
        return self.head(x)


ZOO["shufflenet-chunk"] = ShuffleChunkNet
