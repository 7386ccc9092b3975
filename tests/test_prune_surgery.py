"""Channel surgery on toy models: slim == masked dense, widths rebuild the structure, ONNX parity."""

from __future__ import annotations

import io

import pytest
import torch
from _prune_toys import TOYS, PreActResNet, VGGChain, randomize
from torch import nn
from torch.fx import GraphModule

from slimcli.errors import PruneError
from slimcli.measure import count_params
from slimcli.prune import (
    ChannelSelection,
    apply_widths,
    compute_keep,
    masked_dense,
    prunable_bns,
    prune_model,
)

PRUNABLE_TOYS = [name for name in TOYS if name != "awkward"] + ["awkward"]

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...], torch.Tensor]:
    ctor, shape = TOYS[name]
    model = randomize(ctor(), seed).double().eval()
    x = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return model, shape, x


@pytest.mark.parametrize("name", PRUNABLE_TOYS)
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7])
def test_slim_equals_masked_dense(name: str, ratio: float) -> None:
    model, shape, x = setup(name)
    plan = compute_keep(model, "ratio", ratio, input_shape=shape)
    slim, report = prune_model(model, plan)
    assert isinstance(slim, GraphModule)
    with torch.no_grad():
        expected = masked_dense(model, plan)(x)
        torch.testing.assert_close(slim(x), expected, rtol=1e-5, atol=1e-5)
    assert report.widths == plan.widths
    assert report.params_after == count_params(slim) < report.params_before == count_params(model)
    # the dense model is untouched
    assert all(b.num_features == m.num_features for b, m in zip(
        [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)],
        [m for m in TOYS[name][0]().modules() if isinstance(m, nn.BatchNorm2d)], strict=True))


@pytest.mark.parametrize("name", PRUNABLE_TOYS)
def test_widths_rebuild_the_structure_and_load_strictly(name: str) -> None:
    model, shape, x = setup(name)
    slim, report = prune_model(model, compute_keep(model, "ratio", 0.5, input_shape=shape))
    state = slim.state_dict()
    rebuilt = apply_widths(TOYS[name][0]().double(), report.widths, input_shape=shape)
    assert count_params(rebuilt) == count_params(slim)
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), slim(x))
    # surviving modules keep their dense names; the only new keys are selection indices
    extra = set(state) - set(model.state_dict())
    assert all(k.endswith("_select.indices") for k in extra)
    assert set(model.state_dict()) <= set(state)
    selections = [n for n, m in slim.named_modules() if isinstance(m, ChannelSelection)]
    bns = prunable_bns(model, shape)
    assert sorted(s.removesuffix("_select") for s in selections) == sorted(
        n for n, b in bns.items() if b.prunable and b.needs_selection and report.widths[n] < b.channels)


def test_trunk_keeps_its_width_in_preact_and_dense() -> None:
    trunk = {"preact": ["conv1", "layer1.0.conv3", "layer2.1.conv3", "layer2.0.downsample"],
             "dense": ["conv1", "block1.0.conv", "trans1.conv", "block2.1.conv"]}
    for name, trunk_writers in trunk.items():
        model, shape, _ = setup(name)
        slim, _ = prune_model(model, compute_keep(model, "ratio", 0.7, input_shape=shape))
        for conv in trunk_writers:
            assert slim.get_submodule(conv).out_channels == model.get_submodule(conv).out_channels, conv


def test_flatten_block_expansion_keeps_whole_hw_blocks() -> None:
    model, shape, x = setup("vgg_view2x2")
    masks = {"features.9": torch.tensor([True, False, False, True, False, True, False, False, False, True])}
    slim, _ = prune_model(model, masks, input_shape=shape)
    fc_dense, fc_slim = model.classifier.weight, slim.get_submodule("classifier").weight
    assert fc_slim.shape == (5, 4 * 4)
    cols = torch.cat([torch.arange(c * 4, c * 4 + 4) for c in (0, 3, 5, 9)])
    assert torch.equal(fc_slim, fc_dense[:, cols])
    assert "view" not in slim.code and "torch.flatten" in slim.code  # no baked-in sizes remain
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked_dense(model, masks)(x))


