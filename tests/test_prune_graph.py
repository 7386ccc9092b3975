"""Graph analysis: which BatchNorms are prunable, through what, and why not."""

from __future__ import annotations

import pytest
import torch
from _prune_toys import TOYS, PreActResNet
from torch import nn

from slimcli.errors import PruneError
from slimcli.prune import prunable_bns

pytestmark = pytest.mark.usefixtures("one_thread")


def bns_of(name: str, coupling: str = "auto"):
    ctor, shape = TOYS[name]
    return prunable_bns(ctor(), shape, coupling=coupling)


def test_vgg_chain_narrows_producers_and_consumers() -> None:
    bns = bns_of("vgg_global")
    assert list(bns) == ["features.1", "features.5", "features.9"]
    assert all(b.prunable and not b.needs_selection for b in bns.values())
    assert [b.producer for b in bns.values()] == ["features.0", "features.4", "features.8"]
    assert [b.consumers for b in bns.values()] == [("features.4",), ("features.8",), ("classifier",)]


def test_flatten_of_a_2x2_map_feeds_the_linear() -> None:
    for toy in ("vgg_flatten2x2", "vgg_view2x2"):
        last = bns_of(toy)["features.9"]
        assert last.prunable and last.consumers == ("classifier",)


def test_hidden_fc_with_batchnorm1d() -> None:
    bns = bns_of("hidden_fc")
    assert bns["bn"].consumers == ("fc1",) and bns["bn"].producer == "conv"
    assert bns["bn1"].kind == "BatchNorm1d"
    assert bns["bn1"].producer == "fc1" and bns["bn1"].consumers == ("fc2",)


def test_preactivation_bn_reading_the_trunk_needs_a_selection() -> None:
    bns = bns_of("preact")
    assert all(b.prunable for b in bns.values())
    for name, b in bns.items():
        reads_trunk = name.endswith("bn1") or name == "bn"
        assert b.needs_selection == reads_trunk, name
        assert (b.producer is None) == reads_trunk, name
    assert "residual sum" in bns["layer1.1.bn1"].reads
    assert bns["bn"].consumers == ("fc",)


def test_densenet_bns_read_concatenations() -> None:
    bns = bns_of("dense")
    assert all(b.prunable and b.needs_selection for b in bns.values())
    assert "concatenation" in bns["block1.1.bn"].reads
    assert bns["trans1.bn"].consumers == ("trans1.conv",)


def test_postactivation_bns_feeding_an_add_form_a_group() -> None:
    bns = bns_of("postact")
    assert bns["bn1"].prunable and bns["bn1"].producer == "conv1" and bns["bn1"].group is None
    for name in ("bn", "bn2"):  # the stem BN's ReLU output is the first residual
        assert bns[name].prunable and bns[name].group == "bn" and not bns[name].needs_selection
    # --coupling select: each BN alone, so the two summands cannot shrink
    alone = bns_of("postact", "select")
    assert alone["bn1"].prunable
    for name in ("bn", "bn2"):
        assert not alone[name].prunable
        assert "residual sum" in alone[name].reason and "--coupling" in alone[name].reason


def test_bn_reading_the_network_input() -> None:
    b = bns_of("input_bn")["bn0"]
    assert b.prunable and b.needs_selection and "network input" in b.reads


def test_conv_feeding_two_bns_couples_them_or_gives_each_a_selection() -> None:
    joint = bns_of("two_bns")  # auto: one conv output read by two BNs is one group, no gather
    assert joint["bn_a"].group == joint["bn_b"].group == "bn_a"
    assert not joint["bn_a"].needs_selection and not joint["bn_b"].needs_selection
    bns = bns_of("two_bns", "select")
    for name in ("bn_a", "bn_b"):
        assert bns[name].prunable and bns[name].needs_selection and "also used elsewhere" in bns[name].reads
    assert bns["bn_a"].consumers == ("conv_a",) and bns["bn_b"].consumers == ("conv_b",)
    assert bns["bn"].needs_selection  # reads the sum of the two branches


def test_refused_patterns_name_the_reason() -> None:
    bns = bns_of("awkward")
    assert not bns["bn_sig"].prunable and "sigmoid" in bns["bn_sig"].reason
    assert not bns["bn_out"].prunable and "model output" in bns["bn_out"].reason
    # a depthwise conv ties its input and output channels: the BNs on both sides go together
    assert bns["bn_grp"].prunable and bns["bn_dw"].prunable
    assert bns["bn_grp"].group == bns["bn_dw"].group == "bn_grp"
    assert not bns["bn_dw"].needs_selection


def test_shared_relu_module_is_fine_but_shared_weights_are_not() -> None:
    class SharedConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv0 = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(torch.relu(self.bn(self.conv0(x)))))

    b = prunable_bns(SharedConv(), (3, 4, 4))["bn"]
    assert not b.prunable and "called 2 times" in b.reason
    # PreActResNet calls one self.relu three times per block
    assert all(b.prunable for b in prunable_bns(PreActResNet(), (3, 8, 8)).values())


def test_bn_without_affine_and_bn_never_called() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4, affine=False)
            self.unused = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    bns = prunable_bns(M(), (3, 4, 4))
    assert not bns["bn"].prunable and "affine" in bns["bn"].reason
    assert not bns["unused"].prunable and "never called" in bns["unused"].reason


def test_hard_coded_reshape_is_recognised_and_other_reshapes_refused() -> None:
    class M(nn.Module):
        def __init__(self, hard: bool) -> None:
            super().__init__()
            self.hard = hard
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(16 if hard else 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn(self.conv(x)))
            if self.hard:
                return self.fc(x.view(-1, 16))  # a flatten with the size baked in
            return self.fc(x.view(x.size(0), 4, 4).sum(1))  # a sum over the channels

    hard = prunable_bns(M(True), (3, 2, 2))["bn"]
    assert hard.prunable and hard.consumers == ("fc",)
    mixed = prunable_bns(M(False), (3, 2, 2))["bn"]
    assert not mixed.prunable and ".sum()" in mixed.reason


def test_analysis_does_not_touch_the_model() -> None:
    model = PreActResNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunable_bns(model, (3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_input_shape_errors() -> None:
    with pytest.raises(PruneError, match="input_shape"):
        prunable_bns(PreActResNet())
    with pytest.raises(PruneError, match="does not run"):
        prunable_bns(PreActResNet(), (4, 8, 8))
    model = PreActResNet()
    model.input_shape = (3, 8, 8)  # the attribute every built-in architecture carries
    assert len(prunable_bns(model)) == 13


def test_untraceable_model_is_a_prune_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x) if x.sum() > 0 else x

    with pytest.raises(PruneError, match="cannot trace"):
        prunable_bns(Branchy(), (3, 2, 2))
