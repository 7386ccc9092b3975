"""BatchNorm recalibration: it undoes the shift that removed channels' β leave behind."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimcli.archs import create_arch
from slimcli.errors import PruneError, UsageError
from slimcli.model import calibration_images, recalibrate
from slimcli.prune import compute_keep, masked_dense, prune_model
from slimcli.prune.recalibrate import batchnorms, recalibrate_batchnorm
from slimcli.registry import ARCHS

pytestmark = pytest.mark.usefixtures("one_thread")


class OneByOne(nn.Module):
    """Only 1×1 convs and a linear: a removed channel's constant is the same at every pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)
        self.input_shape = (3, 5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _batches(n: int = 4, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 5, 5, generator=g) for _ in range(n)]


def _shifted_toy() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """bn1's channels 0, 2, 5 have γ = 0 but a large β: pruning them removes a big constant."""
    torch.manual_seed(0)
    model = OneByOne()
    pruned = torch.tensor([0, 2, 5])
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
        model.bn1.weight[pruned] = 0.0
        model.bn1.bias[pruned] = 3.0
    recalibrate_batchnorm(model, _batches())  # statistics that fit the dense model
    model.eval()
    keep = torch.ones(8, dtype=torch.bool)
    keep[pruned] = False
    return model, {"bn1": keep}


def test_recalibration_makes_the_slim_model_equal_the_masked_gamma_model() -> None:
    """The dense model with the pruned γ zeroed (β kept) is what training saw; after surgery
    plus recalibration on the same images, the slim model computes exactly that again."""
    model, masks = _shifted_toy()
    target = masked_dense(model, masks, keep_shift=True).eval()  # == model: those γ are already 0
    slim, _ = prune_model(model, masks)
    slim.eval()
    x = torch.randn(16, 3, 5, 5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = target(x)
        before = (slim(x) - ref).abs().max().item()
        assert recalibrate_batchnorm(slim, _batches()) == 128
        assert recalibrate_batchnorm(target, _batches()) == 128
        ref = target(x)
        after = (slim(x) - ref).abs().max().item()
    assert before > 0.5, before  # surgery alone really is off (the shift this fixes)
    assert after < 1e-4, after  # stated tolerance: float32 rounding of the same statistics
    assert not slim.training and all(not m.training for m in slim.modules())


def test_recalibration_is_a_cumulative_average_and_restores_modes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    batches = _batches(3, 8)
    recalibrate_batchnorm(model, batches)
    bn = model[1]
    with torch.no_grad():
        outs = [model[0](b) for b in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, var, atol=1e-6, rtol=1e-5)
    assert bn.momentum == 0.3 and model.training and model[2].training and not bn.training


def test_no_batches_is_an_error_and_keeps_the_old_statistics() -> None:
    model, _ = _shifted_toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneError, match="no images"):
        recalibrate_batchnorm(model, [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_failing_forward_keeps_the_old_statistics() -> None:
    model, _ = _shifted_toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, [torch.randn(4, 3, 5, 5), torch.randn(4, 7, 5, 5)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec", [getattr(info.cls, "test_spec", info.name) for info in ARCHS])
def test_recalibration_on_every_registered_architecture(spec: str) -> None:
    """Runs on every arch after surgery, changes only BatchNorm statistics, is deterministic,
    and leaves the dense model alone."""
    torch.manual_seed(0)
    model = create_arch(spec, 10, (3, 16, 16)).eval()
    with torch.no_grad():
        for bn in batchnorms(model):
            bn.weight.uniform_(0.0, 1.0)
            bn.bias.uniform_(-0.5, 0.5)
    dense_before = copy.deepcopy(model.state_dict())
    plan = compute_keep(model, "ratio", 0.5, input_shape=(3, 16, 16))
    slim, _ = prune_model(model, plan, input_shape=(3, 16, 16))
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen)
    norm = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    twin = copy.deepcopy(slim)
    weights = {k: v.clone() for k, v in slim.state_dict().items()
               if "running" not in k and "num_batches" not in k}
    assert recalibrate(slim, images, norm, batch_size=16) == 40
    assert recalibrate(twin, images, norm, batch_size=16) == 40
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in slim.state_dict().items())  # deterministic
    assert all(torch.equal(slim.state_dict()[k], v) for k, v in weights.items())  # weights untouched
    assert all(torch.equal(v, dense_before[k]) for k, v in model.state_dict().items())  # dense untouched


def test_calibration_images_are_a_seeded_subset_of_the_train_split() -> None:
    a = calibration_images("synthetic:n=64", 16, seed=3)
    b = calibration_images("synthetic:n=64", 16, seed=3)
    c = calibration_images("synthetic:n=64", 16, seed=4)
    assert a.dtype == torch.uint8 and a.shape[0] == 16
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert calibration_images("synthetic:n=64", 1000).shape[0] == 64  # more than the split: all of it
    with pytest.raises(UsageError):
        calibration_images("synthetic:n=64", 0)
