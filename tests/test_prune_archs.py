"""Pruning every registered architecture (small variants): the invariants that matter to users."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from slimcli.archs import create_arch
from slimcli.errors import PruneError
from slimcli.prune import ChannelSelection, compute_keep, masked_dense, prunable_bns, prune_model
from slimcli.registry import ARCHS
from slimcli.testing import check_arch_prune, randomize_batchnorms

SHAPE = (3, 32, 32)
SPECS = [getattr(info.cls, "test_spec", info.name) for info in ARCHS]

pytestmark = pytest.mark.usefixtures("one_thread")


def build(spec: str, seed: int = 0, gammas: str = "rand") -> nn.Module:
    """A dense model in float64 eval mode with random γ, β and running statistics.

    slimcli.testing.randomize_batchnorms, as check_arch_prune uses: distinct |γ| in [0.05, 1]
    with random signs.
    """
    torch.manual_seed(seed)
    model = randomize_batchnorms(create_arch(spec, 10, SHAPE).double().eval(), seed)
    g = torch.Generator().manual_seed(seed)
    if gammas == "emptying":  # the first BN that prunes alone: its |γ| far below everyone else's
        first = next(n for n, b in prunable_bns(model, coupling="select").items() if b.prunable)
        with torch.no_grad():
            bn = model.get_submodule(first)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) * 1e-6)
        model.emptied_bn = first
    return model


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_every_arch_is_covered() -> None:
    assert {"vgg", "resnet164", "densenet40", "resnet56"} <= set(ARCHS.names())
    assert len(SPECS) == len(ARCHS.names())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7])
def test_slim_equals_masked_dense_and_rebuilds_from_widths(spec: str, ratio: float) -> None:
    """slimcli.testing.check_arch_prune (what plugins run), at more ratios and seeds than its default.

    slim == masked dense to rtol = atol = 1e-5 (float64), fewer channels, and the widths alone
    rebuild the structure: same params, a strict state_dict load, exactly the same output.
    """
    check_arch_prune(spec, ratios=(ratio,), seed=int(ratio * 10), shape=SHAPE)


@pytest.mark.parametrize("spec", SPECS)
def test_an_emptied_layer_keeps_its_strongest_channel(spec: str) -> None:
    model = build(spec, gammas="emptying")
    with pytest.raises(PruneError, match=model.emptied_bn.replace(".", r"\.")):
        compute_keep(model, "ratio", 0.3, min_channels=0, coupling="select")
    plan = compute_keep(model, "ratio", 0.3, coupling="select")
    assert plan.min_channels_bit[model.emptied_bn] == (0, 1)
    slim, report = prune_model(model, plan)
    assert report.widths[model.emptied_bn] == 1
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked_dense(model, plan)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_only_producers_of_pruned_bns_lose_output_channels(spec: str) -> None:
    model = build(spec)
    bns = prunable_bns(model)
    slim, report = prune_model(model, compute_keep(model, "ratio", 0.5, bns=bns))
    producers = {b.producer: n for n, b in bns.items() if b.prunable and b.producer}
    for name, m in model.named_modules():
        if isinstance(m, _ConvNd):
            narrowed = slim.get_submodule(name).out_channels
            expected = report.widths[producers[name]] if name in producers else m.out_channels
            assert narrowed == expected, name
    # selections sit exactly in front of the BNs that read shared tensors
    selections = {n.removesuffix("_select") for n, m in slim.named_modules()
                  if isinstance(m, ChannelSelection)}
    assert selections == {n for n, b in bns.items()
                          if b.prunable and b.needs_selection and report.widths[n] < b.channels}


def test_preactivation_resnet_and_densenet_keep_their_trunk() -> None:
    for spec in ("resnet164:depth=11", "densenet40:depth=7,growth=4,stem=8"):
        model = build(spec)
        bns = prunable_bns(model)
        assert all(b.prunable for b in bns.values()), spec
        slim, _ = prune_model(model, compute_keep(model, "ratio", 0.7, bns=bns))
        trunk = [n for n, m in model.named_modules() if isinstance(m, _ConvNd)
                 and (n == "stem" or n.endswith(("conv3", "shortcut")) or spec.startswith("densenet"))]
        assert trunk
        for name in trunk:
            assert slim.get_submodule(name).out_channels == model.get_submodule(name).out_channels, name


def test_post_activation_resnet56_residual_bns_form_groups() -> None:
    model = build("resnet56:depth=8")
    alone = prunable_bns(model, coupling="select")  # each BN alone: the residual ones cannot shrink
    for name, b in alone.items():
        if name.endswith("bn2") or name == "bn1":
            assert not b.prunable and "residual sum" in b.reason, name
        else:
            assert b.prunable and b.producer == name.replace("bn", "conv"), name
    joint = prunable_bns(model)  # --coupling auto: the residual BNs of a stage are pruned together
    for name, b in joint.items():
        assert b.prunable, name
        assert (b.group is not None) == (name.endswith("bn2") or name == "bn1"), name


@pytest.mark.parametrize("spec", SPECS)
def test_slim_model_exports_to_onnx(spec: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = build(spec).float()
    slim, _ = prune_model(model, compute_keep(model, "ratio", 0.5))
    x = inputs().float()
    buf = io.BytesIO()
    torch.onnx.export(slim, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    (got,) = ort.InferenceSession(buf.getvalue()).run(None, {"x": x[:1].numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), slim(x[:1]), rtol=1e-4, atol=1e-5)
