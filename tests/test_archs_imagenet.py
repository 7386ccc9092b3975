"""ImageNet-size built-ins: exact parameter counts (torchvision's), layout, width options.

The arch contract itself (forward, fx, ONNX, pruning, init, stem, rebuild) runs on their cheap
``test_spec`` variants in tests/test_archs.py, like every registered arch. No forward here runs
at 224×224: parameter counts do not need one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimcli.archs import create_arch
from slimcli.archs.mobilenetv2 import make_divisible
from slimcli.errors import UsageError
from slimcli.measure import count_params
from slimcli.prune import compute_keep
from slimcli.registry import ARCHS
from slimcli.testing import prunable_bns, randomize_batchnorms

IMAGENET = (3, 224, 224)


@pytest.mark.parametrize(
    ("spec", "classes", "params"),
    [
        # torchvision.models.resnet50 / resnet101 / resnet152 / mobilenet_v2 (weights=None)
        ("resnet50", 1000, 25_557_032),
        ("resnet101", 1000, 44_549_160),
        ("resnet152", 1000, 60_192_808),
        ("mobilenetv2", 1000, 3_504_872),
        # 10 classes: the fc / classifier shrinks by (1000 − 10) × (features + 1)
        ("resnet50", 10, 25_557_032 - 990 * 2049),
        ("mobilenetv2", 10, 3_504_872 - 990 * 1281),
    ],
)
def test_parameter_counts_match_torchvision(spec: str, classes: int, params: int) -> None:
    assert count_params(create_arch(spec, num_classes=classes, input_shape=IMAGENET)) == params


def test_torchvision_key_names() -> None:
    r50 = create_arch("resnet50", 1000, IMAGENET).state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.bias",
                "layer4.2.conv3.weight", "layer4.2.bn3.weight", "fc.weight"):
        assert key in r50, key
    assert sum(k.endswith(".conv1.weight") for k in r50) == 16  # 3 + 4 + 6 + 3 bottlenecks
    mb = create_arch("mobilenetv2", 1000, IMAGENET).state_dict()
    for key in ("features.0.0.weight", "features.0.1.weight", "features.1.conv.0.0.weight",
                "features.1.conv.1.weight", "features.2.conv.3.running_mean", "features.18.0.weight",
                "classifier.1.weight"):
        assert key in mb, key
    assert tuple(mb["features.18.0.weight"].shape) == (1280, 320, 1, 1)


def test_mobilenetv2_width_multiplier() -> None:
    assert [make_divisible(c * 0.5) for c in (32, 16, 24, 320)] == [16, 8, 16, 160]
    half = create_arch("mobilenetv2:width=0.5", 1000, IMAGENET)
    convs = [m for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 16
    assert convs[-1].out_channels == 1280  # the last conv keeps 1280 below width 1
    wide = create_arch("mobilenetv2:width=1.4", 1000, IMAGENET)
    assert [m for m in wide.modules() if isinstance(m, nn.Conv2d)][-1].out_channels == 1792
    assert count_params(half) < 3_504_872 < count_params(wide)
    with pytest.raises(UsageError, match="width"):
        create_arch("mobilenetv2:width=0")


def test_resnet50_width_and_depth_options() -> None:
    assert ARCHS.parse("resnet101").options == {"depth": 101, "width": 1.0}
    small = create_arch("resnet50:depth=26,width=0.5", 10, IMAGENET)
    assert small.conv1.out_channels == 32 and small.fc.in_features == 1024
    with pytest.raises(UsageError, match="depth"):
        create_arch("resnet50:depth=34")


def test_depthwise_convs_start_he_normal_over_their_true_fan_out() -> None:
    torch.manual_seed(0)
    model = create_arch("mobilenetv2", 10, (3, 64, 64))
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 17
    big = max(dw, key=lambda m: m.weight.numel())  # 960 × 1 × 3 × 3
    assert abs(big.weight.std().item() / (2 / 9) ** 0.5 - 1) < 0.05


def test_mobilenetv2_which_batchnorms_prune() -> None:
    """At least the BN after every depthwise conv and the last conv's prune (the pruning engine is
    free to do more, e.g. residual-tied groups); the plan only touches prunable layers."""
    model = create_arch("mobilenetv2:width=0.25", 10, (3, 32, 32))
    bns = prunable_bns(model, (3, 32, 32))
    prunable = {name for name, b in bns.items() if b.prunable}
    assert len(bns) == 52
    assert {"features.18.1", *(f"features.{i}.conv.1.1" for i in range(2, 18))} <= prunable
    plan = compute_keep(randomize_batchnorms(model), "ratio", 0.3, input_shape=(3, 32, 32))
    assert plan.widths and set(plan.widths) <= prunable
