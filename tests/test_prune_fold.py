"""``fold_shift``: the removed channels' constant β goes into the next layer instead of being dropped.

The reference is the dense model with only the pruned γ zeroed (``masked_dense(...,
keep_shift=True)``): there each pruned channel outputs its constant β. Without folding the
slim model must stay the paper's (γ and β zeroed).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import run_cli
from torch import Tensor, nn

from slimcli.archs import create_arch
from slimcli.checkpoint import load_checkpoint, save_checkpoint
from slimcli.measure import count_params
from slimcli.model import build_model
from slimcli.prune import compute_keep, masked_dense, prune_model
from slimcli.registry import ARCHS

SPECS = [getattr(info.cls, "test_spec", info.name) for info in ARCHS]
SHAPE = (3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model: nn.Module, seed: int = 0, beta: float = 0.5) -> nn.Module:
    """float64 eval mode, random γ, β (large enough to matter) and BN statistics."""
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.1)
                m.bias.copy_(torch.randn(n, generator=g) * beta)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _masks(model: nn.Module, names: list[str], seed: int = 1) -> dict[str, Tensor]:
    """Keep a random half of the channels of each named BN (at least one)."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name in names:
        n = model.get_submodule(name).num_features
        mask = torch.rand(n, generator=g) < 0.5
        mask[torch.randint(n, (1,), generator=g)] = True
        masks[name] = mask
    return masks


def _x(shape: tuple[int, ...], n: int = 3, seed: int = 2) -> Tensor:
    return torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ----------------------------------------------------------------------------------------------
# toy models where folding is exact


class PoolLinear(nn.Module):
    """BN → ReLU → global average pool → Linear (bias, or no bias and a BatchNorm1d after it)."""

    def __init__(self, linear_bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5, bias=linear_bias)
        self.bn_fc = nn.Identity() if linear_bias else nn.BatchNorm1d(5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1)
        return self.bn_fc(self.fc(torch.flatten(x, 1)))


class FlattenLinear(nn.Module):
    """BN → LeakyReLU → 4×4 max pool → flatten of a 2×2 map (4 columns per channel) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.leaky_relu(self.bn(self.conv(x)), 0.1), 4)
        return self.fc(x.view(x.size(0), -1))


class PointwiseBN(nn.Module):
    """BN → ReLU → 1×1 conv (no padding, no bias) → BN → ReLU → pool → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv2(F.relu(self.bn1(self.conv1(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.bn2(x)), 1)
        return self.fc(torch.flatten(x, 1))


class SumAndConcat(nn.Module):
    """A pointwise conv without bias whose output reaches BNs only through a residual sum and a
    concatenation (with an average pool on the way): the fold goes into all their running means."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(12)
        self.bn_c = nn.BatchNorm2d(6)
        self.fc_b = nn.Linear(12, 4)
        self.fc_c = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x0 = self.stem(x)
        y = x0 + self.conv(F.relu(self.bn_a(x0)))
        z = F.avg_pool2d(torch.cat([x0, y], 1), 2)
        b = F.adaptive_avg_pool2d(F.relu(self.bn_b(z)), 1)
        c = F.adaptive_avg_pool2d(F.relu(self.bn_c(y)), 1)
        return self.fc_b(torch.flatten(b, 1)) + self.fc_c(torch.flatten(c, 1))


EXACT = {
    "pool_linear": (lambda: PoolLinear(), ["bn"]),
    "pool_linear_bn1d": (lambda: PoolLinear(linear_bias=False), ["bn"]),
    "flatten_linear": (lambda: FlattenLinear(), ["bn"]),
    "pointwise_conv_bn": (lambda: PointwiseBN(), ["bn1", "bn2"]),
    "pointwise_conv_bn_first_only": (lambda: PointwiseBN(), ["bn1"]),
    "sum_and_concat": (lambda: SumAndConcat(), ["bn_a", "bn_b", "bn_c"]),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_folding_is_exact_where_no_padding_intervenes(case: str) -> None:
    make, bns = EXACT[case]
    torch.manual_seed(0)
    model = _randomize(make())
    shape = (3, 8, 8)
    masks = _masks(model, bns)
    x = _x(shape)
    folded, report = prune_model(model, masks, input_shape=shape, fold_shift=True)
    plain, plain_report = prune_model(model, masks, input_shape=shape)
    keep_beta, paper = masked_dense(model, masks, keep_shift=True), masked_dense(model, masks)

    torch.testing.assert_close(_outputs(folded, x), _outputs(keep_beta, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_outputs(plain, x), _outputs(paper, x), rtol=1e-5, atol=1e-5)
    # the two references differ: the folded constants matter in this model
    assert (_outputs(keep_beta, x) - _outputs(paper, x)).abs().max() > 1e-3
    assert report.fold_shift and not plain_report.fold_shift and not plain_report.folds
    assert report.folds and all(f.targets and f.exact for f in report.folds)
    # values only: the same structure, parameters and state_dict keys and shapes
    assert report.widths == plain_report.widths and count_params(folded) == count_params(plain)
    assert {k: v.shape for k, v in folded.state_dict().items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}


def test_folds_go_to_the_bias_or_to_every_batchnorm_reached() -> None:
    model = _randomize(SumAndConcat())
    _, report = prune_model(model, _masks(model, ["bn_a"]), input_shape=(3, 8, 8), fold_shift=True)
    (fold,) = report.folds
    assert fold.bn == "bn_a" and fold.consumer == "conv"
    assert set(fold.targets) == {"bn_b.running_mean", "bn_c.running_mean"}
    model = _randomize(FlattenLinear())
    _, report = prune_model(model, _masks(model, ["bn"]), input_shape=(3, 8, 8), fold_shift=True)
    assert [f.targets for f in report.folds] == [("fc.bias",)]


class NoPlaceForIt(nn.Module):
    """The consumer has no bias and feeds the model output: nothing to fold into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1), 1))


