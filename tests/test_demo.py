"""``slim demo``: the whole chain runs (tiny settings), leaves every artefact, and its numbers hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _helpers import run_cli

from slimcli.checkpoint import file_sha256, load_checkpoint
from slimcli.flows.demo import STAGES, choose_ratio
from slimcli.measure import measure
from slimcli.model import build_model

ARTEFACTS = [
    "sparsify/last.safetensors", "sparsify/metrics.jsonl", "pruned.safetensors", "pruned.onnx",
    "finetune/last.safetensors", "finetune/metrics.jsonl", "dense.onnx", "model.onnx", "summary.json",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_the_whole_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code, stdout, stderr = run_cli(["demo", "--fast", "--out", str(out), "--ratio", "0.5"], capsys)
    assert code == 0, stderr
    for name in ARTEFACTS:
        assert (out / name).is_file(), name
    for step in range(1, 7):
        assert f"{step}/6 " in stderr  # progress on stderr
    for word in ("what-if", "every stage", "dense", "pruned", "fine-tuned", "ONNX", "params", "FLOPs",
                 "ONNX size", "latency", "accuracy", "0 test predictions differ"):
        assert word in stdout, word

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["stage"]: r for r in summary["rows"]}
    assert list(rows) == list(STAGES)
    assert summary["ratio"] == 0.5 and summary["onnx_disagreements"] == 0
    assert rows["pruned"]["params"] < rows["dense"]["params"]
    assert rows["pruned"]["flops"] < rows["dense"]["flops"]
    assert rows["pruned"]["params"] == rows["finetuned"]["params"] <= rows["onnx"]["params"]  # zero-padded
    assert rows["onnx"]["params"] <= rows["dense"]["params"]
    assert rows["onnx"]["flops"] <= rows["dense"]["flops"]
    assert "timed interleaved" in stdout
    assert rows["pruned"]["onnx_bytes"] < rows["dense"]["onnx_bytes"]
    assert rows["onnx"]["accuracy"] == rows["finetuned"]["accuracy"]  # no prediction differs
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and r["latency_ms"] > 0 and r["onnx_bytes"] > 0

    # the chain's checkpoints: each one's lineage points at the file before it
    dense = load_checkpoint(out / "sparsify" / "last.safetensors")
    pruned = load_checkpoint(out / "pruned.safetensors")
    final = load_checkpoint(out / "finetune" / "last.safetensors")
    assert [e["stage"] for e in final.lineage] == ["sparsify", "pruned", "finetuned"]
    assert pruned.lineage[-1]["parent"] == file_sha256(out / "sparsify" / "last.safetensors")
    assert final.lineage[-1]["parent"] == file_sha256(out / "pruned.safetensors")
    assert final.widths == pruned.widths and pruned.stage == "pruned" and final.stage == "finetuned"
    assert pruned.metrics["pruned"]["test_acc"] == pytest.approx(rows["pruned"]["accuracy"])
    assert dense.meta["train"]["penalty"].startswith("tl1")
    shape = final.input_shape
    model = build_model(final)
    assert measure(model, shape).params == rows["finetuned"]["params"]

    # model.onnx: the fine-tuned slim model, in onnxruntime, with its metadata
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5, rtol=1e-5)
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["slim.widths"]) == final.widths and props["slim.stage"] == "finetuned"


def test_demo_refuses_a_used_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    code, stdout, stderr = run_cli(["demo", "--fast", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 2 and stdout == "" and "--out" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    code, _, stderr = run_cli(["demo", "--fast", "--ratio", "1"], capsys)
    assert code == 2 and "between 0 and 1" in stderr


@pytest.mark.parametrize(
    ("dead", "safe", "expected"),
    [(0.74, 0.85, 0.7), (0.7, 0.85, 0.7), (0.3 + 0.45, 0.85, 0.75), (0.93, 0.85, 0.85), (0.0, 0.85, 0.05),
     (0.62, 0.0, 0.6)],
)
def test_choose_ratio(dead: float, safe: float, expected: float) -> None:
    assert choose_ratio(dead, safe) == pytest.approx(expected, abs=1e-12)
