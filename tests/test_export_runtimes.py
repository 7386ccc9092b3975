"""Export quality and other runtimes: parity in OpenCV/OpenVINO/ncnn (skipped when not installed),
a runtime that computes wrongly fails the export (nothing written), identity channel selections
removed, honest metadata (accuracy only for the model measured; params, MACs, target, lineage)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _helpers import run_cli
from test_export import META, MODELS, SHAPE, _pruned_checkpoint, _randomize_bn
from torch import fx, nn

from slimcli.errors import ExportError, UsageError
from slimcli.export import checkpoint_metadata_for_onnx, export_onnx
from slimcli.export import runtimes as rt
from slimcli.export.forms import remove_identity_selections
from slimcli.measure import interleaved_medians
from slimcli.prune import ChannelSelection

FAST = {"latency_runs": 0}
pytestmark = pytest.mark.usefixtures("one_thread")


def _gathers(path: Path) -> int:
    return sum(n.op_type == "Gather" for n in onnx.load(str(path)).graph.node)


def test_parse_runtimes() -> None:
    assert rt.parse_runtimes("openvino, ort") == ("ort", "openvino")  # canonical order
    assert rt.parse_runtimes("all") == rt.RUNTIMES
    assert rt.parse_runtimes("cv2,ov") == ("opencv", "openvino")
    with pytest.raises(UsageError, match="tflite"):
        rt.parse_runtimes("ort,tflite")


def test_interleaved_medians_fills_a_time_budget_up_to_max_runs() -> None:
    calls = {"a": 0, "b": 0}
    fns = {k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}
    interleaved_medians(fns, runs=3, warmup=1)
    assert calls == {"a": 4, "b": 4}  # no budget: exactly the runs asked for
    interleaved_medians(fns, runs=3, warmup=1, budget_s=60.0, max_runs=40)
    assert calls == {"a": 4 + 41, "b": 4 + 41}  # cheap functions: the cap, not a minute


def test_interleaved_medians_times_each_function() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    med = interleaved_medians(fns, runs=3, warmup=1)
    assert calls == ["a", "b"] * 4  # interleaved, warm-up round included
    assert set(med) == {"a", "b"} and all(v >= 0 for v in med.values())


def test_ort_check_reports_parity_and_latency() -> None:
    model = MODELS["residual"]()
    data = _export_bytes(model)
    (check,) = rt.check_runtimes(data, model, SHAPE, ["ort"], latency_runs=3)
    assert check.runtime == "ort" and check.ok and check.rel_diff <= 1e-5
    assert check.latency_ms is not None and check.latency_ms > 0


def _export_bytes(model: nn.Module, tmp: Path | None = None) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(tmp or d) / "m.onnx"
        export_onnx(model, path, input_shape=SHAPE, metadata={}, **FAST)
        return path.read_bytes()


@pytest.mark.parametrize("runtime", ["opencv", "openvino", "ncnn"])
@pytest.mark.parametrize("name", ["convnet", "residual", "concat"])
def test_runtime_parity(runtime: str, name: str) -> None:
    pytest.importorskip(rt._MODULES[runtime])
    if runtime == "ncnn":
        pytest.importorskip("pnnx")
    model = MODELS[name]()
    (check,) = rt.check_runtimes(_export_bytes(model), model, SHAPE, [runtime], latency_runs=2)
    assert check.rel_diff <= 1e-4, check
    assert check.latency_ms is not None


def test_openvino_is_compiled_in_f32(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO's CPU default may be bf16; the check compiles with the f32 hint, and it is in effect."""
    ov = pytest.importorskip("openvino")
    import tempfile

    compiled: list[object] = []

    class Core(ov.Core):  # type: ignore[misc, name-defined]
        def compile_model(self, *args: object, **kwargs: object) -> object:
            compiled.append(super().compile_model(*args, **kwargs))
            return compiled[-1]

    monkeypatch.setattr(ov, "Core", Core)
    model = MODELS["convnet"]()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        path.write_bytes(_export_bytes(model))
        run = rt._load_openvino(b"", path, SHAPE, 1, Path(d))
        x = torch.randn(2, *SHAPE)
        with torch.no_grad():
            ref = model(x).numpy()
        assert np.abs(run(x.numpy()) - ref).max() <= 1e-5
    assert "float32" in str(compiled[0].get_property("INFERENCE_PRECISION_HINT"))  # type: ignore[attr-defined]


