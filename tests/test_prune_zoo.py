"""Coupled groups on zoo-style networks: slim == masked dense, rebuilds, exports, and honest reasons."""

from __future__ import annotations

import io

import pytest
import torch
from _zoo import SHAPE, ZOO
from torch import nn

from slimcli.prune import apply_widths, compute_keep, gamma_scores, masked_dense, prunable_bns, prune_model
from slimcli.testing import randomize_batchnorms

pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorms(ZOO[name]().double().eval(), seed)


def x_of(n: int = 3) -> torch.Tensor:
    return torch.randn(n, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("coupling", ["auto", "joint", "select"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_slim_equals_masked_dense_and_rebuilds(name: str, coupling: str) -> None:
    model = build(name)
    bns = prunable_bns(model, SHAPE, coupling=coupling)
    if not any(b.prunable for b in bns.values()):
        # only --coupling select may find nothing: every BN is tied to another one
        assert coupling == "select", {n: b.reason for n, b in bns.items()}
        assert all("tied to" in b.reason or "selection" in b.reason for b in bns.values()), bns
        return
    x = x_of()
    for ratio in (0.3, 0.7):
        plan = compute_keep(model, "ratio", ratio, input_shape=SHAPE, bns=bns, coupling=coupling)
        slim, report = prune_model(model, plan, input_shape=SHAPE)
        assert report.params_after < report.params_before, (name, ratio)
        with torch.no_grad():
            torch.testing.assert_close(slim(x), masked_dense(model, plan)(x), rtol=1e-6, atol=1e-9)
        # the checkpoint's structure record (widths + dense keep masks + coupling) rebuilds it exactly
        fresh = ZOO[name]().double().eval()
        rebuilt = apply_widths(fresh, report.widths, input_shape=SHAPE, keep=report.keep, coupling=coupling)
        rebuilt.load_state_dict(slim.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(rebuilt.eval()(x), slim(x))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_slim_models_export_and_match_in_onnxruntime(name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = build(name).float()
    slim, _ = prune_model(model, compute_keep(model, "ratio", 0.5, input_shape=SHAPE), input_shape=SHAPE)
    x = x_of(2).float()
    buf = io.BytesIO()
    torch.onnx.export(slim, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    (got,) = ort.InferenceSession(buf.getvalue()).run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), slim(x), rtol=1e-4, atol=1e-5)


def test_zoo_coverage_and_reasons() -> None:
    """Which channels go together, and the true reason where they cannot go."""
    share = {}
    for name in ZOO:
        bns = prunable_bns(build(name), SHAPE)
        share[name] = sum(b.prunable for b in bns.values()) / len(bns)
    # every BN of these prunes (jointly where tied)
    for name in ("postact-bottleneck", "mobilenetv2", "se-hardswish", "repvgg", "ghostnet", "csp",
                 "densenet", "preact", "resnext", "shufflenet"):
        assert share[name] == 1.0, (name, share[name])

    mb = prunable_bns(build("mobilenetv2"), SHAPE)
    assert mb["exp_bn"].group == mb["dw_bn"].group  # the depthwise conv ties both sides
    assert mb["stem_bn"].group == mb["proj_bn"].group  # the residual sum
    assert mb["exp_bn"].kind == "BatchNormAct2d"  # fused BN+act traced as one node

    shuffle = prunable_bns(build("shufflenet"), SHAPE)  # the shuffle keeps equal groups: all prune
    assert all(b.prunable for b in shuffle.values()), {n: b.reason for n, b in shuffle.items()}
    assert shuffle["branch.2.1"].group == shuffle["stem.1"].group  # tied across the shuffle

    resnext = prunable_bns(build("resnext"), SHAPE)  # equal groups: position j of every group together
    assert resnext["reduce.1"].prunable and resnext["grouped.1"].prunable
    reduce_classes = resnext["reduce.1"].classes
    assert reduce_classes is not None and len(set(reduce_classes)) == 4  # 8 channels, 2 groups of 4
    assert reduce_classes[:4] == reduce_classes[4:] and resnext["stem.1"].group == "stem.1"

    att = prunable_bns(build("spatial-attention"), SHAPE)
    # a mean over the channels changes when a channel goes (it divides by C): those channels stay
    assert not att["a.1"].prunable and ".mean()" in att["a.1"].reason
    assert att["b.1"].prunable and att["b.1"].consumers == ("fc",)  # through a hard-coded flatten view

    rep = prunable_bns(build("repvgg"), SHAPE)  # the identity branch joins the trunk: no selection
    assert not any(b.needs_selection for b in rep.values())
    assert rep["stem.1"].group == rep["idbn"].group == rep["k3.1"].group


def test_fused_bn_with_a_non_zero_activation_is_not_assumed_zero() -> None:
    """BatchNorm + sigmoid fused: a zeroed channel outputs 0.5, so the next conv must keep reading it."""
    from _zoo import BatchNormAct2d

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
            self.bn = BatchNormAct2d(4, nn.Sigmoid)
            self.conv2 = nn.Conv2d(4, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.bn(self.conv(x))).mean((2, 3))

    b = prunable_bns(M(), SHAPE)["bn"]
    assert not b.prunable and "Sigmoid" in b.reason


def test_unknown_ops_freeze_with_a_reason_and_never_crash() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.softmax(self.bn(self.conv(x)), dim=1)  # mixes channels
            b = torch.relu(self.bn2(self.conv2(a)))
            return torch.einsum("nchw->nc", b)

    bns = prunable_bns(M(), SHAPE)
    assert not bns["bn"].prunable and "softmax" in bns["bn"].reason
    assert not bns["bn2"].prunable and "einsum" in bns["bn2"].reason


@pytest.mark.parametrize("name", ["postact-bottleneck", "mobilenetv2", "ghostnet", "csp", "densenet"])
def test_round_to_gives_multiples_and_stays_exact(name: str) -> None:
    model = build(name)
    bns = prunable_bns(model, SHAPE)
    plain = compute_keep(model, "ratio", 0.5, input_shape=SHAPE, bns=bns)
    plan = compute_keep(model, "ratio", 0.5, input_shape=SHAPE, bns=bns, round_to=4)
    score: dict[int, float] = {}  # coupled class → its (group) score
    kept, plain_kept = set(), set()
    for n, mask in plan.masks.items():
        count, total = int(mask.sum()), mask.numel()
        assert count % 4 == 0 or count == total, (n, count, total)
        assert bool((mask | ~plain.masks[n]).all()), n  # rounding only gives channels back
        ids = torch.tensor(bns[n].classes)
        score.update(zip(ids.tolist(), gamma_scores(model, bns)[n].tolist(), strict=True))
        kept.update(ids[mask].tolist())
        plain_kept.update(ids[plain.masks[n]].tolist())
    # within every conv-created tensor (a rounding unit), the classes given back are the strongest of
    # those the rule dropped
    checked = 0
    for unit in bns.units:
        added = [score[c] for c in unit if c in kept and c not in plain_kept]
        dropped = [score[c] for c in unit if c not in kept]
        if added and dropped:
            assert min(added) >= max(dropped), unit
            checked += 1
    assert checked, "no unit had both channels given back and channels dropped"
    slim, _ = prune_model(model, plan, input_shape=SHAPE)
    x = x_of()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked_dense(model, plan)(x), rtol=1e-6, atol=1e-9)
    assert plan.summary()["round_to"] == 4


@pytest.mark.parametrize("spec", ["resnet164:depth=11", "densenet40:depth=7,growth=4,stem=8"])
def test_zero_realised_selections_are_exact_gather_free_and_rebuild(spec: str) -> None:
    """--selections zero: BNs reading a shared tensor keep their width (γ = β = 0 on the pruned
    channels) instead of a channel selection; same outputs, no ChannelSelection, strict rebuild."""
    from slimcli.archs import create_arch
    from slimcli.prune import ChannelSelection

    torch.manual_seed(0)
    model = randomize_batchnorms(create_arch(spec, 10, (3, 32, 32)).double().eval(), 0)
    shape = (3, 32, 32)
    plan = compute_keep(model, "ratio", 0.5, input_shape=shape)
    gathered, g_report = prune_model(model, plan, input_shape=shape)
    zeroed, z_report = prune_model(model, plan, input_shape=shape, selections="zero")
    x = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = masked_dense(model, plan)(x)
        torch.testing.assert_close(zeroed(x), want, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(gathered(x), want, rtol=1e-6, atol=1e-9)
    assert any(isinstance(m, ChannelSelection) for m in gathered.modules())
    assert not any(isinstance(m, ChannelSelection) for m in zeroed.modules())
    forms = {r.name: r.form for r in z_report.layers if r.form}
    assert "zero" in forms.values() and z_report.params_after >= g_report.params_after
    assert [r.kept for r in z_report.layers] == [r.kept for r in g_report.layers]  # same channels pruned
    rebuilt = apply_widths(create_arch(spec, 10, shape).double(), z_report.widths, input_shape=shape,
                           keep=z_report.keep)
    rebuilt.load_state_dict(zeroed.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), zeroed(x))


def test_export_for_a_runtime_target_says_when_gathers_remain(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from slimcli.archs import create_arch
    from slimcli.export import export_onnx

    shape = (3, 32, 32)
    model = randomize_batchnorms(create_arch("resnet164:depth=11", 10, shape).eval(), 0)
    plan = compute_keep(model, "ratio", 0.5, input_shape=shape)
    gathered, _ = prune_model(model, plan, input_shape=shape)
    zeroed, _ = prune_model(model, plan, input_shape=shape, selections="zero")
    kw = {"input_shape": shape, "metadata": {}, "latency_runs": 0, "target": "ort"}
    a = export_onnx(gathered, tmp_path / "a.onnx", **kw)
    b = export_onnx(zeroed, tmp_path / "b.onnx", **kw)
    assert any("--selections zero" in n for n in a.notes)
    assert not any("Gather" in n for n in b.notes)


def test_auto_selections_follow_the_cost_rule() -> None:
    """auto: ResNet-164's bottleneck selections save few MACs per copied element → zeroed; DenseNet's
    3×3 convs after the selections (growth 12) save more → gathers stay. Exact either way."""
    from slimcli.archs import create_arch

    shape = (3, 32, 32)
    x = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for spec, form in (("resnet164:depth=11", "zero"), ("densenet40:depth=7,growth=12,stem=8", "selection")):
        # (DenseNet decides per layer: a BN that loses many channels before a 3×3 conv keeps its gather)
        torch.manual_seed(0)
        model = randomize_batchnorms(create_arch(spec, 10, shape).double().eval(), 0)
        plan = compute_keep(model, "ratio", 0.5, input_shape=shape)
        slim, report = prune_model(model, plan, input_shape=shape, selections="auto")
        chosen = {r.name: r.form for r in report.layers if r.needs_selection or r.form == "zero"}
        if form == "zero":
            assert set(chosen.values()) == {"zero"}, chosen
        else:
            assert "selection" in chosen.values() and "zero" in chosen.values(), chosen  # per layer
        with torch.no_grad():
            torch.testing.assert_close(slim(x), masked_dense(model, plan)(x), rtol=1e-6, atol=1e-9)
