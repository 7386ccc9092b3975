"""ONNX export: onnxruntime == PyTorch, dynamic batch, one file, metadata, atomic failure, the CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from _helpers import run_cli
from onnx import numpy_helper
from torch import fx, nn

from slimcli import export as ex
from slimcli.checkpoint import load_checkpoint, save_checkpoint
from slimcli.errors import ExportError, SlimError, UsageError
from slimcli.export import checkpoint_metadata_for_onnx, export_checkpoint, export_onnx, latest_accuracy
from slimcli.export import onnx as ex_onnx
from slimcli.export import verify as ex_verify
from slimcli.prune import ChannelSelection
from slimcli.prune.surgery import encode_keep

SHAPE = (3, 8, 8)
FAST = {"latency_runs": 2, "warmup_runs": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------
# small models covering the graph patterns slim exports
# --------------------------------------------------------------------------------------
def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so folding BN into a conv is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.2)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


class ConvNet(nn.Module):
    """conv-BN-ReLU-pool twice, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Residual(nn.Module):
    """A residual add around conv-BN-ReLU-conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.c1 = nn.Conv2d(6, 4, 1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.c2(F.relu(self.b1(self.c1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Concat(nn.Module):
    """Two branches concatenated on the channel axis (DenseNet's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(7)
        self.fc = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        z = torch.cat([y, self.c2(y)], 1)
        z = F.relu(self.b2(z))
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


class Selected(nn.Module):
    """A channel selection (index_select on a buffer) in front of a BN that reads a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.register_buffer("sel", torch.tensor([0, 2, 5, 7]))
        self.b2 = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 6, 1, bias=False)
        self.fc = nn.Linear(14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        z = torch.index_select(self.c2(y) + y, 1, self.sel)
        z = self.c3(F.relu(self.b2(z)))
        return self.fc(F.adaptive_avg_pool2d(torch.cat([z, y], 1), 1).flatten(1))


def selected_graph_module() -> fx.GraphModule:
    gm = fx.symbolic_trace(_randomize_bn(Selected(), seed=3))
    assert any(n.target is torch.index_select for n in gm.graph.nodes)  # what the pruner inserts
    return gm.eval()


MODELS = {
    "convnet": lambda: _randomize_bn(ConvNet()),
    "residual": lambda: _randomize_bn(Residual(), 1),
    "concat": lambda: _randomize_bn(Concat(), 2),
    "graphmodule-index_select": selected_graph_module,
}


def _ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _torch_run(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


# --------------------------------------------------------------------------------------
# export_onnx
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_matches_pytorch(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    real = torch.randn(6, *SHAPE) * 2
    report = export_onnx(
        model, tmp_path / "m.onnx", input_shape=SHAPE, metadata={"k": "v"}, real_inputs=real, **FAST
    )
    assert report.rel_diff <= 1e-4
    assert [(c.inputs, c.batch) for c in report.checks] == [("random", 1), ("random", 3), ("real", 6)]
    assert report.latency_ms is not None and report.latency_ms > 0
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.size_bytes == (tmp_path / "m.onnx").stat().st_size
    # an independent check on fresh inputs, from the file on disk
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(_ort_run(tmp_path / "m.onnx", x), _torch_run(model, x), atol=1e-5, rtol=1e-5)


def test_model_from_file_has_dynamic_batch(tmp_path: Path) -> None:
    model = MODELS["graphmodule-index_select"]()
    report = export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE, metadata={}, **FAST)
    assert report.input_shape == ("batch", *SHAPE)
    assert report.output_shape == ("batch", 5)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 5):
        x = torch.randn(batch, *SHAPE)
        got = _ort_run(tmp_path / "m.onnx", x)
        assert got.shape == (batch, 5)
        np.testing.assert_allclose(got, _torch_run(model, x), atol=1e-5, rtol=1e-5)


def test_single_file_with_embedded_initializers(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    export_onnx(MODELS["convnet"](), out, input_shape=SHAPE, metadata={}, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no external data, no temp file
    proto = onnx.load(str(out), load_external_data=False)
    assert proto.graph.initializer
    for init in proto.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL and not init.external_data
        assert init.HasField("raw_data") or numpy_helper.to_array(init).size == 0 or len(init.float_data)
        numpy_helper.to_array(init)  # readable without any side file


@pytest.mark.slow  # the first dynamo export in a process loads the onnxscript registry (~5 s)
def test_dynamo_exporter_and_auto_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("TorchScript exporter removed")

    monkeypatch.setitem(ex_onnx._EXPORT_FNS, "torchscript", broken)
    model = MODELS["graphmodule-index_select"]()
    report = export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE, metadata={"a": "b"}, **FAST)
    assert report.exporter == "dynamo" and report.rel_diff <= 1e-4
    x = torch.randn(5, *SHAPE)
    np.testing.assert_allclose(_ort_run(tmp_path / "m.onnx", x), _torch_run(model, x), atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_opset_is_honoured(tmp_path: Path) -> None:
    report = export_onnx(
        MODELS["concat"](), tmp_path / "m.onnx", input_shape=SHAPE, metadata={}, opset=13, **FAST
    )
    assert report.opset == 13
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]


def test_exporter_failure_is_one_line_and_silent(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """torch's TorchScript exporter dumps its IR graph to stdout (fd 1) when it fails."""
    try:
        model, out = MODELS["convnet"](), tmp_path / "m.onnx"
        export_onnx(model, out, input_shape=SHAPE, metadata={}, opset=25, exporter="torchscript")
    except ExportError as exc:
        assert "torchscript exporter failed" in str(exc) and "\n" not in str(exc)
    else:
        pytest.skip("this torch's TorchScript exporter supports opset 25")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not list(tmp_path.iterdir())


def test_caller_model_untouched(tmp_path: Path) -> None:
    model = MODELS["convnet"]().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE, metadata={}, **FAST)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _perturb_ort(monkeypatch: pytest.MonkeyPatch, delta: float) -> None:
    """Make onnxruntime's outputs differ from the model's by exactly ``delta``."""
    real_session = ex_verify.session_for

    class Perturbed:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def run(self, *args: object, **kwargs: object) -> list[np.ndarray]:
            return [o + np.float32(delta) for o in self.inner.run(*args, **kwargs)]

    monkeypatch.setattr(ex_verify, "session_for", lambda *a, **k: Perturbed(real_session(*a, **k)))