def test_a_consumer_without_bias_or_batchnorm_is_skipped_and_reported() -> None:
    model = _randomize(NoPlaceForIt())
    with torch.no_grad():
        model.bn.bias.copy_(torch.linspace(0.2, 1.0, 6))  # every pruned channel has relu(β) > 0
    masks = _masks(model, ["bn"])
    folded, report = prune_model(model, masks, input_shape=(3, 8, 8), fold_shift=True)
    (fold,) = report.folds
    assert fold.targets == () and fold.consumer == "fc" and "no bias" in fold.reason
    assert fold.channels == int((~masks["bn"]).sum())
    assert folded.get_submodule("fc").bias is None  # nothing is ever added
    x = _x((3, 8, 8))
    torch.testing.assert_close(_outputs(folded, x), _outputs(masked_dense(model, masks), x))
    assert report.as_dict()["fold"]["skipped"][0]["consumer"] == "fc"


# ----------------------------------------------------------------------------------------------
# zero padding: the fold is the mean of the exact contribution over the map


class PaddedConv(nn.Module):
    """BN → ReLU → conv k×k (padding k//2, bias), whose output is the model output."""

    def __init__(self, padding_mode: str = "zeros", k: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 5, k, padding=k // 2, padding_mode=padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.relu(self.bn(self.stem(x))))


def _padded_case(size: int, padding_mode: str = "zeros") -> tuple[Tensor, Tensor, Tensor, list]:
    model = _randomize(PaddedConv(padding_mode))
    with torch.no_grad():
        model.bn.bias.abs_()  # constants relu(β) = β > 0: the border effect is never zero
    shape = (3, size, size)
    masks = _masks(model, ["bn"])
    folded, report = prune_model(model, masks, input_shape=shape, fold_shift=True)
    plain, _ = prune_model(model, masks, input_shape=shape)
    x = _x(shape)
    ref = _outputs(masked_dense(model, masks, keep_shift=True), x)
    return ref, _outputs(folded, x), _outputs(plain, x), report.folds


def test_a_zero_padded_conv_gets_the_mean_over_the_map_and_comes_closer() -> None:
    ref, folded, plain, folds = _padded_case(12)
    assert [f.exact for f in folds] == [False] and folds[0].targets == ("conv.bias",)
    # the bias carries the map's mean of the constant's contribution exactly
    torch.testing.assert_close(folded.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    # so every output channel's squared error shrinks, and so does the largest error
    assert ((folded - ref) ** 2).sum(dim=(0, 2, 3)).lt(((plain - ref) ** 2).sum(dim=(0, 2, 3))).all()
    assert (folded - ref).abs().max() < (plain - ref).abs().max()
    # at interior pixels what is left is one constant per channel (interior value − map mean)
    inner = (folded - ref)[:, :, 1:-1, 1:-1]
    torch.testing.assert_close(inner, inner[:1, :, :1, :1].expand_as(inner), rtol=1e-5, atol=1e-5)
    assert inner.abs().max() < (plain - ref)[:, :, 1:-1, 1:-1].abs().max()


@pytest.mark.parametrize(("size", "padding_mode"), [(1, "zeros"), (6, "replicate"), (6, "circular")])
def test_a_padded_conv_is_exact_when_the_constant_reaches_every_pixel_alike(
    size: int, padding_mode: str
) -> None:
    """A 3×3 conv on a 1×1 map (deep VGG stages) sees only its centre tap; replicate or circular
    padding repeats the constant: in both cases the fold is exact everywhere."""
    ref, folded, _, folds = _padded_case(size, padding_mode)
    assert [f.exact for f in folds] == [True]
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# every registered architecture


@pytest.mark.parametrize("spec", SPECS)
def test_folding_brings_every_arch_closer_and_reloads_strictly(spec: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomize(create_arch(spec, 10, SHAPE))
    # folding follows one BatchNorm's constant; coupled groups (auto/joint) are left unfolded
    plan = compute_keep(model, "ratio", 0.5, coupling="select")
    with torch.no_grad():  # what sparsity training leaves: pruned channels with γ ≈ 0 but β ≠ 0
        for name, mask in plan.masks.items():
            model.get_submodule(name).weight[~mask] = 1e-6
    x = _x(SHAPE, n=2)
    ref = _outputs(masked_dense(model, plan, keep_shift=True), x)
    folded, report = prune_model(model, plan, fold_shift=True)
    plain, plain_report = prune_model(model, plan)
    out = _outputs(folded, x)
    assert (out - ref).abs().max() < (_outputs(plain, x) - ref).abs().max()
    assert any(f.targets for f in report.folds)
    assert all(f.reason for f in report.folds if not f.targets)
    assert count_params(folded) == count_params(plain) == plain_report.params_after
    assert report.widths == plain_report.widths

    # a folded slim checkpoint loads through the widths alone, strictly, with the same outputs
    slim32 = copy.deepcopy(folded).float()
    path = tmp_path / "folded.safetensors"
    save_checkpoint(path, slim32, {"arch": spec, "num_classes": 10, "input_shape": list(SHAPE),
                                   "widths": report.widths, "stage": "pruned"})
    reloaded = build_model(load_checkpoint(path))
    with torch.no_grad():
        assert torch.equal(reloaded(x.float()), slim32.eval()(x.float()))


def test_repruning_a_folded_model_with_selections_folds_again() -> None:
    """A second pruning composes the selections; constants still find their BatchNorms through them."""
    spec = "densenet40:depth=7,growth=4,stem=8"
    model = _randomize(create_arch(spec, 10, SHAPE))
    first, _ = prune_model(model, compute_keep(model, "ratio", 0.3), fold_shift=True)
    plan = compute_keep(first, "ratio", 0.3, input_shape=SHAPE)
    second, report = prune_model(first, plan, input_shape=SHAPE, fold_shift=True)
    assert any(len(f.targets) > 1 for f in report.folds)  # running means of several BNs via selections
    x = _x(SHAPE, n=2)
    with torch.no_grad():
        for name, mask in plan.masks.items():
            first.get_submodule(name).weight[~mask] = 0
    ref = _outputs(first, x)  # the first slim model with the second round's γ (only) zeroed
    plain, _ = prune_model(first, plan, input_shape=SHAPE)
    assert (_outputs(second, x) - ref).abs().max() < (_outputs(plain, x) - ref).abs().max()


# ----------------------------------------------------------------------------------------------
# slim prune --fold-shift


def _cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    code, stdout, stderr = run_cli([*argv, "--json"], capsys)
    assert code == 0, stderr
    return json.loads(stdout)


def test_cli_fold_shift_is_recorded_in_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch, shape = "vgg:depth=11,width=0.0625", (1, 28, 28)
    model = _randomize(create_arch(arch, 10, shape)).float()
    ckpt = tmp_path / "best.safetensors"
    save_checkpoint(ckpt, model, {"arch": arch, "num_classes": 10, "input_shape": list(shape),
                                  "stage": "sparsify"})
    folded = _cli_json(["prune", str(ckpt), "--ratio", "0.5", "--fold-shift",
                        "--out", str(tmp_path / "folded.safetensors")], capsys)
    plain = _cli_json(["prune", str(ckpt), "--ratio", "0.5", "--out", str(tmp_path / "plain.safetensors")],
                      capsys)
    assert folded["prune"]["fold_shift"] is True and plain["prune"]["fold_shift"] is False
    assert folded["prune"]["fold"]["folded"] > 0 and "fold" not in plain["prune"]
    assert folded["widths"] == plain["widths"]
    written = load_checkpoint(tmp_path / "folded.safetensors")
    assert written.meta["prune"]["fold_shift"] is True
    assert written.meta["prune"]["fold"] == folded["prune"]["fold"]
    # the folded file holds other values in the same tensors
    a, b = build_model(written), build_model(load_checkpoint(tmp_path / "plain.safetensors"))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert any(not torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