def test_selection_indices_are_buffers_not_params() -> None:
    model, shape, _ = setup("dense")
    slim, report = prune_model(model, compute_keep(model, "ratio", 0.5, input_shape=shape))
    sel = slim.get_submodule("trans1.bn_select")
    assert isinstance(sel, ChannelSelection) and sel.indices.dtype == torch.long
    assert sel.indices.numel() == report.widths["trans1.bn"]
    assert not any(n.endswith("indices") for n, _ in slim.named_parameters())
    assert torch.all(sel.indices[1:] > sel.indices[:-1])


def test_repruning_a_slim_model_composes_selections() -> None:
    model, shape, x = setup("preact")
    slim, _ = prune_model(model, compute_keep(model, "ratio", 0.3, input_shape=shape))
    plan = compute_keep(slim, "ratio", 0.3, input_shape=shape)
    slimmer, report = prune_model(slim, plan)
    # one selection per BN at most: the second round composes indices instead of stacking layers
    selections = [n for n, m in slimmer.named_modules() if isinstance(m, ChannelSelection)]
    readers = {n for n, b in prunable_bns(model, shape).items() if b.needs_selection}
    assert selections and all(s.removesuffix("_select") in readers for s in selections)
    for n in selections:
        assert slimmer.get_submodule(n).indices.numel() == report.widths[n.removesuffix("_select")]
    with torch.no_grad():
        torch.testing.assert_close(slimmer(x), masked_dense(slim, plan)(x), rtol=1e-5, atol=1e-5)
    rebuilt = apply_widths(slim, report.widths, input_shape=shape)
    rebuilt.load_state_dict(slimmer.state_dict(), strict=True)


def test_training_mode_devices_and_grad_flags_are_kept() -> None:
    model = randomize(VGGChain()).train()
    model.features[0].weight.requires_grad_(False)
    slim, _ = prune_model(model, compute_keep(model, "ratio", 0.5, input_shape=(3, 8, 8)))
    assert slim.training
    assert not slim.get_submodule("features.0").weight.requires_grad
    assert slim.get_submodule("features.4").weight.requires_grad
    out = slim(torch.randn(4, 3, 8, 8))  # trains: BN batch statistics, gradients flow
    out.sum().backward()
    assert slim.get_submodule("features.1").weight.grad is not None
    frozen, _ = prune_model(model.eval(), compute_keep(model, "ratio", 0.5, input_shape=(3, 8, 8)))
    assert not any(m.training for m in frozen.modules())


def test_mask_validation_errors() -> None:
    model, shape, _ = setup("postact")
    with pytest.raises(PruneError, match="coupled"):  # bn2's channels are summed with bn's
        prune_model(model, {"bn2": torch.tensor([True] * 7 + [False])}, input_shape=shape)
    with pytest.raises(PruneError, match="residual sum"):
        prune_model(model, {"bn2": torch.tensor([True] * 7 + [False])}, input_shape=shape, coupling="select")
    with pytest.raises(PruneError, match="every channel of bn1"):
        prune_model(model, {"bn1": torch.zeros(6, dtype=torch.bool)}, input_shape=shape)
    with pytest.raises(PruneError, match="has 6 channels"):
        prune_model(model, {"bn1": torch.ones(5, dtype=torch.bool)}, input_shape=shape)
    with pytest.raises(PruneError, match="not a BatchNorm"):
        prune_model(model, {"fc": torch.ones(3, dtype=torch.bool)}, input_shape=shape)
    # an all-True mask on a non-prunable BN is allowed (nothing changes)
    _, report = prune_model(model, {"bn2": torch.ones(8, dtype=torch.bool)}, input_shape=shape)
    assert report.widths == {"bn": 8, "bn1": 6, "bn2": 8} and report.params_after == report.params_before
    full = {"bn2": torch.ones(8, dtype=torch.bool)}
    _, report = prune_model(model, full, input_shape=shape, coupling="select")
    assert report.widths == {"bn1": 6} and report.params_after == report.params_before


