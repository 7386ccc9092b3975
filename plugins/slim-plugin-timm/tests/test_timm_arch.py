"""The timm plugin: spec forms, errors, the model it builds, torch.fx tracing by slim's pruning
analysis on several zoo families, and sparsify-train → prune → export on the command line.

Skips cleanly where the plugin is not installed, or where timm does not import. Where the real
torchvision does not import (a CUDA torchvision next to a CPU torch raises RuntimeError), timm is
imported with the minimal stand-in of ``torchvision_standin.py`` — the few torchvision names timm
touches at import, none of which builds a model; it is removed again right after.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch import nn

os.environ["SLIM_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # hermetic, as slim's own suite (when run alone)

arch = pytest.importorskip("slim_plugin_timm.arch", reason="pip install -e plugins/slim-plugin-timm")

from torchvision_standin import standin_torchvision  # noqa: E402

from slimcli.archs import create_arch  # noqa: E402
from slimcli.errors import PluginError, UsageError  # noqa: E402
from slimcli.registry import ARCHS  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small models; a busy shared CPU spin-waits with more
    yield
    torch.set_num_threads(before)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``slim ARGV`` in-process: ``(exit code, stdout, stderr)``."""
    from slimcli.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


@pytest.fixture(scope="module")
def timm() -> ModuleType:
    with standin_torchvision():
        return pytest.importorskip("timm", reason="pip install timm (and a torchvision matching torch)")


def test_import_failure_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Needs no timm: what a user sees where timm does not import."""

    def broken(name: str) -> ModuleType:
        raise RuntimeError("operator torchvision::nms does not exist\n(traceback lines)")

    monkeypatch.setattr(arch, "importlib", SimpleNamespace(import_module=broken))  # the plugin's view only
    expected = (r"timm does not import here \(RuntimeError: operator torchvision::nms does not exist\); "
                r"install timm with a torchvision")
    with pytest.raises(PluginError, match=expected):
        ARCHS.parse("timm:resnet18")
    assert ARCHS.get("timm").cls is arch.Timm  # registered without importing timm


def test_entry_point_names_the_module() -> None:
    try:
        dist = importlib.metadata.distribution("slim-plugin-timm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the plugin is on the path but not installed as a distribution")
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == "slim.archs"}
    assert eps == {"timm": "slim_plugin_timm.arch"}


def test_spec_forms_and_errors(timm: ModuleType) -> None:
    for text in ["timm:mobilenetv2_100", "timm:model=mobilenetv2_100"]:
        spec = ARCHS.parse(text)
        assert str(spec) == "timm:mobilenetv2_100" and spec.options["drop_rate"] == 0.0
    spec = ARCHS.parse("timm:resnet18:drop_rate=0.2,drop_path_rate=0.1")
    assert str(spec) == "timm:resnet18:drop_rate=0.2,drop_path_rate=0.1" and ARCHS.parse(str(spec)) == spec
    with pytest.raises(UsageError, match="name a model: timm:NAME"):
        ARCHS.parse("timm")
    close = r"no model 'mobilenetv2_10' in timm .*Did you mean .*'mobilenetv2_100'"
    with pytest.raises(UsageError, match=close):
        ARCHS.parse("timm:mobilenetv2_10")
    with pytest.raises(UsageError, match="drop_rate' must satisfy 0 <= drop_rate < 1"):
        ARCHS.parse("timm:resnet18:drop_rate=1")


def test_builds_the_timm_model_for_the_dataset(timm: ModuleType) -> None:
    torch.manual_seed(0)
    model = create_arch("timm:resnet18", num_classes=7, input_shape=(1, 32, 32)).eval()
    assert type(model) is type(timm.create_model("resnet18"))  # timm's own module, not a wrapper
    assert model.conv1.in_channels == 1 and model.get_classifier().out_features == 7
    assert model.input_shape == (1, 32, 32)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=7, in_chans=1)
    assert model.state_dict().keys() == reference.state_dict().keys()  # timm's key names
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


ZOO = ["mobilenetv2_100", "resnet18", "efficientnet_b0", "ghostnet_100", "regnetx_002"]


@pytest.mark.parametrize("name", ZOO)
def test_slims_analysis_traces_zoo_models(timm: ModuleType, name: str) -> None:
    """torch.fx traces the model exactly, and the pruning analysis accounts for every BatchNorm
    (how many are prunable depends on the engine; see docs/plugins.md for what was measured)."""
    from slimcli.prune import prunable_bns

    model = create_arch(f"timm:{name}", num_classes=10, input_shape=(3, 224, 224)).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))
    info = prunable_bns(model, (3, 224, 224))
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert sorted(info) == sorted(bns) and len(bns) > 0
    assert all(b.prunable or b.reason for b in info.values())  # a frozen BN says why


def test_trains_prunes_and_exports_on_the_command_line(
    timm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    import onnxruntime as ort

    from slimcli.checkpoint import load_checkpoint
    from slimcli.model import build_model

    run = tmp_path / "run"
    data = "synthetic:n=32,n_test=16,size=32,classes=3"
    code, _, err = run_cli(["sparsify-train", "--arch", "timm:model=resnet18", "--dataset", data, "--epochs",
                            "1", "--batch-size", "16", "--gamma-init", "0.5", "--out", str(run)], capsys)
    assert code == 0, err
    ckpt = load_checkpoint(run / "best.safetensors")
    assert ckpt.meta["arch"] == "timm:resnet18" and ckpt.num_classes == 3

    onnx_path = tmp_path / "slim.onnx"
    code, stdout, err = run_cli(["prune", str(run / "best.safetensors"), "--ratio", "0.3", "--recalibrate",
                                 "0", "--json", "--export", str(onnx_path)], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    pruned = load_checkpoint(Path(res["out"]))
    assert pruned.meta["prune"]["params_after"] < pruned.meta["prune"]["params_before"]
    slim = build_model(pruned)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, slim(x).numpy(), rtol=1e-4, atol=1e-4)