def test_wrong_runtime_fails_the_export_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime whose outputs differ from PyTorch is an error, never a silent success."""
    real = rt._LOADERS["ort"]

    def off_by_a_bit(*args: object) -> rt.Run:
        run = real(*args)  # type: ignore[arg-type]
        return lambda x: run(x) + 1e-2

    monkeypatch.setitem(rt._LOADERS, "ort", off_by_a_bit)
    with pytest.raises(ExportError, match=r"computed wrongly by ort.*nothing written"):
        export_onnx(MODELS["convnet"](), tmp_path / "m.onnx", input_shape=SHAPE, metadata={}, runtimes="ort",
                    **FAST)
    assert list(tmp_path.iterdir()) == []
    # the same through the target: --target openvino implies an OpenVINO check
    monkeypatch.setattr(rt, "runtime_version", lambda name: None)
    with pytest.raises(ExportError, match=r"not installed: openvino.*pip install"):
        export_onnx(MODELS["convnet"](), tmp_path / "m.onnx", input_shape=SHAPE, metadata={},
                    target="openvino", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="tflite"):
        export_onnx(MODELS["convnet"](), tmp_path / "m.onnx", input_shape=SHAPE, metadata={}, target="tflite")


# --------------------------------------------------------------------------------------
# identity channel selections
# --------------------------------------------------------------------------------------
class Selections(nn.Module):
    """An identity selection (all 8 channels, in order), a prefix one (0..3 of 8) and an index_select."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.all = ChannelSelection(list(range(8)))
        self.prefix = ChannelSelection([0, 1, 2, 3])
        self.register_buffer("every", torch.arange(8))
        self.b2, self.b3 = nn.BatchNorm2d(8), nn.BatchNorm2d(4)
        self.fc = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        a = self.b2(self.all(y))
        b = self.b3(self.prefix(y))
        c = torch.index_select(y, 1, self.every)
        return self.fc(torch.cat([a, b, c], 1).mean((2, 3)))


@pytest.mark.parametrize("as_graph", [False, True])
def test_identity_selections_are_removed(as_graph: bool, tmp_path: Path) -> None:
    model = _randomize_bn(Selections(), 4)
    if as_graph:
        model = fx.symbolic_trace(model).eval()
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        ref = model(x)
    report = export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE, metadata={}, **FAST)
    # the identity ChannelSelection goes (and, in a graph, the identity index_select); the prefix stays
    assert report.identity_selections_removed == (2 if as_graph else 1)
    assert _gathers(tmp_path / "m.onnx") == (1 if as_graph else 2)
    assert report.rel_diff <= 1e-5
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)  # the caller's model is untouched
    copy, n = remove_identity_selections(fx.symbolic_trace(Selections()).eval(), SHAPE)
    left = [node for node in copy.graph.nodes if "index_select" in str(node.target)]  # fx inlines the modules
    assert n == 2 and len(left) == 1


# --------------------------------------------------------------------------------------
# honest metadata
# --------------------------------------------------------------------------------------
def test_pruned_without_eval_does_not_carry_the_dense_accuracy() -> None:
    meta = {**META, "stage": "pruned", "metrics": {"sparsify": {"test_acc": 0.9}},
            "lineage": [{"stage": "pruned", "parent_sha256": "ab" * 32}]}
    props = checkpoint_metadata_for_onnx(meta)
    assert "slim.accuracy" not in props
    parent = json.loads(props["slim.accuracy_parent"])
    assert parent["stage"] == "sparsify" and parent["accuracy"] == 0.9 and "not this one" in parent["note"]
    assert json.loads(props["slim.lineage"]) == meta["lineage"]
    evaluated = {**meta, "metrics": {**meta["metrics"], "pruned": {"test_acc": 0.7}}}
    measured = checkpoint_metadata_for_onnx(evaluated)
    assert json.loads(measured["slim.accuracy"]) == 0.7 and "slim.accuracy_parent" not in measured


def test_every_file_has_params_macs_and_target(tmp_path: Path) -> None:
    from slimcli.measure import measure

    model = MODELS["graphmodule-index_select"]()
    report = export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE, metadata={}, target="ort", **FAST)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    cost = measure(model, SHAPE)
    assert int(props["slim.params"]) == cost.params == report.params
    assert int(props["slim.macs"]) == cost.macs == report.macs
    assert props["slim.target"] == "ort"


# --------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------
def test_cli_check_runtimes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "pruned.safetensors"
    _pruned_checkpoint(ckpt)
    out = tmp_path / "m.onnx"
    code, stdout, stderr = run_cli(["export", str(ckpt), str(out), "--latency-runs", "0", "--check-runtimes",
                                    "ort", "--target", "ort"], capsys)
    assert code == 0, stderr
    assert "runtimes: parity" in stdout and "ort" in stdout and "MACs" in stdout
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["slim.target"] == "ort"
    for bad in (["--check-runtimes", "tflite"], ["--target", "tflite"]):
        code, _, stderr = run_cli(["export", str(ckpt), str(tmp_path / "n.onnx"), *bad], capsys)
        assert code == 2 and "tflite" in stderr
    assert not (tmp_path / "n.onnx").exists()
