"""slim import: checkpoints in the exact layout of the network-slimming reference code.

The reference models below are written here from the reference code's structure (models/vgg.py,
models/preresnet.py, models/densenet.py, models/channel_selection.py of the public
network-slimming code, shared by the authors' nonconvex network slimming code): the same module
names — so the same state_dict keys — and the same forward, at small sizes. Their files are
saved as the reference scripts save them (training: epoch/state_dict/best_prec1/optimizer;
pruning: cfg/state_dict), in the zip and the legacy serialization, and the imported slim model
must compute exactly what the reference model computes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimcli.checkpoint import load_checkpoint
from slimcli.cli import main
from slimcli.errors import CheckpointError
from slimcli.flows.importref import REFERENCE_NORMALIZATION, convert, default_out, detect, import_reference
from slimcli.model import build_model


# ------------------------------------------------------------------ the reference models (same keys)
class channel_selection(nn.Module):  # the reference's class name
    """A 0/1 ``indexes`` parameter after a BatchNorm; passes on the channels whose entry is non-zero."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.indexes = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.indexes.detach().nonzero().reshape(-1)]


VGG_CFG = {11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512]}


class RefVGG(nn.Module):
    def __init__(self, cfg: list[Any], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c_in = v
        self.feature = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.AvgPool2d(2)(self.feature(x))
        return self.classifier(x.view(x.size(0), -1))


class RefBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, cfg: list[int], stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = channel_selection(inplanes)
        self.conv1 = nn.Conv2d(cfg[0], cfg[1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cfg[1])
        self.conv2 = nn.Conv2d(cfg[1], cfg[2], 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cfg[2])
        self.conv3 = nn.Conv2d(cfg[2], planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.select(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


def resnet_cfg(depth: int) -> list[int]:
    n = (depth - 2) // 9
    cfg = [[16, 16, 16], [64, 16, 16] * (n - 1), [64, 32, 32], [128, 32, 32] * (n - 1),
           [128, 64, 64], [256, 64, 64] * (n - 1), [256]]
    return [c for part in cfg for c in part]


class RefResNet(nn.Module):
    def __init__(self, depth: int, cfg: list[int] | None = None, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 9
        cfg = cfg or resnet_cfg(depth)
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = self._layer(16, n, cfg[0:3 * n])
        self.layer2 = self._layer(32, n, cfg[3 * n:6 * n], 2)
        self.layer3 = self._layer(64, n, cfg[6 * n:9 * n], 2)
        self.bn = nn.BatchNorm2d(256)
        self.select = channel_selection(256)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(cfg[-1], num_classes)

    def _layer(self, planes: int, blocks: int, cfg: list[int], stride: int = 1) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False))
        layers = [RefBottleneck(self.inplanes, planes, cfg[0:3], stride, down)]
        self.inplanes = planes * 4
        layers += [RefBottleneck(self.inplanes, planes, cfg[3 * i:3 * (i + 1)]) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(self.relu(self.select(self.bn(x))))
        return self.fc(x.view(x.size(0), -1))


class RefBasicBlock(nn.Module):
    def __init__(self, inplanes: int, cfg: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = channel_selection(inplanes)
        self.conv1 = nn.Conv2d(cfg, growth, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.conv1(self.relu(self.select(self.bn1(x))))), 1)


class RefTransition(nn.Module):
    def __init__(self, inplanes: int, outplanes: int, cfg: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = channel_selection(inplanes)
        self.conv1 = nn.Conv2d(cfg, outplanes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv1(self.relu(self.select(self.bn1(x)))), 2)


def densenet_cfg(depth: int, growth: int) -> list[int]:
    n, cfg, start = (depth - 4) // 3, [], growth * 2
    for _ in range(3):
        cfg += [start + growth * i for i in range(n + 1)]
        start += growth * n
    return cfg


class RefDenseNet(nn.Module):
    def __init__(self, depth: int, growth: int, cfg: list[int] | None = None, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 3
        cfg = cfg or densenet_cfg(depth, growth)
        self.growth = growth
        self.inplanes = growth * 2
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, padding=1, bias=False)
        self.dense1 = self._block(n, cfg[0:n])
        self.trans1 = self._trans(cfg[n])
        self.dense2 = self._block(n, cfg[n + 1:2 * n + 1])
        self.trans2 = self._trans(cfg[2 * n + 1])
        self.dense3 = self._block(n, cfg[2 * n + 2:3 * n + 2])
        self.bn = nn.BatchNorm2d(self.inplanes)
        self.select = channel_selection(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(cfg[-1], num_classes)

    def _block(self, blocks: int, cfg: list[int]) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(RefBasicBlock(self.inplanes, cfg[i], self.growth))
            self.inplanes += self.growth
        return nn.Sequential(*layers)

    def _trans(self, cfg: int) -> RefTransition:
        return RefTransition(self.inplanes, self.inplanes, cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = self.trans1(self.dense1(self.conv1(x)))
        x = self.dense3(self.trans2(self.dense2(x)))
        x = self.avgpool(self.relu(self.select(self.bn(x))))
        return self.fc(x.view(x.size(0), -1))


# ------------------------------------------------------------------ building and saving reference files
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics (γ of both signs), so that every channel matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def set_selections(model: nn.Module, counts: list[int], seed: int) -> None:
    """Random non-"first k" 0/1 indexes with the given numbers of ones, in module order."""
    g = torch.Generator().manual_seed(seed)
    sels = [m for m in model.modules() if isinstance(m, channel_selection)]
    assert len(sels) == len(counts)
    for sel, k in zip(sels, counts, strict=True):
        chosen = torch.randperm(sel.indexes.numel(), generator=g)[:k]
        with torch.no_grad():
            sel.indexes.zero_()
            sel.indexes[chosen] = 1.0


def pruned_resnet(depth: int, seed: int) -> tuple[RefResNet, list[int]]:
    """A reference ResNet as resprune.py leaves it: cfg = [selected, bn2, bn3] per block + [selected]."""
    g = torch.Generator().manual_seed(seed)
    full = resnet_cfg(depth)
    cfg = [int(torch.randint(1, c + 1, (1,), generator=g)) if i % 3 or i == len(full) - 1 else
           int(torch.randint(1, c, (1,), generator=g)) for i, c in enumerate(full)]
    model = randomize(RefResNet(depth, cfg), seed)
    set_selections(model, [cfg[i] for i in range(0, len(cfg), 3)], seed)
    return model, cfg


def pruned_densenet(depth: int, growth: int, seed: int) -> tuple[RefDenseNet, list[int]]:
    g = torch.Generator().manual_seed(seed)
    cfg = [int(torch.randint(1, c, (1,), generator=g)) for c in densenet_cfg(depth, growth)]
    model = randomize(RefDenseNet(depth, growth, cfg), seed)
    set_selections(model, cfg, seed)
    return model, cfg


def save_training(model: nn.Module, path: Path, legacy: bool = False, epoch: int = 160) -> Path:
    """main.py's save_checkpoint: epoch, state_dict, best_prec1 (a tensor) and the SGD state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    opt.step()  # momentum buffers exist, as in a real run
    model.eval()
    torch.save({"epoch": epoch, "state_dict": model.state_dict(), "best_prec1": torch.tensor(0.9321),
                "optimizer": opt.state_dict()}, path, _use_new_zipfile_serialization=not legacy)
    return path


def save_pruned(model: nn.Module, cfg: list[Any], path: Path, legacy: bool = False) -> Path:
    """The prune scripts' torch.save({'cfg': cfg, 'state_dict': newmodel.state_dict()}, 'pruned.pth.tar')."""
    torch.save({"cfg": cfg, "state_dict": model.state_dict()}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def assert_same(ref: nn.Module, slim: nn.Module, seed: int = 0) -> None:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ref.eval(), slim.eval()
    with torch.no_grad():
        want, got = ref(x), slim(x)
    assert got.shape == want.shape
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-5 * scale, (got - want).abs().max().item()


def slim_of(path: Path) -> nn.Module:
    """The model of a written slim checkpoint, rebuilt the way every slim command rebuilds it."""
    return build_model(load_checkpoint(path))


# ------------------------------------------------------------------ dense files
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_dense_resnet_training_file(tmp_path: Path, legacy: bool) -> None:
    ref = randomize(RefResNet(20), 1)
    src = save_training(ref, tmp_path / "model_best.pth.tar", legacy)
    res = import_reference(src, "resnet164:depth=20", tmp_path / "r.safetensors", command="test")
    assert res.meta["stage"] == "sparsify" and "widths" not in res.meta and not res.converted.selections
    assert res.meta["dataset"] == "cifar10" and res.meta["normalization"] == REFERENCE_NORMALIZATION
    assert res.meta["import"]["epoch"] == 160 and res.meta["import"]["best_prec1"] == pytest.approx(0.9321)
    assert res.meta["lineage"][0]["parent"] == res.source.sha256
    assert_same(ref, res.model)
    assert_same(ref, slim_of(res.out))
    assert res.params == res.params_dense == sum(
        p.numel() for n, p in ref.named_parameters() if not n.endswith("indexes"))


def test_dense_densenet_and_vgg(tmp_path: Path) -> None:
    ref = randomize(RefDenseNet(10, 4), 2)
    src = save_training(ref, tmp_path / "checkpoint.pth.tar")
    found = detect(torch.load(src, weights_only=True)["state_dict"])
    assert found.spec == "densenet40:depth=10,growth=4,stem=8"
    res = import_reference(src, None, tmp_path / "d.safetensors")
    assert res.meta["arch"] == "densenet40:depth=10,growth=4,stem=8"
    assert_same(ref, slim_of(res.out))

    cfg = [c if c == "M" else c // 8 for c in VGG_CFG[11]]  # = a dense vgg:depth=11,width=0.125
    vgg = randomize(RefVGG(cfg, num_classes=100), 3)
    src = save_training(vgg, tmp_path / "vgg.pth.tar", legacy=True)
    res = import_reference(src, "vgg:depth=11,width=0.125", None)
    assert res.out == tmp_path / "vgg.safetensors" and res.meta["dataset"] == "cifar100"
    assert res.meta["stage"] == "sparsify" and "widths" not in res.meta
    assert_same(vgg, slim_of(res.out))


# ------------------------------------------------------------------ pruned files (non-trivial selections)
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pruned_resnet_with_selection_indexes(tmp_path: Path, legacy: bool) -> None:
    ref, cfg = pruned_resnet(20, seed=4 + legacy)  # two blocks per stage: identity shortcuts too
    src = save_pruned(ref, cfg, tmp_path / "pruned.pth.tar", legacy)
    res = import_reference(src, "resnet164:depth=20", tmp_path / "p.safetensors")
    sels = res.converted.selections
    # the reference's kept indices are not the first k, and slim carries them as its own
    ref_kept = ref.layer2[1].select.indexes.detach().nonzero().reshape(-1).tolist()
    assert sels["stage2.1.bn1"] == ref_kept and ref_kept != list(range(len(ref_kept)))
    assert res.meta["stage"] == "pruned" and res.meta["widths"]["stage2.1.bn1"] == cfg[9]
    assert res.meta["prune"]["params_after"] == res.params < res.params_dense
    tensors = load_checkpoint(res.out).tensors
    assert tensors["stage2.1.bn1_select.indices"].tolist() == ref_kept
    assert_same(ref, res.model)
    assert_same(ref, slim_of(res.out), seed=1)


def test_pruned_densenet_and_finetuned_layout(tmp_path: Path) -> None:
    ref, cfg = pruned_densenet(10, 4, seed=5)
    src = save_pruned(ref, cfg, tmp_path / "pruned.pth.tar")
    res = import_reference(src, "densenet40:depth=10,growth=4,stem=8", tmp_path / "p.safetensors")
    assert len(res.converted.selections) == len(cfg) and res.meta["stage"] == "pruned"
    assert_same(ref, slim_of(res.out))
    # main.py --refine trains the pruned model and saves the training layout (no cfg): same shapes
    src = save_training(ref, tmp_path / "model_best.pth.tar", epoch=40)
    res = import_reference(src, "densenet40:depth=10,growth=4,stem=8", tmp_path / "f.safetensors")
    assert res.meta["stage"] == "finetuned" and res.source.cfg is None
    assert_same(ref, slim_of(res.out))


def test_pruned_vgg_at_full_arch(tmp_path: Path) -> None:
    """vggprune.py's output: every conv/BN narrowed in place (no selections), cfg with 'M'."""
    g = torch.Generator().manual_seed(6)
    cfg = [c if c == "M" else int(torch.randint(1, 12, (1,), generator=g)) for c in VGG_CFG[11]]
    ref = randomize(RefVGG(cfg), 6)
    src = save_pruned(ref, cfg, tmp_path / "pruned.pth.tar", legacy=True)
    res = import_reference(src, "vgg11", tmp_path / "v.safetensors")
    assert res.meta["widths"] == {f"features.{i}": c for i, c in zip(
        [1, 5, 9, 12, 16, 19, 23, 26], [c for c in cfg if c != "M"], strict=True)}
    assert not res.converted.selections
    assert_same(ref, slim_of(res.out))


def test_imported_checkpoint_prunes_again(tmp_path: Path) -> None:
    """An imported pruned checkpoint is an ordinary slim checkpoint: slim prune works on it."""
    from slimcli.flows.prune import prune_checkpoint
    from slimcli.prune import masked_dense

    ref, cfg = pruned_resnet(11, seed=7)
    src = save_pruned(ref, cfg, tmp_path / "pruned.pth.tar")
    out = import_reference(src, "resnet164:depth=11", tmp_path / "p.safetensors").out
    result = prune_checkpoint(out, "ratio", 0.3, out=tmp_path / "pp.safetensors")
    assert result.after.params < result.before.params
    dense = masked_dense(slim_of(out), result.plan)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(slim_of(result.out)(x), dense(x), atol=1e-5)


# ------------------------------------------------------------------ checks on the file itself
def test_cfg_that_disagrees_with_the_shapes(tmp_path: Path) -> None:
    ref, cfg = pruned_densenet(10, 4, seed=8)
    bad = [cfg[0] + 1, *cfg[1:]]
    with pytest.raises(CheckpointError, match=r"'cfg'.*disagrees"):
        import_reference(save_pruned(ref, bad, tmp_path / "p.pth.tar"), None, tmp_path / "o.safetensors")


def test_state_dict_without_num_batches_tracked() -> None:
    """Files from PyTorch < 0.4.1 lack num_batches_tracked: they import (the counter starts at 0)."""
    ref, cfg = pruned_densenet(10, 4, seed=14)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert_same(ref, convert(sd, None, cfg=cfg).model)


def test_dataparallel_prefix_and_bad_selection(tmp_path: Path) -> None:
    ref, cfg = pruned_densenet(10, 4, seed=15)
    src = tmp_path / "dp.pth.tar"
    torch.save({"cfg": cfg, "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, src)
    assert_same(ref, slim_of(import_reference(src, None, tmp_path / "dp.safetensors").out))
    sd = dict(ref.state_dict())
    sd["trans1.select.indexes"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"trans1\.select\.indexes has 3 entries"):
        convert(sd)
    sd["trans1.select.indexes"] = torch.zeros(sd["trans1.bn1.weight"].numel())
    with pytest.raises(CheckpointError, match="selects no channel"):
        convert(sd)


def test_convert_names_the_tensor_of_a_wrong_arch() -> None:
    sd = randomize(RefDenseNet(10, 4), 9).state_dict()
    with pytest.raises(CheckpointError, match=r"stem\.weight \(file conv1\.weight\).*"
                                              r"densenet40:depth=10,growth=4,stem=8"):
        convert(sd, "densenet40:depth=10,growth=4")
    with pytest.raises(CheckpointError, match="use --arch densenet40:depth=10,growth=4,stem=8"):
        convert(sd, "vgg11")


def test_docs_recipes(tmp_path: Path) -> None:
    """docs/checkpoint-format.md: import_pth + load_state_dict fits weights with slim's own keys;
    a reference file has other keys (the old recipe failed on it) and goes through slim import."""
    from slimcli.archs import create_arch
    from slimcli.checkpoint import import_pth

    spec = "vgg:depth=11,width=0.125"
    own = tmp_path / "own.pth"
    torch.save(create_arch(spec, 10).state_dict(), own)
    create_arch(spec, 10).load_state_dict(import_pth(own))
    ref = randomize(RefVGG([c if c == "M" else c // 8 for c in VGG_CFG[11]]), 13)
    src = save_training(ref, tmp_path / "model_best.pth.tar")
    with pytest.raises(RuntimeError, match=r"feature\.0\.weight"):
        create_arch(spec, 10).load_state_dict(import_pth(src))
    assert_same(ref, slim_of(import_reference(src, spec, tmp_path / "v.safetensors").out))


def test_default_out() -> None:
    assert default_out("runs/model_best.pth.tar") == Path("runs/model_best.safetensors")
    assert default_out("x/pruned.pth") == Path("x/pruned.safetensors")


# ------------------------------------------------------------------ through the CLI: one Error: line, exit 1
def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(["import", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def test_cli_import_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    ref, cfg = pruned_resnet(11, seed=10)
    src = save_pruned(ref, cfg, tmp_path / "pruned.pth.tar")
    code, out, _ = cli(capsys, str(src), "--arch", "resnet164:depth=11", "--json", "--dataset", "cifar10")
    doc = json.loads(out)
    assert code == 0 and doc["stage"] == "pruned" and doc["out"] == str(tmp_path / "pruned.safetensors")
    assert doc["selections"] and doc["params"] < doc["params_dense"]
    assert_same(ref, slim_of(Path(doc["out"])))
    code, out, _ = cli(capsys, str(src), "-o", str(tmp_path / "t.safetensors"))
    assert code == 0 and "channel selections carried over" in out
    code, _, err = cli(capsys, str(src), "-o", str(tmp_path / "t.safetensors"))  # never replaced silently
    assert code == 2 and "--force" in one_error(err)
    code, _, _ = cli(capsys, str(src), "-o", str(tmp_path / "t.safetensors"), "--force")
    assert code == 0


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vgg = randomize(RefVGG([c if c == "M" else 4 for c in VGG_CFG[11]]), 11)
    src = save_training(vgg, tmp_path / "vgg.pth.tar")
    o = ["--out", str(tmp_path / "o.safetensors")]

    code, _, err = cli(capsys, str(src), "--arch", "resnet164", *o)  # wrong family
    assert code == 1 and "use --arch vgg11" in one_error(err)
    dn = randomize(RefDenseNet(10, 4), 12)
    dsrc = save_training(dn, tmp_path / "dn.pth.tar")
    code, _, err = cli(capsys, str(dsrc), "--arch", "densenet40:depth=10,growth=4", *o)  # stem 8, not 16
    want = "shape mismatch: stem.weight (file conv1.weight) (8, 3, 3, 3) vs model (16, 3, 3, 3)"
    assert code == 1 and want in one_error(err)

    other = tmp_path / "other.pth"
    torch.save({"state_dict": nn.Linear(3, 2).state_dict()}, other)  # unknown layout
    code, _, err = cli(capsys, str(other), *o)
    assert code == 1 and "not a checkpoint of the network-slimming reference code" in one_error(err)

    whole = tmp_path / "whole.pth"
    torch.save(nn.Sequential(nn.Linear(3, 2)), whole)  # a pickled module: weights_only refuses it
    code, _, err = cli(capsys, str(whole), *o)
    line = one_error(err)
    assert code == 1 and "pickled torch.nn.modules.container.Sequential" in line and "weights_only" in line

    np = pytest.importorskip("numpy")
    npy = tmp_path / "numpy.pth.tar"
    torch.save({"epoch": 1, "state_dict": vgg.state_dict(), "best_prec1": np.float64(0.9)}, npy)
    code, _, err = cli(capsys, str(npy), *o)
    assert code == 1 and "pickled numpy" in one_error(err)

    code, _, err = cli(capsys, str(tmp_path / "missing.pth.tar"), *o)
    assert code == 1 and "not found" in one_error(err)
    assert not (tmp_path / "o.safetensors").exists()

    code, _, err = cli(capsys, str(src), "--dataset", "cifar100", *o)  # 10 outputs, not 100
    assert code == 2 and "classifies 10 classes" in one_error(err)
    code, _, err = cli(capsys, str(src), "--out", str(tmp_path / "o.pth"))
    assert code == 2 and ".safetensors" in one_error(err)