def test_masked_dense_takes_the_masks_prune_model_takes() -> None:
    # a (1, C) mask or a float 0/1 mask (the reference code's cfg_mask) used to crash masked_dense
    # with an IndexError while prune_model accepted it
    model, shape, x = setup("vgg_flatten2x2")
    name = next(n for n, b in prunable_bns(model, shape).items() if b.prunable)
    channels = model.get_submodule(name).num_features
    keep = torch.arange(channels) % 3 != 0
    for form in (keep[None], keep.double(), keep.tolist()):
        slim, _ = prune_model(model, {name: form}, input_shape=shape)
        with torch.no_grad():
            torch.testing.assert_close(slim(x), masked_dense(model, {name: form})(x), atol=1e-10, rtol=0)
    with pytest.raises(PruneError, match="masks and model do not match"):
        masked_dense(model, {name: torch.ones(channels + 1, dtype=torch.bool)})
    with pytest.raises(PruneError, match="not a BatchNorm"):
        masked_dense(model, {"nope": torch.ones(3, dtype=torch.bool)})


def test_apply_widths_errors() -> None:
    model = PreActResNet()
    with pytest.raises(PruneError, match="do not match"):
        apply_widths(model, {"layer9.bn": 3}, input_shape=(3, 8, 8))
    with pytest.raises(PruneError, match=r"1\.\.4"):
        apply_widths(model, {"layer1.0.bn2": 0}, input_shape=(3, 8, 8))
    with pytest.raises(PruneError, match=r"1\.\.4"):
        apply_widths(model, {"layer1.0.bn2": 5}, input_shape=(3, 8, 8))
    full = apply_widths(model, {"layer1.0.bn2": 4}, input_shape=(3, 8, 8))
    full.load_state_dict(model.state_dict(), strict=True)  # full widths: the dense structure


def test_report_lists_every_bn() -> None:
    model, shape, _ = setup("postact")
    _, report = prune_model(model, compute_keep(model, "ratio", 0.5, input_shape=shape, coupling="select"))
    rows = {r.name: r for r in report.layers}
    assert set(rows) == {"bn", "bn1", "bn2"}
    assert not rows["bn2"].prunable and rows["bn2"].kept == 8 and "residual" in rows["bn2"].reason
    assert rows["bn1"].kept == report.widths["bn1"] < 6
    d = report.as_dict()
    assert d["rule"] == "ratio" and d["widths"] == report.widths and len(d["layers"]) == 3


@pytest.mark.parametrize("name", ["vgg_view2x2", "preact", "dense", "hidden_fc", "two_bns"])
def test_onnx_export_matches_pytorch(name: str, tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    ctor, shape = TOYS[name]
    model = randomize(ctor()).eval()
    slim, _ = prune_model(model, compute_keep(model, "ratio", 0.5, input_shape=shape))
    x = torch.randn(2, *shape)
    buf = io.BytesIO()
    # output_names must be given: torch's dynamic_axes check otherwise mistakes GraphModule.graph
    torch.onnx.export(slim, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    session = onnxruntime.InferenceSession(buf.getvalue())
    x5 = torch.randn(5, *shape)
    (got,) = session.run(None, {"x": x5.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), slim(x5), rtol=1e-4, atol=1e-5)


def test_apply_widths_works_on_the_meta_device() -> None:
    # slim inspect builds many slim structures on a weightless twin of the model
    model, shape, _ = setup("dense")
    slim, report = prune_model(model, compute_keep(model, "ratio", 0.5, input_shape=shape))
    twin = apply_widths(TOYS["dense"][0]().to("meta"), report.widths, input_shape=shape)
    shapes = {k: v.shape for k, v in slim.state_dict().items()}
    assert {k: v.shape for k, v in twin.state_dict().items()} == shapes
    assert all(p.is_meta for p in twin.parameters())
