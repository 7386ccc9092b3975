"""Architecture contract, checked on every registered architecture, plus exact built-in sizes.

Contract tests use the class's cheap ``test_spec`` variant when it declares one (so the
suite stays fast) and the plugin's default options otherwise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimcli.testing
from slimcli.archs import create_arch
from slimcli.archs.resnet164 import ResNet164
from slimcli.archs.vgg import VGG
from slimcli.errors import UsageError
from slimcli.measure import count_params
from slimcli.registry import ARCHS
from slimcli.testing import (
    ARCH_SHAPES,
    check_arch,
    check_arch_forward,
    check_arch_init,
    check_arch_onnx,
    check_arch_prune,
    check_arch_rebuild,
    check_arch_stem,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = list(ARCH_SHAPES)
#: the cheap variant of every registered arch, plus built-in options the defaults don't reach
SPECS = [getattr(info.cls, "test_spec", info.name) for info in ARCHS] + ["resnet56:depth=8,shortcut=B"]


def bn_count(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


# --- the contract, on every registered architecture (slimcli.testing, as plugins run it) ---------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec", SPECS)
def test_forward_and_fx_trace_agree(spec: str, shape: tuple[int, int, int]) -> None:
    check_arch_forward(spec, shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec", SPECS)
def test_onnx_export_matches_pytorch(spec: str, shape: tuple[int, int, int]) -> None:
    pytest.importorskip("onnxruntime")
    check_arch_onnx(spec, shape)


@pytest.mark.parametrize("spec", SPECS)
def test_initialisation_and_no_conv_bias_before_bn(spec: str) -> None:
    check_arch_init(spec)


@pytest.mark.parametrize("spec", SPECS)
def test_input_shape_changes_only_the_stem(spec: str) -> None:
    check_arch_stem(spec)


@pytest.mark.parametrize("spec", SPECS)
def test_rebuild_loads_state_dict_strictly(spec: str) -> None:
    # checkpoints are loaded by rebuilding the arch from its spec: names and shapes must be stable
    check_arch_rebuild(spec)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec", SPECS)
def test_prunes_to_masked_dense_and_rebuilds_from_widths(spec: str, shape: tuple[int, int, int]) -> None:
    # random γ and β, ratios 0.3 and 0.7 (tests/test_prune_archs.py adds more ratios and seeds)
    check_arch_prune(spec, shape=shape)


def test_check_arch_is_exactly_the_checks_above(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_arch (what a plugin calls) runs every check the tests above run, on every shape.

    The tests above run the parts one by one, so that a failure names its check; this one
    shows their sum is check_arch, without running everything twice.
    """
    calls: list[tuple[str, tuple]] = []
    for name in ("forward", "onnx", "prune", "init", "stem", "rebuild"):
        def spy(spec: str, *args: object, _name: str = name, **kwargs: object) -> None:
            calls.append((_name, (*args, *kwargs.values())))
        monkeypatch.setattr(slimcli.testing, f"check_arch_{name}", spy)
    check_arch("vgg:depth=11")
    assert sorted(calls) == sorted(
        [("forward", (s,)) for s in SHAPES] + [("onnx", (s,)) for s in SHAPES]
        + [("prune", (s,)) for s in SHAPES] + [("init", ()), ("stem", ()), ("rebuild", ())]
    )


# --- exact sizes of the built-ins -------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "classes", "params"),
    [
        ("vgg19", 10, 20_035_018),
        ("vgg19", 100, 20_081_188),
        ("resnet164", 10, 1_703_258),
        ("resnet164", 100, 1_726_388),
        ("densenet40", 10, 1_019_722),
        ("densenet40", 100, 1_060_132),
        ("densenet40:stem=24", 10, 1_059_298),
        ("densenet40:stem=24", 100, 1_100_428),
        ("resnet56", 10, 853_018),
        ("resnet20", 10, 269_722),
    ],
)
def test_parameter_counts(spec: str, classes: int, params: int) -> None:
    assert count_params(create_arch(spec, num_classes=classes)) == params


def test_bn_channel_counts() -> None:
    assert bn_count(create_arch("vgg19")) == 5_504
    assert bn_count(create_arch("resnet164")) == 12_112
    assert bn_count(create_arch("densenet40:stem=24")) == 9_360


def test_fashion_mnist_shape_changes_only_stem_parameters() -> None:
    # conv3×3 3→64 becomes 1→64: 2·64·9 parameters fewer, nothing else
    assert count_params(create_arch("vgg19", 10, (1, 28, 28))) == 20_035_018 - 2 * 64 * 9


def test_readable_layer_names() -> None:
    names = dict(create_arch("resnet164:depth=20").named_modules())
    for name in ["stem", "stage1.0.bn1", "stage1.0.conv3", "stage2.0.shortcut", "bn", "fc"]:
        assert name in names
    vgg = dict(create_arch("vgg11").named_modules())
    assert isinstance(vgg["features.0"], nn.Conv2d) and isinstance(vgg["features.1"], nn.BatchNorm2d)
    assert isinstance(vgg["classifier"], nn.Linear)


def test_vgg_width_multiplier_rounds_and_keeps_one_channel() -> None:
    half = create_arch("vgg16:width=0.5")
    convs = [m for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:3]] == [32, 32, 64]
    assert half.classifier.in_features == 256
    tiny = create_arch("vgg11:width=0.001")
    assert all(m.out_channels == 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_aliases_preset_depth() -> None:
    assert ARCHS.parse("vgg16").options == {"depth": 16, "width": 1.0}
    assert ARCHS.parse("vgg13:width=0.5").options == {"depth": 13, "width": 0.5}
    assert ARCHS.parse("resnet110").options["depth"] == 110
    assert isinstance(create_arch("vgg11"), VGG)


# --- option and input validation --------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet164:depth=50", r"depth must be 9n\+2"),
        ("densenet40:depth=41", r"depth must be 3n\+4"),
        ("resnet56:depth=57", r"depth must be 6n\+2"),
        ("vgg:depth=12", r"one of 11, 13, 16, 19"),
        ("vgg:width=0", r"width > 0"),
        ("vgg19:width=-0.5", r"width > 0"),
        ("resnet56:shortcut=C", r"one of A, B"),
        ("densenet40:growth=0", r"growth >= 1"),
        ("vgg:depth=abc", r"must be one of 11"),
        ("resnet164:size=3", r"unknown option 'size'"),
        ("resnet165", r"unknown arch"),
    ],
)
def test_bad_options_are_usage_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        create_arch(spec)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(UsageError, match=r"9n\+2"):
        ResNet164(10, (3, 32, 32), depth=50)
    with pytest.raises(UsageError, match="width > 0"):
        VGG(10, (3, 32, 32), width=0.0)


def test_bad_classes_and_input_shapes() -> None:
    with pytest.raises(UsageError, match="num_classes"):
        create_arch("vgg11", num_classes=1)
    with pytest.raises(UsageError, match="input_shape"):
        create_arch("vgg11", input_shape=(32, 32))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="at least 16×16"):
        create_arch("vgg19", input_shape=(3, 8, 8))
