"""``slim prune``: the rules on real checkpoints, the slim checkpoint it writes, ONNX, and bad input."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _helpers import run_cli
from torch import nn

from slimcli.archs import create_arch
from slimcli.checkpoint import file_sha256, lineage_entry, load_checkpoint, save_checkpoint
from slimcli.errors import ExportError
from slimcli.flows import prune as pc
from slimcli.measure import measure
from slimcli.model import build_model, evaluate
from slimcli.prune import compute_keep, masked_dense, prunable_bns, prune_model
from slimcli.prune.surgery import decode_keep
from slimcli.registry import ARCHS

ARCH = "vgg:depth=11,width=0.0625"  # BN widths 4, 8, 16, 16, 32, 32, 32, 32
DATASET = "fashion-mini"
SHAPE = (1, 28, 28)
SYN = "synthetic:n=16,n_test=16,size=16,classes=3"  # for the pre-activation ResNet


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# checkpoints to prune


def _bns(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _model(arch: str = ARCH, shape: tuple[int, ...] = SHAPE, classes: int = 10, seed: int = 0) -> nn.Module:
    """A model with distinct random |γ|, β and BN statistics (so every removed channel matters)."""
    torch.manual_seed(seed)
    model = create_arch(arch, classes, shape)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in _bns(model).values():
            n = bn.num_features
            bn.weight.copy_(torch.rand(n, generator=g) * 0.9 + 0.05)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.1)
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def _meta(
    arch: str = ARCH, dataset: str = DATASET, shape: tuple[int, ...] = SHAPE, classes: int = 10
) -> dict:
    return {
        "arch": arch, "num_classes": classes, "input_shape": list(shape), "dataset": dataset,
        "classes": [f"c{i}" for i in range(classes)], "normalization": {"mean": [0.3] * shape[0],
                                                                         "std": [0.35] * shape[0]},
        "stage": "sparsify", "metrics": {"sparsify": {"test_acc": 0.5, "test_loss": 1.0}},
        "lineage": [lineage_entry("sparsify", None, "slim sparsify-train --arch vgg11")],
    }


def _ckpt(path: Path, model: nn.Module | None = None, **meta: object) -> tuple[Path, nn.Module]:
    model = model if model is not None else _model()
    save_checkpoint(path, model, {**_meta(), **meta})
    return path, model


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    code, stdout, stderr = run_cli([*argv, "--json"], capsys)
    assert code == 0, stderr
    return json.loads(stdout)  # --json prints one document and nothing else


def _paper_threshold(model: nn.Module, ratio: float) -> float:
    prunable = [n for n, b in prunable_bns(model, SHAPE).items() if b.prunable]
    flat = torch.sort(torch.cat([model.get_submodule(n).weight.detach().abs() for n in prunable])).values
    return float(flat[math.floor(ratio * flat.numel())])


def _same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...] = SHAPE) -> None:
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------
# the rules


def test_ratio_uses_the_paper_threshold_and_writes_a_loadable_slim_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, dense = _ckpt(tmp_path / "best.safetensors")
    sha_in = file_sha256(ckpt)
    res = _json(["prune", "--recalibrate", "0", str(ckpt), "--ratio", "0.4"], capsys)
    text_out = str(tmp_path / "t.safetensors")
    code, stdout, _ = run_cli(["prune", "--recalibrate", "0", str(ckpt), "--ratio", "0.4", "--out", text_out],
                              capsys)
    assert code == 0 and re.search(r"┃\s+of ┃\n", stdout), stdout  # no empty "note" column

    threshold = _paper_threshold(dense, 0.4)
    assert res["prune"]["threshold"] == pytest.approx(threshold)
    expected = {n: int((dense.get_submodule(n).weight.abs() > threshold).sum()) for n in res["widths"]}
    assert res["widths"] == expected and min(expected.values()) >= 1
    out = tmp_path / "best-pruned.safetensors"  # the default name, next to the input
    assert res["out"] == str(out) and file_sha256(ckpt) == sha_in  # the input is untouched

    loaded = load_checkpoint(out)
    assert loaded.stage == "pruned" and loaded.widths == expected
    assert loaded.meta["prune"]["rule"] == "ratio" and loaded.meta["prune"]["value"] == 0.4
    assert loaded.meta["prune"]["kept"] == expected
    assert loaded.meta["prune"]["params_after"] == measure(build_model(loaded), SHAPE).params
    assert loaded.meta["prune"]["params_before"] == measure(dense, SHAPE).params
    assert loaded.meta["prune"]["flops_after"] < loaded.meta["prune"]["flops_before"]
    lineage = loaded.lineage
    assert len(lineage) == 2 and lineage[-1]["stage"] == "pruned" and lineage[-1]["parent"] == sha_in
    assert "prune" in lineage[-1]["command"]
    assert res["sha256"] == loaded.sha256

    # rebuilt from the dense architecture + widths: equals the dense model with the pruned
    # channels zeroed, on the slim shapes
    slim = build_model(loaded)
    masks = {n: dense.get_submodule(n).weight.detach().abs() > threshold for n in expected}
    _same_outputs(slim, masked_dense(dense, masks))
    assert {n: slim.get_submodule(n).num_features for n in expected} == expected


def test_threshold_zero_keeps_exactly_the_nonzero_gammas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dense = _model()
    zeros = {"features.1": [0, 2], "features.9": list(range(0, 16, 2)), "features.26": [5]}
    with torch.no_grad():
        for name, idx in zeros.items():
            dense.get_submodule(name).weight[idx] = 0.0  # what a proximal run leaves: exact zeros
    ckpt, _ = _ckpt(tmp_path / "prox.safetensors", dense)
    res = _json(["prune", "--recalibrate", "0", str(ckpt), "--threshold", "0"], capsys)
    bns = _bns(dense)
    widths = {n: int((bns[n].weight != 0).sum()) for n in res["widths"]}
    assert res["widths"] == widths
    assert sum(bns[n].num_features for n in widths) - sum(widths.values()) == sum(map(len, zeros.values()))
    masks = {n: bns[n].weight.detach() != 0 for n in widths}
    _same_outputs(build_model(load_checkpoint(res["out"])), masked_dense(dense, masks))


@pytest.mark.parametrize(("option", "key"), [("--target-params", "params"), ("--target-flops", "flops")])
def test_targets_reach_the_budget(
    option: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, dense = _ckpt(tmp_path / "a.safetensors")
    res = _json(["prune", str(ckpt), option, "0.5"], capsys)
    p = res["prune"]
    assert p["rule"] == option[2:].replace("-", "_")
    assert p[f"{key}_after"] <= 0.5 * p[f"{key}_before"]
    assert p[f"{key}_after"] / p[f"{key}_before"] == pytest.approx(p["achieved"])
    slim = build_model(load_checkpoint(res["out"]))
    assert getattr(measure(slim, SHAPE), key) == p[f"{key}_after"]
    # the largest model within budget: also keeping the channel at the threshold would exceed it
    gammas = torch.cat([dense.get_submodule(n).weight.detach().abs() for n in res["widths"]])
    lower = float(gammas[gammas < p["threshold"]].max())
    bigger, _ = prune_model(dense, compute_keep(dense, "threshold", lower, 1, input_shape=SHAPE))
    assert getattr(measure(bigger, SHAPE), key) > 0.5 * p[f"{key}_before"]


def test_min_channels_keeps_a_layer_the_rule_empties_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dense = _model()
    with torch.no_grad():
        dense.features[26].weight.fill_(1e-4)  # the last BN (32 channels): every γ below the others
    ckpt, _ = _ckpt(tmp_path / "a.safetensors", dense)

    code, stdout, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.3"], capsys)
    assert code == 0, stderr
    assert "kept 1 of 32 channels of features.26 (min-channels; the rule alone kept 0)" in stdout
    assert re.search(r"┃\s+of ┃ note\s+┃", stdout) and re.search(r"32 │ min-channels", stdout), stdout
    assert load_checkpoint(tmp_path / "a-pruned.safetensors").widths["features.26"] == 1

    res = _json(["prune", str(ckpt), "--ratio", "0.3", "--min-channels", "3", "--out",
                 str(tmp_path / "m3.safetensors")], capsys)
    assert res["widths"]["features.26"] == 3
    assert res["prune"]["min_channels_bit"] == {"features.26": [0, 3]}
    # the 3 kept are the largest |γ| of that layer, so outputs equal the masked dense model
    g = dense.features[26].weight.detach().abs()
    threshold = res["prune"]["threshold"]
    masks = {n: dense.get_submodule(n).weight.detach().abs() > threshold for n in res["widths"]}
    masks["features.26"] = torch.zeros(32, dtype=torch.bool)
    masks["features.26"][torch.argsort(g, descending=True, stable=True)[:3]] = True
    _same_outputs(build_model(load_checkpoint(res["out"])), masked_dense(dense, masks))

    before = _files(tmp_path)
    code, stdout, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.3", "--min-channels", "0",
                                 "--out", str(tmp_path / "m0.safetensors")], capsys)
    assert code == 1 and stdout == ""
    last = stderr.strip().splitlines()[-1]  # progress lines come before it on stderr
    assert last.startswith("Error: ") and "features.26" in last and stderr.count("Error") == 1
    assert _files(tmp_path) == before  # nothing written


def test_newest_checkpoint_under_runs_is_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli(["prune", "--ratio", "0.5"], capsys)
    assert code == 2 and "./runs" in stderr  # nothing to prune yet: a usage error

    old, _ = _ckpt(tmp_path / "runs" / "old" / "best.safetensors")
    new, _ = _ckpt(tmp_path / "runs" / "b" / "new" / "last.safetensors", _model(seed=1))
    state = tmp_path / "runs" / "b" / "new" / "last.state.safetensors"
    state.write_bytes(b"not a checkpoint")  # training state: never picked
    hidden = tmp_path / "runs" / "old" / ".x.tmp.safetensors"
    hidden.write_bytes(b"half-written")  # a temporary file: never picked
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    os.utime(state, (3_000_000, 3_000_000))
    os.utime(hidden, (3_000_000, 3_000_000))
    code, stdout, stderr = run_cli(["prune", "--ratio", "0.5"], capsys)
    assert code == 0, stderr
    assert str(Path("runs/b/new/last.safetensors")) in stderr  # the path is printed
    written = tmp_path / "runs" / "b" / "new" / "last-pruned.safetensors"
    assert written.is_file() and str(Path("runs/b/new/last-pruned.safetensors")) in stdout
    assert load_checkpoint(written).lineage[-1]["parent"] == file_sha256(new)

    # a second run does not prune its own (newer) output, and prefers the run's best over its last
    best, _ = _ckpt(tmp_path / "runs" / "b" / "new" / "best.safetensors", _model(seed=2))
    os.utime(best, (1_500_000, 1_500_000))
    again = ["prune", "--ratio", "0.5", "--out", str(tmp_path / "again.safetensors")]
    code, _, stderr = run_cli(again, capsys)
    assert code == 0, stderr
    assert str(Path("runs/b/new/best.safetensors")) in stderr
    assert load_checkpoint(tmp_path / "again.safetensors").lineage[-1]["parent"] == file_sha256(best)


# ----------------------------------------------------------------------------------------------
# --eval and --export


def test_eval_records_the_accuracy_of_the_slim_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = _ckpt(tmp_path / "a.safetensors")
    res = _json(["prune", "--recalibrate", "0", str(ckpt), "--ratio", "0.5", "--eval", "--device", "cpu"],
                capsys)
    loaded = load_checkpoint(res["out"])
    loss, acc = evaluate(build_model(loaded), DATASET, normalization=([0.3], [0.35]))
    assert res["accuracy"] == pytest.approx(acc) and res["loss"] == pytest.approx(loss)
    assert loaded.meta["prune"]["accuracy"] == pytest.approx(acc)
    assert loaded.metrics["pruned"]["test_acc"] == pytest.approx(acc)
    assert loaded.metrics["sparsify"] == {"test_acc": 0.5, "test_loss": 1.0}  # the parent's number stays
    # a preloaded split gives the same numbers as evaluate's own read of it
    from slimcli.data import create_dataset

    test = create_dataset(DATASET).load("test")
    assert evaluate(build_model(loaded), DATASET, normalization=([0.3], [0.35]), data=test) == (loss, acc)
    assert res["accuracy_before"] == 0.5
    code, stdout, _ = run_cli(["prune", "--recalibrate", "0", str(ckpt), "--ratio", "0.5", "--eval",
                               "--device", "cpu", "--out", str(tmp_path / "b.safetensors")], capsys)
    assert code == 0 and "right after pruning" in stdout and f"{acc:.2%}" in stdout


def test_export_writes_the_slim_onnx_with_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = _ckpt(tmp_path / "a.safetensors")
    onnx_path = tmp_path / "slim.onnx"
    code, stdout, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.5", "--export", str(onnx_path)], capsys)
    assert code == 0, stderr
    assert "ONNX export" in stdout and "batch×1×28×28" in stdout
    loaded = load_checkpoint(tmp_path / "a-pruned.safetensors")
    slim = build_model(loaded)

    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, slim(x).numpy(), atol=1e-5, rtol=1e-5)

    proto = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["slim.widths"]) == loaded.widths
    assert props["slim.stage"] == "pruned" and props["slim.arch"] == ARCH
    assert props["slim.source_sha256"] == loaded.sha256 == file_sha256(tmp_path / "a-pruned.safetensors")
    assert json.loads(props["slim.prune"])["threshold"] == loaded.meta["prune"]["threshold"]
    # slim shapes: the first conv's weight has as many filters as its BN kept (BN folded in or not)
    w0 = loaded.widths["features.1"]
    shapes = [tuple(i.dims) for i in proto.graph.initializer]
    # the export may pad the kept count with zero filters (to a multiple of pad_to, or the dense width)
    pad = json.loads(props["slim.form"])["pad_to"]
    from slimcli.model import dense_model

    dense_w = dense_model(loaded).get_submodule("features.1").num_features
    padded = min(-(-w0 // pad) * pad, dense_w)
    # (the first conv reads the one input channel; 1×1 kernels with one input channel are the depthwise
    # convs a BatchNorm after a channel selection becomes)
    first = [s for s in shapes if len(s) == 4 and s[1] == 1 and tuple(s[2:]) != (1, 1)]
    assert any(s[0] in (w0, padded) for s in first), (w0, pad, shapes[:3])
    assert not any(s[0] == 4 for s in first) or 4 in (w0, padded)  # 4: the dense width
    n_params = sum(int(np.prod(s)) for s in shapes)
    assert n_params < measure(_model(), SHAPE).params  # smaller than the dense model


def test_repruning_a_preactivation_resnet_composes_selections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch, shape = "resnet164:depth=11", (3, 16, 16)
    dense = _model(arch, shape, classes=3)
    ckpt, _ = _ckpt(tmp_path / "r.safetensors", dense, **_meta(arch, SYN, shape, 3))
    first = _json(["prune", "--recalibrate", "0", str(ckpt), "--ratio", "0.3"], capsys)
    second = _json(["prune", "--recalibrate", "0", first["out"], "--ratio", "0.3", "--export",
                    str(tmp_path / "r.onnx")], capsys)
    assert sum(second["widths"].values()) < sum(first["widths"].values())
    assert any(layer["needs_selection"] for layer in second["layers"])  # BNs reading the residual trunk
    twice = load_checkpoint(second["out"])
    assert [e["stage"] for e in twice.lineage] == ["sparsify", "pruned", "pruned"]
    assert twice.lineage[-1]["parent"] == first["sha256"]
    # both prunes together = the dense model with every channel dropped at either step zeroed
    once = build_model(load_checkpoint(first["out"]))
    slim = build_model(twice)
    masks = {}
    for name, bn in _bns(dense).items():
        keep1 = bn.weight.detach().abs() > first["prune"]["threshold"]
        if not keep1.any():
            keep1[bn.weight.detach().abs().argmax()] = True
        kept_gamma = once.get_submodule(name).weight.detach().abs() if name in first["widths"] else None
        if kept_gamma is None:
            continue
        survivors = keep1.nonzero().flatten()
        keep2 = kept_gamma > second["prune"]["threshold"]
        if not keep2.any():
            keep2[kept_gamma.argmax()] = True
        mask = torch.zeros_like(keep1)
        mask[survivors[keep2]] = True
        masks[name] = mask
    _same_outputs(slim, masked_dense(dense, masks), shape)
    assert second["export"]["path"] == str(tmp_path / "r.onnx")


# ----------------------------------------------------------------------------------------------
# bad input: clear errors, exit 1 (2 for usage), nothing written


class NoBN(nn.Module):
    """conv-ReLU-pool-linear: nothing to prune."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def nobn_arch() -> object:
    ARCHS.names()  # the built-ins first, so they are not registered under our name later
    ARCHS.register("nobn-test")(NoBN)
    yield "nobn-test"
    ARCHS.unregister("nobn-test")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--ratio", "0.5", "--threshold", "0.1"], "exactly one"),
        (["--target-params", "0.5", "--target-flops", "0.5"], "exactly one"),
        ([], "exactly one"),
        (["--ratio", "0"], "strictly between 0 and 1"),
        (["--ratio", "1"], "strictly between 0 and 1"),
        (["--ratio", "1.5"], "strictly between 0 and 1"),
        (["--ratio", "-0.1"], "strictly between 0 and 1"),
        (["--threshold", "-1"], ">= 0"),
        (["--target-params", "0"], "(0, 1]"),
        (["--target-flops", "1.2"], "(0, 1]"),
        (["--ratio", "0.5", "--min-channels", "-1"], "min-channels"),
        (["--ratio", "0.5", "--export", "model.pt"], ".onnx"),
        (["--ratio", "0.5", "--out", "pruned.pt"], ".safetensors"),
        (["--ratio", "0.5", "--device", "gpu"], "device"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = _ckpt(tmp_path / "a.safetensors")
    code, stdout, stderr = run_cli(["prune", str(ckpt), *args], capsys)
    assert code == 2 and stdout == "" and words in stderr and "Traceback" not in stderr
    assert _files(tmp_path) == ["a.safetensors"]


@pytest.mark.parametrize(("args", "rule", "value"), [
    (["--ratio", "1.5"], "ratio", 1.5), (["--ratio", "0"], "ratio", 0.0),
    (["--threshold", "-1"], "threshold", -1.0), (["--target-flops", "1.2"], "target_flops", 1.2),
])
def test_the_cli_and_the_library_give_the_same_message(
    args: list[str], rule: str, value: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimcli.errors import UsageError

    ckpt, _ = _ckpt(tmp_path / "a.safetensors")
    with pytest.raises(UsageError) as info:
        pc.prune_checkpoint(ckpt, rule, value)
    code, stdout, stderr = run_cli(["prune", str(ckpt), *args], capsys)
    assert code == 2 and stdout == ""
    assert str(info.value) in " ".join(stderr.split()), stderr  # rich may wrap the line
    assert _files(tmp_path) == ["a.safetensors"]


def test_out_equal_to_the_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, _ = _ckpt(tmp_path / "a.safetensors")
    sha = file_sha256(ckpt)
    for out in (ckpt, tmp_path / "." / "a.safetensors"):
        code, _, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.5", "--out", str(out)], capsys)
        assert code == 2 and "never overwrites its input" in stderr
    assert file_sha256(ckpt) == sha and _files(tmp_path) == ["a.safetensors"]


def _runtime_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 1 and stdout == "", stderr
    last = stderr.strip().splitlines()[-1]  # progress lines may come before it on stderr
    assert last.startswith("Error: ") and stderr.count("Error") == 1 and "Traceback" not in stderr
    return last


def test_checkpoint_without_batchnorm(
    nobn_arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    ckpt, _ = _ckpt(tmp_path / "n.safetensors", NoBN(10, SHAPE), arch=nobn_arch)
    assert "nothing to prune" in _runtime_error(["prune", str(ckpt), "--ratio", "0.5"], capsys)
    assert _files(tmp_path) == ["n.safetensors"]


def test_corrupt_and_missing_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, _ = _ckpt(tmp_path / "a.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(ckpt.read_bytes()[:-50])
    assert "truncated" in _runtime_error(["prune", str(corrupt), "--ratio", "0.5"], capsys)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert "not a safetensors file" in _runtime_error(["prune", str(garbage), "--ratio", "0.5"], capsys)
    missing = str(tmp_path / "nope.safetensors")
    assert "not found" in _runtime_error(["prune", missing, "--ratio", "0.5"], capsys)
    assert _files(tmp_path) == ["a.safetensors", "corrupt.safetensors", "garbage.safetensors"]


def test_unwritable_onnx_destination_fails_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = _ckpt(tmp_path / "a.safetensors")
    afile = tmp_path / "afile"
    afile.write_text("x")
    bad = [(tmp_path / "missing" / "m.onnx", "does not exist"), (afile / "m.onnx", "not a folder")]
    if sys.platform.startswith("linux") and Path("/proc").is_dir():
        bad.append((Path("/proc/slim-test.onnx"), "cannot write"))  # unwritable even for root
    for path, words in bad:
        assert words in _runtime_error(["prune", str(ckpt), "--ratio", "0.5", "--export", str(path)], capsys)
    assert _files(tmp_path) == ["a.safetensors", "afile"]


def test_a_failing_export_leaves_no_pruned_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, _ = _ckpt(tmp_path / "a.safetensors")
    seen = {}

    def broken(meta: dict, path: Path, **kw: object) -> None:
        seen["files"] = _files(tmp_path)  # the checkpoint exists only as a temporary file here
        raise ExportError("parity check failed")

    monkeypatch.setattr("slimcli.flows.prune.export_checkpoint", broken)
    with pytest.raises(ExportError):
        pc.prune_checkpoint(ckpt, "ratio", 0.5, export=tmp_path / "m.onnx")
    assert any(n.startswith(".a-pruned.safetensors.") for n in seen["files"])
    assert _files(tmp_path) == ["a.safetensors"]


def test_library_checks_rules_before_loading(tmp_path: Path) -> None:
    from slimcli.errors import UsageError

    missing = tmp_path / "missing.safetensors"  # never read: the rule is checked first
    for rule, value in [("ratio", 0.0), ("ratio", 1.0), ("threshold", float("nan")), ("target_flops", 0),
                        ("median", 0.5)]:
        with pytest.raises(UsageError):
            pc.prune_checkpoint(missing, rule, value)
    for bad in (-1, 1.5, True):
        with pytest.raises(UsageError, match=r"^min_channels must be an integer >= 0, got "):
            pc.prune_checkpoint(missing, "ratio", 0.5, bad)
    assert pc.default_out(Path("runs/x/best.safetensors")) == Path("runs/x/best-pruned.safetensors")


def test_unreachable_target_names_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, _ = _ckpt(tmp_path / "a.safetensors")
    argv = ["prune", str(ckpt), "--target-params", "1e-6", "--min-channels", "2"]
    code, stdout, stderr = run_cli(argv, capsys)
    last = stderr.strip().splitlines()[-1]
    assert code == 1 and stdout == "" and last.startswith("Error: cannot keep only 1e-06 of the parameters")
    assert "(--min-channels 2)" in last and "ask for a larger fraction" in last
    assert not (tmp_path / "a-pruned.safetensors").exists()


def test_coupling_and_round_to_through_the_cli_rebuild_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A post-activation ResNet: auto prunes its residual groups jointly, the checkpoint records the
    coupling and the exact kept channels, and it rebuilds to the masked dense model; --round-to 4
    gives multiples of 4; re-pruning with another coupling is refused; select keeps the old result."""
    arch = "resnet56:depth=8"
    dense = _model(arch)
    ckpt, _ = _ckpt(tmp_path / "r.safetensors", dense, arch=arch)
    res = _json(["prune", "--recalibrate", "0", str(ckpt), "--ratio", "0.5", "--round-to", "4"], capsys)
    loaded = load_checkpoint(Path(res["out"]))
    assert loaded.meta["coupling"] == "auto" and loaded.meta["prune"]["groups"]
    assert all(w % 4 == 0 or w == _bns(dense)[n].num_features for n, w in loaded.widths.items())
    rounding = loaded.meta["prune"]["rounding"]
    assert rounding["round_to"] == 4 and rounding["params_unrounded"] <= loaded.meta["prune"]["params_after"]
    slim = build_model(loaded)
    masks = decode_keep(loaded.meta["keep"])
    _same_outputs(slim, masked_dense(dense, masks))

    code, _, stderr = run_cli(["prune", "--recalibrate", "0", res["out"], "--ratio", "0.3",
                               "--coupling", "select", "--out", str(tmp_path / "again.safetensors")], capsys)
    assert code == 1 and "pruned with --coupling auto" in stderr and stderr.count("Error:") == 1

    old = _json(["prune", "--recalibrate", "0", str(ckpt), "--ratio", "0.5", "--coupling", "select",
                 "--out", str(tmp_path / "sel.safetensors")], capsys)
    rows = {r["name"]: r for r in old["layers"]}
    assert not rows["stage1.0.bn2"]["prunable"] and "tied to" in rows["stage1.0.bn2"]["reason"]
    code, _, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.5", "--coupling", "both"], capsys)
    assert code == 2 and "coupling" in stderr


def test_tampered_structure_records_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """slim.keep / slim.coupling that do not parse: one Error line naming the field, exit 1."""
    from slimcli.prune.surgery import encode_keep

    arch = "resnet56:depth=8"
    dense = _model(arch)
    plan = compute_keep(dense, "ratio", 0.5)
    slim, rep = prune_model(dense, plan)
    base = {**_meta(arch=arch), "widths": rep.widths, "stage": "pruned", "coupling": "auto"}
    cases = {"hex": ({"keep": dict.fromkeys(rep.keep, "zz")}, "slim.keep"),
             "coupling": ({"coupling": "weird", "keep": encode_keep(rep.keep)}, "coupling"),
             "list": ({"keep": [1, 2]}, "slim.keep")}
    for name, (extra, field) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_checkpoint(path, slim, {**base, **extra})
        code, _, stderr = run_cli(["inspect", str(path)], capsys)
        assert code == 1 and stderr.count("Error:") == 1 and field in stderr, stderr
        assert "Traceback" not in stderr
