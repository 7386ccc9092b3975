"""int8 export: a QDQ model that runs in onnxruntime with a dynamic batch, agrees with fp32 on top-1,
is calibrated on the checkpoint's training images, and carries its own (measured) accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _helpers import run_cli
from test_export import META, MODELS, SHAPE, _pruned_checkpoint

from slimcli.checkpoint import load_checkpoint
from slimcli.errors import DataError
from slimcli.export import export_checkpoint, export_onnx
from slimcli.export.int8 import compare_int8, int8_path, quantize_int8

pytestmark = pytest.mark.usefixtures("one_thread")
#: stated bar: int8 and fp32 agree on top-1 for at least this fraction of inputs
AGREEMENT = 0.9


def test_quantized_model_runs_and_agrees_with_fp32(tmp_path: Path) -> None:
    model = MODELS["convnet"]()
    export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE, metadata={}, latency_runs=0)
    fp32 = (tmp_path / "m.onnx").read_bytes()
    gen = torch.Generator().manual_seed(1)
    q = quantize_int8(fp32, torch.randn(128, *SHAPE, generator=gen))
    proto = onnx.load_from_string(q)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    session = ort.InferenceSession(q, providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis stays dynamic
        x = torch.randn(batch, *SHAPE, generator=gen)
        assert session.run(None, {"input": x.numpy()})[0].shape == (batch, 4)
    x = torch.randn(400, *SHAPE, generator=gen)
    res = compare_int8(fp32, q, test=(x, torch.zeros(400, dtype=torch.long)), latency_runs=2, sample=x)
    assert res["agreement"] >= AGREEMENT, res
    assert res["int8_latency_ms"] > 0 and res["fp32_latency_ms"] > 0
    assert len(q) < len(fp32) or len(fp32) < 20_000  # tiny models: the QDQ scales can outweigh the saving


def test_export_checkpoint_int8(tmp_path: Path) -> None:
    ckpt_path = tmp_path / "pruned.safetensors"
    _pruned_checkpoint(ckpt_path)
    out = tmp_path / "m.onnx"
    report = export_checkpoint(load_checkpoint(ckpt_path), out, latency_runs=2, int8=True, calibration=32)
    q = report.extension
    assert q.path == int8_path(out) == tmp_path / "m.int8.onnx" and q.path.exists()
    assert q.calibration_images == 32 and q.test_images == 40  # synthetic:n_test=40
    assert q.size_bytes == q.path.stat().st_size and q.fp32_size_bytes == out.stat().st_size
    assert 0 <= q.agreement <= 1 and q.accuracy_drop == pytest.approx(q.fp32_accuracy - q.int8_accuracy)
    props = {p.key: p.value for p in onnx.load(str(q.path)).metadata_props}
    quant = json.loads(props["slim.quantization"])
    assert quant["format"] == "QDQ" and quant["calibration_images"] == 32
    assert quant["calibration_split"] == "train"
    assert json.loads(props["slim.accuracy"]) == q.int8_accuracy  # the int8 model's own number
    assert props["slim.arch"] == META["arch"] and "slim.macs" in props
    # the fp32 accuracy reported is that of the fp32 ONNX file on the whole test split
    from slimcli.data import create_dataset
    from slimcli.model import Normalizer

    images, labels = create_dataset(META["dataset"]).load("test")
    norm = load_checkpoint(ckpt_path).meta["normalization"]
    x = Normalizer(norm["mean"], norm["std"], torch.device("cpu"))(images)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    acc = float((session.run(None, {"input": x.numpy()})[0].argmax(1) == labels.numpy()).mean())
    assert acc == q.fp32_accuracy


def test_int8_without_the_dataset_writes_nothing(tmp_path: Path) -> None:
    model = MODELS["graphmodule-index_select"]()
    meta = {**META, "arch": "selected", "num_classes": 5, "dataset": "no-such-dataset", "widths": {"b2": 4}}
    with pytest.raises(Exception, match="no-such-dataset") as info:
        export_checkpoint(meta, tmp_path / "m.onnx", model=model, sha256="cd" * 32, latency_runs=0, int8=True)
    assert isinstance(info.value, DataError) or "unknown" in str(info.value).lower()
    assert list(tmp_path.iterdir()) == []


def test_cli_int8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "pruned.safetensors"
    _pruned_checkpoint(ckpt)
    out = tmp_path / "model.onnx"
    code, stdout, stderr = run_cli(["export", str(ckpt), str(out), "--latency-runs", "2", "--int8",
                                    "--calibration", "16"], capsys)
    assert code == 0, stderr
    for word in ("int8 model", "model.int8.onnx", "test accuracy", "drop", "16 training"):
        assert word in stdout
    assert (tmp_path / "model.int8.onnx").exists()
    x = np.zeros((2, *SHAPE), dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": x})[0].shape == (2, 10)
    code, _, stderr = run_cli(["export", str(ckpt), str(out), "--int8", "--calibration", "0"], capsys)
    assert code == 2
