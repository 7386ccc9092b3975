"""Re-forming a slim model (slim export --target): unprune == masked dense, every form == the slim model."""

from __future__ import annotations

import pytest
import torch
from _prune_toys import TOYS, PreActResNet, randomize
from torch import nn

from slimcli.errors import PruneError
from slimcli.prune import ChannelSelection, compute_keep, masked_dense, prune_model
from slimcli.prune.reform import form_summary, reform, unprune

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_NAMES = list(TOYS)


def slim_of(name: str, ratio: float = 0.5, **kw):
    ctor, shape = TOYS[name]
    dense = randomize(ctor(), 0).eval()
    plan = compute_keep(dense, "ratio", ratio, input_shape=shape)
    slim, _ = prune_model(dense, plan, input_shape=shape, **kw)
    return dense, plan, slim.eval(), shape


def _x(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(4, *shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", TOY_NAMES)
def test_unprune_is_the_masked_dense_model(name: str) -> None:
    dense, plan, slim, shape = slim_of(name)
    masked = unprune(slim, TOYS[name][0](), input_shape=shape)
    with torch.no_grad():
        want = masked_dense(dense, plan)(_x(shape))
        torch.testing.assert_close(masked(_x(shape)), want, rtol=1e-5, atol=1e-5)
    # the removed channels are zeros, the kept ones the slim model's own values
    for bn_name, mask in plan.masks.items():
        bn = masked.get_submodule(bn_name)
        assert torch.all(bn.weight[~mask] == 0) and torch.all(bn.bias[~mask] == 0)
        assert torch.equal(bn.weight[mask], dense.get_submodule(bn_name).weight[mask])


@pytest.mark.parametrize("name", TOY_NAMES)
@pytest.mark.parametrize("selections", ["gather", "zero", "auto"])
@pytest.mark.parametrize("pad", [1, 4])
def test_every_form_computes_the_slim_model(name: str, selections: str, pad: int) -> None:
    _, _, slim, shape = slim_of(name)
    new, report = reform(slim, TOYS[name][0](), selections=selections, pad_to=pad, input_shape=shape)
    with torch.no_grad():
        torch.testing.assert_close(new(_x(shape)), slim(_x(shape)), rtol=1e-5, atol=1e-5)
    dense_bns = {n: m.num_features for n, m in TOYS[name][0]().named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for bn_name, width in report.widths.items():
        assert width % pad == 0 or width == dense_bns[bn_name], (bn_name, width)
        assert width >= slim.slim_widths.get(bn_name, 0)  # padding only ever keeps more
    if selections == "zero":
        assert not any(isinstance(m, ChannelSelection) for m in new.modules())
    assert new.slim_form == {"selections": selections, "pad_to": pad}
    assert set(form_summary(report)["forms"]) <= {"narrow", "selection", "zero"}


def test_a_fold_shift_or_zero_form_model_re_forms_exactly() -> None:
    for kw in ({"fold_shift": True}, {"selections": "zero"}):
        _, _, slim, shape = slim_of("preact", 0.6, **kw)
        new, _ = reform(slim, PreActResNet(), selections="gather", pad_to=2, input_shape=shape)
        with torch.no_grad():
            torch.testing.assert_close(new(_x(shape)), slim(_x(shape)), rtol=1e-5, atol=1e-5)


def test_zero_channels_become_gathers_again() -> None:
    """A zero-form slim model re-formed as gathers: the zeroed channels are dropped, not kept."""
    _, plan, slim, shape = slim_of("preact", 0.5, selections="zero")
    new, report = reform(slim, PreActResNet(), selections="gather", pad_to=1, input_shape=shape)
    assert report.widths == plan.widths
    assert any(isinstance(m, ChannelSelection) for m in new.modules())


def test_a_model_that_is_not_the_slim_model_of_the_arch_is_refused() -> None:
    dense, _, slim, shape = slim_of("preact")
    with pytest.raises(PruneError, match="slim_keep"):
        unprune(dense, PreActResNet(), input_shape=shape)
    with pytest.raises(PruneError, match="pad_to"):
        reform(slim, PreActResNet(), pad_to=0, input_shape=shape)
    with pytest.raises(PruneError, match="selections"):
        reform(slim, PreActResNet(), selections="copy", input_shape=shape)


def test_a_zeroed_channel_trained_again_is_kept() -> None:
    """Re-forming must never change the function: a zero-form channel whose γ is no longer 0 (it was
    trained after pruning) is kept, not dropped with the channels that are still zero."""
    _, _, slim, shape = slim_of("preact", 0.5, selections="zero")
    zeroed = [m for m in slim.modules() if isinstance(m, nn.BatchNorm2d) and (m.weight == 0).any()]
    assert zeroed
    with torch.no_grad():
        for m in zeroed:
            m.weight[m.weight == 0] = 0.5
    new, _ = reform(slim, PreActResNet(), selections="gather", pad_to=1, input_shape=shape)
    with torch.no_grad():
        torch.testing.assert_close(new(_x(shape)), slim(_x(shape)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["preact", "dense", "input_bn"])
def test_selections_as_one_hot_convs_compute_the_same(name: str) -> None:
    from slimcli.export.forms import selections_as_convs

    _, _, slim, shape = slim_of(name)
    want = slim(_x(shape))
    n = sum(isinstance(m, ChannelSelection) for m in slim.modules())
    convs, replaced = selections_as_convs(slim, shape)
    assert n and replaced == n and not any(isinstance(m, ChannelSelection) for m in convs.modules())
    with torch.no_grad():
        torch.testing.assert_close(convs(_x(shape)), want, rtol=1e-6, atol=1e-6)


def _gather_form(name: str, pad: int = 1):
    _, _, slim, shape = slim_of(name)
    new, report = reform(slim, TOYS[name][0](), selections="gather", pad_to=pad, input_shape=shape)
    return slim, new, report, shape


def _reads_a_concatenation(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module"
               and isinstance(gm.get_submodule(str(n.target)), ChannelSelection)
               and n.args[0].op == "call_function" and n.args[0].target is torch.cat)


@pytest.mark.parametrize("pad", [1, 4])
def test_selections_of_pieces_compute_the_same_and_read_no_concatenation(pad: int) -> None:
    from slimcli.export.forms import selections_of_pieces

    slim, new, report, shape = _gather_form("dense", pad)
    before = _reads_a_concatenation(new)
    assert before  # the toy DenseNet's BNs read concatenations through selections
    with torch.no_grad():
        want = new(_x(shape))
    pieces, readers = selections_of_pieces(new, shape)
    assert _reads_a_concatenation(pieces) == 0 and len(readers) == before
    assert set(readers) <= {la.name for la in report.layers}  # the BNs reading them
    with torch.no_grad():
        torch.testing.assert_close(pieces(_x(shape)), want, rtol=0, atol=0)  # indexing only: bit-exact
        torch.testing.assert_close(pieces(_x(shape)), slim(_x(shape)), rtol=1e-5, atol=1e-5)
    summary = form_summary(report, {"pieces": readers})
    assert summary["forms"]["pieces"] == len(readers)
    assert all(summary["layers"][r] == "pieces" for r in readers)


def test_selections_of_pieces_leave_a_model_without_concatenations_alone() -> None:
    from slimcli.export.forms import selections_of_pieces

    _, new, _, shape = _gather_form("preact")
    code = new.code
    assert selections_of_pieces(new, shape)[1] == [] and new.code == code


@pytest.mark.parametrize("name", ["preact", "dense", "input_bn"])
def test_a_batchnorm_after_a_selection_becomes_the_same_depthwise_conv(name: str) -> None:
    from slimcli.export.forms import bns_as_depthwise

    _, new, _, shape = _gather_form(name)
    after = [n for n in new.graph.nodes if n.op == "call_module" and n.args
             and isinstance(new.get_submodule(str(n.target)), nn.BatchNorm2d)
             and isinstance(new.get_submodule(str(n.args[0].target)) if n.args[0].op == "call_module"
                            else None, ChannelSelection)]
    assert after
    with torch.no_grad():
        for n in after:  # non-trivial statistics, so the folding is tested
            bn = new.get_submodule(str(n.target))
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        want = new(_x(shape))
    convs, replaced = bns_as_depthwise(new)
    assert replaced == len(after)
    for n in after:
        conv = convs.get_submodule(str(n.target))
        assert isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
    with torch.no_grad():
        torch.testing.assert_close(convs(_x(shape)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selections", ["gather", "auto", "zero", "conv", "pieces"])
def test_realise_checks_every_export_form(selections: str) -> None:
    from slimcli.export.forms import SURGERY_SELECTIONS, realise

    _, _, slim, shape = slim_of("dense")
    new, _ = reform(slim, TOYS["dense"][0](), selections=SURGERY_SELECTIONS[selections], input_shape=shape)
    out, done = realise(new, selections, shape)
    with torch.no_grad():
        torch.testing.assert_close(out(_x(shape)), slim(_x(shape)), rtol=1e-5, atol=1e-5)
    assert ("pieces" in done) == (selections == "pieces")
    assert ("convs" in done) == (selections == "conv")
    if selections in ("gather", "pieces"):
        assert done["bn_as_conv"] > 0
    if selections == "zero":
        assert done == {}


def test_realise_refuses_a_rewrite_that_changes_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimcli.export import forms

    _, new, _, shape = _gather_form("dense")

    def broken(model, _shape):
        for m in model.modules():
            if isinstance(m, ChannelSelection):
                m.indices = m.indices.flip(0)
        return model, ["x"]

    monkeypatch.setattr(forms, "selections_of_pieces", broken)
    with pytest.raises(PruneError, match="differs from the slim model"):
        forms.realise(new, "pieces", shape)


def test_a_fused_batchnorm_activation_after_a_selection_is_kept() -> None:
    """Only a plain BatchNorm2d becomes a depthwise conv: a subclass may apply more (BN + activation)."""
    from slimcli.export.forms import bns_as_depthwise

    class BNAct(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sel, self.fused, self.plain = ChannelSelection([0, 2]), BNAct(2), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fused(self.sel(x)) + self.plain(self.sel(x))

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, (BNAct, ChannelSelection)) or super().is_leaf_module(m, name)

    net = Net().eval()
    gm = torch.fx.GraphModule(net, Leaves().trace(net))
    x = torch.randn(2, 3, 4, 4)
    want = gm(x)
    out, replaced = bns_as_depthwise(gm)
    assert replaced == 1 and isinstance(out.fused, BNAct) and isinstance(out.plain, nn.Conv2d)
    torch.testing.assert_close(out(x), want, rtol=1e-5, atol=1e-5)


def test_selections_of_pieces_leave_a_selection_out_of_order_alone() -> None:
    """Reading piece by piece keeps channel order increasing; a reordering selection stays as it is."""
    from slimcli.export.forms import selections_of_pieces

    _, new, _, shape = _gather_form("dense")
    reordering = [n for n in new.graph.nodes if n.op == "call_module"
                  and isinstance(new.get_submodule(str(n.target)), ChannelSelection)
                  and n.args[0].op == "call_function" and n.args[0].target is torch.cat]
    sel = new.get_submodule(str(reordering[0].target))
    sel.indices = sel.indices.flip(0)
    with torch.no_grad():
        want = new(_x(shape))
    pieces, readers = selections_of_pieces(new, shape)
    assert _reads_a_concatenation(pieces) == 1 and len(readers) == len(reordering) - 1
    with torch.no_grad():
        torch.testing.assert_close(pieces(_x(shape)), want, rtol=0, atol=0)