def test_relative_diff_definition_and_tolerance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = MODELS["convnet"]()
    with torch.no_grad():
        model.fc.weight.mul_(200.0)  # logits well above 1, so the scale max(1, max|torch|) matters
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    scale = max(1.0, float(np.abs(_torch_run(model, x)).max()))
    assert scale > 5
    # an absolute error below tolerance × scale passes, and is reported as such
    _perturb_ort(monkeypatch, 0.5e-4 * scale)
    report = export_onnx(
        model,
        tmp_path / "ok.onnx",
        input_shape=SHAPE,
        metadata={},
        real_inputs=x,
        exporter="torchscript",
        **FAST,
    )
    real = report.checks[-1]
    assert real.max_abs_diff == pytest.approx(0.5e-4 * scale, rel=0.05)
    assert real.rel_diff == pytest.approx(real.max_abs_diff / scale, rel=1e-6)
    # twice the tolerance fails: ExportError, and nothing at the destination
    _perturb_ort(monkeypatch, 2e-4 * scale)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(
            model,
            tmp_path / "bad.onnx",
            input_shape=SHAPE,
            metadata={},
            real_inputs=x,
            exporter="torchscript",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx"]


def test_failed_export_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")
    _perturb_ort(monkeypatch, 1.0)
    with pytest.raises(ExportError, match="nothing written"):
        export_onnx(MODELS["concat"](), out, input_shape=SHAPE, metadata={}, exporter="torchscript")
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_nan_from_onnxruntime_is_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _perturb_ort(monkeypatch, float("nan"))
    with pytest.raises(ExportError):
        export_onnx(
            MODELS["convnet"](), tmp_path / "m.onnx", input_shape=SHAPE, metadata={}, exporter="torchscript"
        )
    assert not list(tmp_path.iterdir())


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported although the destination is unusable")

    monkeypatch.setattr(ex_onnx, "_build", fail)


def test_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    # a path under a regular file is unwritable for anyone, root included
    with pytest.raises(ExportError, match="not a folder"):
        export_onnx(MODELS["convnet"](), afile / "x.onnx", input_shape=SHAPE, metadata={})
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(MODELS["convnet"](), tmp_path / "missing" / "x.onnx", input_shape=SHAPE, metadata={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_work(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="cannot write to folder"):
            export_onnx(MODELS["convnet"](), ro / "x.onnx", input_shape=SHAPE, metadata={})
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o700)


def test_bad_arguments(tmp_path: Path) -> None:
    m = MODELS["convnet"]()
    with pytest.raises(UsageError, match=r"\.onnx"):
        export_onnx(m, tmp_path / "x.pt", input_shape=SHAPE, metadata={})
    with pytest.raises(UsageError, match="strings"):
        export_onnx(m, tmp_path / "x.onnx", input_shape=SHAPE, metadata={"n": 3})  # type: ignore[dict-item]
    with pytest.raises(UsageError, match="real_inputs"):
        export_onnx(
            m, tmp_path / "x.onnx", input_shape=SHAPE, metadata={}, real_inputs=torch.zeros(2, 3, 4, 4)
        )
    with pytest.raises(UsageError, match="opset"):
        export_onnx(m, tmp_path / "x.onnx", input_shape=SHAPE, metadata={}, opset=3)
    assert not list(tmp_path.iterdir())


def test_missing_onnxruntime_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(SlimError, match=r'pip install "slim-prune\[onnx\]"'):
        export_onnx(MODELS["convnet"](), tmp_path / "x.onnx", input_shape=SHAPE, metadata={})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------
META = {
    "arch": "resnet164:depth=11",
    "num_classes": 10,
    "input_shape": list(SHAPE),
    "dataset": "synthetic:n=64,n_test=40,size=8",
    "classes": [f"class{i}" for i in range(10)],
    "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    "stage": "pruned",
    "metrics": {"sparsify": {"test_acc": 0.9, "test_loss": 0.3}, "pruned": {"test_acc": 0.75}},
}


def test_latest_accuracy() -> None:
    assert latest_accuracy(META) == 0.75
    assert latest_accuracy({**META, "stage": "finetuned"}) == 0.75  # no finetuned entry: the latest stage
    assert latest_accuracy({**META, "stage": "sparsify"}) == 0.9
    assert latest_accuracy({"metrics": {}}) is None
    assert latest_accuracy({}) is None


def test_metadata_props_present_and_parse(tmp_path: Path) -> None:
    props = checkpoint_metadata_for_onnx({**META, "widths": {"stage1.0.bn2": 3}}, sha256="ab" * 32)
    export_onnx(MODELS["convnet"](), tmp_path / "m.onnx", input_shape=SHAPE, metadata=props, **FAST)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    stored = {p.key: p.value for p in proto.metadata_props}
    # export_onnx adds what it measured on the exported model itself: params, MACs, the target
    assert stored == {**props, "slim.params": stored["slim.params"], "slim.macs": stored["slim.macs"],
                      "slim.target": "generic"}
    from slimcli.measure import measure

    cost = measure(MODELS["convnet"](), SHAPE)
    assert (int(stored["slim.params"]), int(stored["slim.macs"])) == (cost.params, cost.macs)
    # what an application on the device sees
    seen = ort.InferenceSession(str(tmp_path / "m.onnx")).get_modelmeta().custom_metadata_map
    assert seen["slim.arch"] == "resnet164:depth=11"
    assert json.loads(seen["slim.widths"]) == {"stage1.0.bn2": 3}
    assert json.loads(seen["slim.classes"]) == META["classes"]
    assert json.loads(seen["slim.normalization"]) == META["normalization"]
    assert json.loads(seen["slim.input_shape"]) == list(SHAPE)
    assert int(seen["slim.num_classes"]) == 10
    assert float(seen["slim.accuracy"]) == 0.75
    assert seen["slim.stage"] == "pruned"
    assert seen["slim.source_sha256"] == "ab" * 32
    assert "slim.version" in seen


# --------------------------------------------------------------------------------------
# checkpoints and the CLI
# --------------------------------------------------------------------------------------
def _pruned_checkpoint(path: Path, arch: str = META["arch"]) -> tuple[nn.Module, dict[str, int]]:
    """A pruned pre-activation ResNet (or ``arch``; channel selections included) saved as a slim
    checkpoint."""
    from slimcli.archs import create_arch
    from slimcli.data import create_dataset
    from slimcli.prune import prunable_bns, prune_model

    torch.manual_seed(0)
    dense = _randomize_bn(create_arch(arch, 10, SHAPE))
    bns = prunable_bns(dense, SHAPE)
    masks = {n: torch.arange(b.channels) % 3 != 1 for n, b in bns.items() if b.prunable}
    slim_model, report = prune_model(dense, masks, input_shape=SHAPE)
    ds = create_dataset(META["dataset"])
    meta = {**META, "arch": arch, "widths": report.widths,
            "normalization": {"mean": list(ds.mean), "std": list(ds.std)},
            "coupling": report.coupling, "keep": encode_keep(report.keep)}  # as slim prune writes them
    save_checkpoint(path, slim_model, meta)
    assert any(w < bns[n].channels for n, w in report.widths.items())
    return slim_model.eval(), report.widths


def _conv_weight_shapes(path: Path) -> list[tuple[int, ...]]:
    proto = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    return sorted(inits[n.input[1]] for n in proto.graph.node if n.op_type == "Conv")


def test_export_checkpoint_has_slim_shapes_and_metadata(tmp_path: Path) -> None:
    ckpt_path = tmp_path / "pruned.safetensors"
    slim_model, widths = _pruned_checkpoint(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    report = export_checkpoint(ckpt, tmp_path / "m.onnx", latency_runs=2, as_pruned=True)
    assert report.checks[-1].inputs == "real" and report.checks[-1].batch == ex.REAL_SAMPLES
    assert not report.notes
    assert "slim.form" not in report.metadata
    assert report.rel_diff <= 1e-4
    # the ONNX convs have the slim model's weight shapes (BN folding keeps them), not the dense ones
    slim_convs = sorted(tuple(m.weight.shape) for m in slim_model.modules() if isinstance(m, nn.Conv2d))
    assert _conv_weight_shapes(tmp_path / "m.onnx") == slim_convs
    meta = ort.InferenceSession(str(tmp_path / "m.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(meta["slim.widths"]) == widths
    assert meta["slim.source_sha256"] == ckpt.sha256
    # real inputs are the dataset's test images, normalised as in training
    real = ex.sample_inputs(ckpt)
    from slimcli.data import create_dataset

    images, _ = create_dataset(META["dataset"]).load("test")
    norm = ckpt.meta["normalization"]
    first = (images[0].float() / 255 - torch.tensor(norm["mean"]).view(-1, 1, 1)) / torch.tensor(
        norm["std"]
    ).view(-1, 1, 1)
    assert real.shape == (ex.REAL_SAMPLES, *SHAPE)
    torch.testing.assert_close(real[0], first)


@pytest.mark.parametrize(("target", "selections", "pad"), [("generic", "zero", 4), ("ort", "auto", 2),
                                                          ("generic", "gather", 1), ("generic", "conv", 2),
                                                          ("generic", "pieces", 1)])
def test_export_re_forms_a_slim_model_for_its_target(tmp_path: Path, target: str, selections: str,
                                                     pad: int) -> None:
    """The file computes the checkpoint's model; widths padded, selections as the target wants."""
    ckpt_path = tmp_path / "pruned.safetensors"
    slim_model, _ = _pruned_checkpoint(ckpt_path)
    report = export_checkpoint(load_checkpoint(ckpt_path), tmp_path / "m.onnx", latency_runs=0, target=target,
                               selections=None if target == "ort" else selections, pad_to=pad)
    assert report.notes and report.notes[0].startswith(f"re-formed for --target {target}")
    form = json.loads(report.metadata["slim.form"])
    assert form["pad_to"] == pad
    if target == "ort":  # --selections not given: auto, zero, gather, pieces were timed, the fastest taken
        timed = {f"{s}/{pad}" for s in ("auto", "zero", "gather", "pieces")}
        assert set(form["timed"]["ms"]) <= timed | {"dense"}
        selections = form["selections"]
    assert form["selections"] == selections
    assert form["as_pruned"]["params"] == sum(p.numel() for p in slim_model.parameters())
    assert int(report.metadata["slim.params"]) == report.params  # the file's own count
    x = torch.randn(5, *SHAPE)
    got, want = _ort_run(tmp_path / "m.onnx", x), _torch_run(slim_model, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    gathers = sum(n.op_type == "Gather" for n in proto.graph.node)
    assert (gathers == 0) == (selections in ("zero", "conv")) or selections in ("auto", "pieces")
    if selections == "conv":  # the selections became one-hot 1×1 convs
        as_pruned = sum(isinstance(m, ChannelSelection) for m in slim_model.modules())
        convs = len(_conv_weight_shapes(tmp_path / "m.onnx"))
        assert as_pruned and convs == as_pruned + sum(isinstance(m, nn.Conv2d) for m in slim_model.modules())
    from slimcli.archs import create_arch

    dense = {c for m in create_arch(META["arch"], 10, SHAPE).modules() if isinstance(m, nn.Conv2d)
             for c in (m.in_channels, m.out_channels)}
    for shape in _conv_weight_shapes(tmp_path / "m.onnx"):
        depthwise = shape[1] == 1 and tuple(shape[2:]) == (1, 1)  # a BatchNorm after a selection
        counts = shape[:1] if depthwise else shape[:2]
        assert all(c % pad == 0 or c in dense for c in counts), shape  # padded, or a dense width


def test_a_densenet_exported_with_pieces_reads_no_concatenation_through_a_gather(tmp_path: Path) -> None:
    """--selections pieces: each layer's BN reads the pieces of the concatenation it selects from."""
    ckpt_path = tmp_path / "pruned.safetensors"
    slim_model, _ = _pruned_checkpoint(ckpt_path, "densenet40:depth=7,growth=4,stem=8")
    report = export_checkpoint(load_checkpoint(ckpt_path), tmp_path / "m.onnx", latency_runs=0,
                               selections="pieces", pad_to=1)
    form = json.loads(report.metadata["slim.form"])
    assert form["selections"] == "pieces" and form["forms"]["pieces"] >= 2
    assert form["bn_as_depthwise_conv"] >= form["forms"]["pieces"]
    assert {name for name, f in form["layers"].items() if f == "pieces"} <= set(slim_model.slim_widths)
    x = torch.randn(5, *SHAPE)
    got, want = _ort_run(tmp_path / "m.onnx", x), _torch_run(slim_model, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    gathers = [n for n in graph.node if n.op_type == "Gather"]
    assert gathers and not any(made_by.get(n.input[0]) == "Concat" for n in gathers)
    # where a BN read a Gather, a depthwise conv does: no BatchNormalization is left behind one
    assert not any(n.op_type == "BatchNormalization" and made_by.get(n.input[0]) == "Gather"
                   for n in graph.node)


@pytest.mark.parametrize("target", ["ncnn", "openvino"])
def test_a_pruned_resnet_exported_for_its_target_computes_right_there(tmp_path: Path, target: str) -> None:
    """The gathers of a pruned pre-activation ResNet are mistranslated by ncnn; re-formed, it is exact.

    Run as `slim export` in a child process: ncnn and OpenVINO loaded into the test process crashed a
    later test at teardown (a native allocator destroyed out of order)."""
    import subprocess

    from slimcli.export.runtimes import runtime_version

    if runtime_version(target) is None:
        pytest.skip(f"{target} is not installed")
    ckpt_path = tmp_path / "pruned.safetensors"
    _pruned_checkpoint(ckpt_path)
    out = tmp_path / "m.onnx"
    cmd = [sys.executable, "-m", "slimcli", "export", str(ckpt_path), str(out), "--target", target,
           "--pad-to", "4", "--latency-runs", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # the export checks the file in the target runtime
    assert target in done.stdout  # the runtime's parity row
    if target == "ncnn":
        assert not any(n.op_type == "Gather" for n in onnx.load(str(out)).graph.node)


def test_export_times_the_paddings_when_none_is_given(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --pad-to the paddings are timed; the fastest wins, one with more MACs only by a margin."""
    from slimcli.export import choose

    ckpt_path = tmp_path / "pruned.safetensors"
    _pruned_checkpoint(ckpt_path)
    fake = {"zero/1": 10.0, "zero/8": 9.9, "zero/16": 5.0, "dense": 8.0}  # pad 8: within the margin
    monkeypatch.setattr(choose, "time_forms",
                        lambda models, *a, **k: {n: {1: fake[n], 32: fake[n]} for n in models})
    report = export_checkpoint(load_checkpoint(ckpt_path), tmp_path / "m.onnx", latency_runs=0)
    form = json.loads(report.metadata["slim.form"])
    assert form["pad_to"] == 16 and set(form["timed"]["ms"]) == set(fake)
    assert form["timed"]["vs_dense"] == {"1": 5.0 / 8.0, "32": 5.0 / 8.0}  # timed with the dense model
    assert "0.62× the dense time at batch 1" in report.notes[0]
    fake.update({"zero/16": 9.8, "dense": 12.0})  # within the margin: the fewest MACs stay
    report = export_checkpoint(load_checkpoint(ckpt_path), tmp_path / "m2.onnx", latency_runs=0)
    assert json.loads(report.metadata["slim.form"])["pad_to"] == 1
    assert "no faster than dense" not in report.notes[0]
    fake.update({"dense": 9.85})  # pad 1 would be slower than dense, pad 16 is not: never knowingly slower
    report = export_checkpoint(load_checkpoint(ckpt_path), tmp_path / "m3.onnx", latency_runs=0)
    assert json.loads(report.metadata["slim.form"])["pad_to"] == 16
    fake.update({"dense": 8.0})  # every form slower than dense: the best worst case, and it is said
    report = export_checkpoint(load_checkpoint(ckpt_path), tmp_path / "m4.onnx", latency_runs=0)
    assert json.loads(report.metadata["slim.form"])["pad_to"] == 16
    assert "no faster than dense there" in report.notes[0]


def test_a_slim_checkpoint_without_its_kept_channels_exports_as_pruned(tmp_path: Path) -> None:
    """An older checkpoint (no slim.keep): re-forming cannot know the channels; the check refuses it."""
    ckpt_path = tmp_path / "pruned.safetensors"
    slim_model, _ = _pruned_checkpoint(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    ckpt.meta.pop("keep")
    report = export_checkpoint(ckpt, tmp_path / "m.onnx", latency_runs=0, pad_to=4)
    assert report.notes[0].startswith("exported as pruned (not re-formed")
    x = torch.randn(5, *SHAPE)
    got, want = _ort_run(tmp_path / "m.onnx", x), _torch_run(slim_model, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_export_checkpoint_from_meta_and_model(tmp_path: Path) -> None:
    """What ``prune --export`` does: an in-memory model and its metadata, before any file exists."""
    model = MODELS["graphmodule-index_select"]()
    meta = {**META, "arch": "selected", "num_classes": 5, "dataset": "no-such-dataset", "widths": {"b2": 4}}
    report = export_checkpoint(meta, tmp_path / "m.onnx", model=model, sha256="cd" * 32, latency_runs=0)
    assert report.latency_ms is None
    assert report.notes and "real-data check skipped" in report.notes[0]
    assert [c.inputs for c in report.checks] == ["random", "random"]
    assert report.metadata["slim.source_sha256"] == "cd" * 32


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "pruned.safetensors"
    slim_model, _ = _pruned_checkpoint(ckpt)
    out = tmp_path / "model.onnx"
    code, stdout, stderr = run_cli(
        ["export", str(ckpt), str(out), "--latency-runs", "3", "--opset", "17", "--as-pruned"], capsys
    )
    assert code == 0, stderr
    assert "re-formed" not in stderr
    words = ("model.onnx", "opset", "17", "batch×3×8×8", "params", "max diff", "latency", "16 test images")
    for word in words:
        assert word in stdout
    assert f"{sum(p.numel() for p in slim_model.parameters()):,}" in stdout
    x = torch.randn(5, *SHAPE)
    np.testing.assert_allclose(_ort_run(out, x), _torch_run(slim_model, x), atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "pruned.safetensors"]
    code, stdout, stderr = run_cli(["export", str(ckpt), str(out), "--force", "--latency-runs", "0",
                                    "--selections", "zero", "--pad-to", "4"], capsys)
    assert code == 0, stderr
    assert "re-formed for --target generic" in stderr and "multiples of 4" in stderr
    np.testing.assert_allclose(_ort_run(out, x), _torch_run(slim_model, x), atol=1e-5, rtol=1e-5)
    assert not any(n.op_type == "Gather" for n in onnx.load(str(out)).graph.node)
    code, _, stderr = run_cli(["export", str(ckpt), str(out), "--force", "--selections", "copy"], capsys)
    assert code == 2 and "--selections" in stderr
    code, _, stderr = run_cli(["export", str(ckpt), str(out), "--force", "--pad-to", "0"], capsys)
    assert code == 2 and "--pad-to" in stderr


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "pruned.safetensors"
    _pruned_checkpoint(ckpt)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(ckpt.read_bytes()[:-100])
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        ([str(tmp_path / "missing.safetensors"), str(tmp_path / "a.onnx")], 1, "not found"),
        ([str(corrupt), str(tmp_path / "a.onnx")], 1, "truncated"),
        ([str(ckpt), str(afile / "a.onnx")], 1, "not a folder"),
        ([str(ckpt), str(tmp_path / "nope" / "a.onnx")], 1, "does not exist"),
        ([str(ckpt), str(tmp_path / "a.pt")], 2, ".onnx"),
        ([str(ckpt), str(tmp_path / "a.onnx"), "--opset", "3"], 2, "opset"),
    ]
    for args, expected, words in cases:
        code, stdout, stderr = run_cli(["export", *args, "--latency-runs", "0"], capsys)
        assert code == expected, (args, stderr)
        assert stdout == ""  # errors go to stderr only
        assert words in stderr and "Traceback" not in stderr
        if expected == 1:
            assert stderr.strip().splitlines()[-1].startswith("Error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "afile",
        "corrupt.safetensors",
        "pruned.safetensors",
    ]


def test_cli_no_real_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "pruned.safetensors"
    _pruned_checkpoint(ckpt)
    code, stdout, stderr = run_cli(
        ["export", str(ckpt), str(tmp_path / "m.onnx"), "--no-real-data", "--latency-runs", "0"], capsys
    )
    assert code == 0, stderr
    assert "real-data check skipped" in stderr
    assert "random inputs (batch 1, 3)" in stdout and "test images" not in stdout and "latency" not in stdout


def test_the_timed_choice_never_trusts_a_near_tie_with_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Near-ties with dense are noise: the best worst case wins; more MACs than dense must clearly win."""
    from slimcli.export import choose

    def net(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 4, 1))

    models = {"zero": net(8), "onehot": net(32)}  # in order of preference; onehot has more MACs than dense
    fake: dict[str, float] = {}
    monkeypatch.setattr(choose, "time_forms", lambda m, *a, **k: {n: {1: fake[n], 32: fake[n]} for n in m})

    def pick(**times: float) -> str:
        fake.clear()
        fake.update(times)
        return choose.fastest(models, SHAPE, batches=(1, 32), baseline=net(16))[0]

    assert pick(zero=8.0, onehot=9.0, dense=10.0) == "zero"  # clearly faster than dense
    assert pick(zero=10.2, onehot=9.7, dense=10.0) == "zero"  # onehot only ties: its MACs say slower
    assert pick(zero=10.2, onehot=8.5, dense=10.0) == "onehot"  # clearly faster despite its MACs
    models = {"zero/1": net(8), "zero/8": net(12)}
    assert pick(**{"zero/1": 9.8, "zero/8": 9.0, "dense": 10.0}) == "zero/8"  # 0.98× is no margin
    assert pick(**{"zero/1": 9.0, "zero/8": 8.5, "dense": 10.0}) == "zero/1"  # both clear: preference
    models = {"zero": net(8), "gather": net(8)}
    assert pick(zero=9.7, gather=9.6, dense=10.0) == "zero"  # neither clear of dense: no reason to move
    assert pick(zero=10.3, gather=9.7, dense=10.0) == "gather"  # a clearly better worst case does
