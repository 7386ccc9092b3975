"""Small models covering the graph patterns the pruning engine must handle (shared by tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGChain(nn.Module):
    """conv-BN-ReLU-pool chain; head: global pool + linear, or flatten of a 2×2 map + linear."""

    def __init__(self, global_pool: bool = True, view_flatten: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(*cbr(3, 8), nn.MaxPool2d(2), *cbr(8, 12), nn.MaxPool2d(2), *cbr(12, 10))
        self.global_pool = global_pool
        self.view_flatten = view_flatten
        self.pool = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
        self.classifier = nn.Linear(10 if global_pool else 10 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        x = x.view(x.size(0), -1) if self.view_flatten else torch.flatten(x, 1)
        return self.classifier(x)


class HiddenFC(nn.Module):
    """conv-BN-ReLU, flatten of a 2×2 map, then linear-BN1d-ReLU-dropout-linear (a hidden FC layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(6)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(6 * 4, 9)
        self.bn1 = nn.BatchNorm1d(9)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 4)
        return self.fc2(self.drop(F.relu(self.bn1(self.fc1(self.flatten(x))))))


class PreActBlock(nn.Module):
    """Pre-activation bottleneck: BN1 reads the trunk (a residual sum) → selection."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 2, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Conv2d(cin, planes * 2, 1, stride=stride, bias=False)
                           if stride != 1 or cin != planes * 2 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


class PreActResNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(8, 4), PreActBlock(8, 4))
        self.layer2 = nn.Sequential(PreActBlock(8, 6, stride=2), PreActBlock(12, 6))
        self.bn = nn.BatchNorm2d(12)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.conv1(x)))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(x.view(x.size(0), -1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetToy(nn.Module):
    """BNs read concatenations (or the stem / a transition output that also feeds one)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(6, 4), DenseLayer(10, 4))
        self.trans1 = Transition(14, 14)
        self.block2 = nn.Sequential(DenseLayer(14, 4), DenseLayer(18, 4))
        self.bn = nn.BatchNorm2d(22)
        self.fc = nn.Linear(22, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.trans1(self.block1(self.conv1(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1)
        return self.fc(torch.flatten(x, 1))


class PostActResNet(nn.Module):
    """ResNet-56-style basic blocks: bn2 feeds the residual add → not prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        x = F.relu(out + x)
        return self.fc(x.mean([2, 3]))


class InputBN(nn.Module):
    """A BatchNorm reading the network input, then an ordinary chain."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 7, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(7)
        self.fc = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.relu(self.bn0(x)))
        x = F.adaptive_max_pool2d(F.relu(self.bn(x)), 1)
        return self.fc(x.flatten(1))


class TwoBNs(nn.Module):
    """One conv feeding two BatchNorms (each gets a selection; the conv keeps its width)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 5, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(8, 5, 1, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        y = self.conv_a(F.relu(self.bn_a(c))) + self.conv_b(F.relu(self.bn_b(c)))
        y = F.relu(self.bn(y)).mean(dim=(-2, -1))
        return self.fc(y)


class Awkward(nn.Module):
    """Patterns that must be refused: sigmoid after a BN, a grouped consumer, a BN as output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_sig = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_grp = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.sigmoid(self.bn_sig(self.conv(x))))
        x = self.dw(F.relu(self.bn_grp(x)))
        x = self.conv3(F.relu(self.bn_dw(x)))
        return self.bn_out(x)


def randomize(model: nn.Module, seed: int = 0, gamma: torch.Tensor | None = None) -> nn.Module:
    """Random γ (uniform), β, running statistics and weights, so that equivalence is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


TOYS = {
    "vgg_global": (lambda: VGGChain(global_pool=True), (3, 8, 8)),
    "vgg_flatten2x2": (lambda: VGGChain(global_pool=False), (3, 8, 8)),
    "vgg_view2x2": (lambda: VGGChain(global_pool=False, view_flatten=True), (3, 8, 8)),
    "hidden_fc": (HiddenFC, (3, 8, 8)),
    "preact": (PreActResNet, (3, 8, 8)),
    "dense": (DenseNetToy, (3, 8, 8)),
    "postact": (PostActResNet, (3, 6, 6)),
    "input_bn": (InputBN, (3, 6, 6)),
    "two_bns": (TwoBNs, (3, 6, 6)),
    "awkward": (Awkward, (3, 6, 6)),
}
