"""``slim inspect``: the JSON document is complete and agrees with prune; what-if formula == built models."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import run_cli
from _prune_toys import TOYS, randomize
from torch import nn

from slimcli.archs import create_arch
from slimcli.checkpoint import file_sha256, lineage_entry, load_checkpoint, save_checkpoint
from slimcli.flows.inspect import gamma_summary, inspect_checkpoint
from slimcli.measure import count_params, measure
from slimcli.model import build_model
from slimcli.prune import (
    analyze,
    compute_keep,
    gamma_scores,
    meta_twin,
    prune_model,
    ratio_grid,
    ratio_threshold,
    safe_below,
    what_if,
)

SHAPE = (3, 16, 16)
VGG = "vgg11:width=0.25"  # 8 prunable BatchNorms, 688 channels


pytestmark = pytest.mark.usefixtures("one_thread")


def _meta(spec: str, **over: Any) -> dict[str, Any]:
    meta = {
        "arch": spec,
        "num_classes": 10,
        "input_shape": list(SHAPE),
        "dataset": "synthetic:n=64",
        "classes": [str(i) for i in range(10)],
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "stage": "sparsify",
        "train": {"penalty": "scad:a=3.7", "lam": 1e-4, "update": "proximal", "epochs": 2, "seed": 0},
        "metrics": {"sparsify": {"test_acc": 0.5, "test_loss": 1.25}},
        "lineage": [lineage_entry("sparsify", None, f"slim sparsify-train --arch {spec}")],
    }
    meta.update(over)
    return meta


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _random_gammas(model: nn.Module, seed: int = 0) -> nn.Module:
    """|γ| log-uniform over 1e-4 … 1, about 10% exact zeros (as a proximal run leaves), random signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in _bns(model):
            n = bn.num_features
            gamma = 10 ** (torch.rand(n, generator=g) * 4 - 4)
            gamma[torch.rand(n, generator=g) < 0.1] = 0
            bn.weight.copy_(gamma * torch.sign(torch.randn(n, generator=g)))
    return model


def _save(path: Path, model: nn.Module, spec: str, **meta: Any) -> Path:
    save_checkpoint(path, model, _meta(spec, **meta))
    return path


def _built(model: nn.Module, shape: tuple[int, ...], ratios: list[float], **kw: Any) -> list[dict[str, Any]]:
    """The reference rows: every slim model really rebuilt from the real model and measured."""
    rows, info = what_if(model, shape, ratios, formula=False, twin=model, **kw)
    assert info["method"] == "surgery"
    return [r.as_dict() for r in rows]


def _rows_equal(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Exactly equal rows (counts are integers; fractions are the same divisions; JSON keeps floats exact)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == y


# ----------------------------------------------------------------------------------------------
# the JSON document


def test_json_is_complete_and_agrees_with_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tmp_path / "vgg.safetensors", _random_gammas(create_arch(VGG, 10, SHAPE)), VGG)
    argv = ["inspect", str(path), "--json", "--ratio", "0.45", "--bins", "12"]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    doc = json.loads(stdout)  # stdout is exactly one JSON document
    for key in ("meta", "lineage", "sha256", "model", "gamma", "layers", "what_if", "what_if_method",
                "safe_below", "first_emptied"):
        assert key in doc

    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    assert doc["sha256"] == file_sha256(path) == ckpt.sha256
    assert doc["meta"] == {k: v for k, v in ckpt.meta.items() if k != "lineage"}
    assert doc["lineage"] == ckpt.lineage and doc["lineage"][0]["stage"] == "sparsify"
    dense = measure(model, SHAPE)
    assert (doc["model"]["params"], doc["model"]["macs"], doc["model"]["flops"]) == (
        dense.params, dense.macs, 2 * dense.macs)

    bns = analyze(model, SHAPE).bns
    scores = gamma_scores(model, bns)
    flat = torch.cat(list(scores.values()))
    gamma = doc["gamma"]
    assert gamma["count"] == flat.numel() == doc["model"]["prunable_channels"] == 688
    assert gamma["zeros"] == int((flat == 0).sum()) > 0
    assert sum(gamma["histogram"]["counts"]) == gamma["count"] - gamma["zeros"]
    assert len(gamma["histogram"]["edges"]) == 12 + 1 == len(gamma["histogram"]["counts"]) + 1
    edges = gamma["histogram"]["edges"]
    assert edges[0] == pytest.approx(math.log10(float(flat[flat > 0].min())))
    assert edges[-1] == pytest.approx(math.log10(float(flat.max())))
    assert gamma["quantiles"]["0.5"] == pytest.approx(float(torch.quantile(flat, 0.5)))
    assert gamma["below"]["0.01"] == int((flat < 0.01).sum())

    # the chosen ratio: the paper's threshold; under-threshold counts = what prune removes
    threshold = ratio_threshold(scores, 0.45)
    assert doc["at_ratio"]["threshold"] == threshold
    plan = compute_keep(model, "ratio", 0.45, 1, bns=bns)
    under = {row["name"]: row["under_threshold"] for row in doc["layers"]}
    kept = {row["name"]: row["kept"] for row in doc["layers"]}
    assert kept == plan.widths
    assert under == {name: int((s <= threshold).sum()) for name, s in scores.items()}
    assert sum(under.values()) == doc["at_ratio"]["channels_under"] == int((flat <= threshold).sum())
    assert sum(under.values()) >= math.floor(0.45 * 688) + 1  # the sorted value at ⌊p·total⌋ goes too
    for row in doc["layers"]:
        g = scores[row["name"]]
        assert (row["gamma_min"], row["gamma_max"]) == (float(g.min()), float(g.max()))
        assert row["channels"] == g.numel() and row["prunable"] and row["reason"] is None

    # what-if: the library's (built) rows, plus the chosen ratio in order
    ratios = [r["ratio"] for r in doc["what_if"]]
    assert ratios == sorted({*ratio_grid(), 0.45})
    _rows_equal(doc["what_if"], _built(model, SHAPE, ratios))
    row = next(r for r in doc["what_if"] if r["ratio"] == 0.45)
    slim, report = prune_model(model, plan)
    assert row["threshold"] == threshold
    assert row["params"] == count_params(slim) == report.params_after
    assert row["flops"] == measure(slim, SHAPE).flops
    assert row["params_kept"] == pytest.approx(row["params"] / dense.params)
    assert [doc["safe_below"], doc["first_emptied"]] == list(safe_below(scores))
    for r in ratio_grid():  # the one number decides for every ratio whether prune (min-channels 0) works
        emptied = compute_keep(model, "ratio", r, 1, bns=bns).emptied
        assert (r < doc["safe_below"]) == (not emptied), r
    assert doc["what_if_method"]["method"] == "formula" and 0.45 in doc["what_if_method"]["checked_ratios"]


def test_crafted_gammas_report_the_emptying_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One weak layer: the safe bound and the emptied rows follow from counting by hand."""
    model = create_arch(VGG, 10, SHAPE)
    layers = _bns(model)
    weak, tiny = layers[0], layers[-1]  # features.1 (16 channels), features.26 (128 channels)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in layers:
            bn.weight.copy_(0.5 + 0.5 * torch.rand(bn.num_features, generator=g))
        weak.weight.copy_(torch.arange(1, 17, dtype=torch.float32) * 1e-3 / 16)  # largest |γ| = 1e-3
        tiny.weight[:100] = 1e-5 * torch.rand(100, generator=g)
    total = sum(bn.num_features for bn in layers)
    below = 15 + 100  # scores smaller than the weak layer's largest one
    path = _save(tmp_path / "crafted.safetensors", model, VGG)

    code, stdout, stderr = run_cli(["inspect", str(path), "--json", "--min-channels", "0"], capsys)
    assert code == 0, stderr
    doc = json.loads(stdout)
    bound = below / total
    assert doc["safe_below"] == pytest.approx(bound)
    assert doc["first_emptied"] == ["features.1"]
    expected = max(r for r in ratio_grid() if math.floor(r * total) < below)
    assert max(r for r in ratio_grid() if r < doc["safe_below"]) == expected == 0.15
    for row in doc["what_if"]:
        if row["ratio"] < bound:
            assert row["emptied"] == [] and row["params"] is not None
        else:  # min-channels 0: no model exists, the row names the layer
            assert "features.1" in row["emptied"] and row["params"] is None and row["flops_kept"] is None
    _rows_equal(doc["what_if"], _built(build_model(load_checkpoint(path)), SHAPE,
                                       [r["ratio"] for r in doc["what_if"]], min_channels=0))
    at = doc["at_ratio"]  # ratio 0.5 empties features.1: prune (min-channels 0) would refuse
    assert at["emptied"] == ["features.1"] and doc["layers"][0]["kept"] == 0 and doc["layers"][0]["emptied"]

    code, stdout, _ = run_cli(["inspect", str(path), "--json"], capsys)  # min-channels 1 keeps one channel
    doc = json.loads(stdout)
    assert doc["layers"][0]["kept"] == 1 and doc["layers"][0]["min_channels_bit"] == [0, 1]
    assert all(r["params"] is not None for r in doc["what_if"])


# ----------------------------------------------------------------------------------------------
# what_if: the closed form == building every slim model


def _pruned_densenet(tmp_path: Path) -> Path:
    spec = "densenet40:depth=16"
    dense = _random_gammas(create_arch(spec, 10, SHAPE), seed=5)
    slim, report = prune_model(dense, compute_keep(dense, "ratio", 0.3, 1))
    _random_gammas(slim, seed=6)  # as if fine-tuned
    return _save(tmp_path / "pruned.safetensors", slim, spec, stage="pruned", widths=report.widths)


@pytest.mark.parametrize(("spec", "min_channels"), [
    ("resnet164:depth=20", 0), ("resnet164:depth=20", 1), ("resnet164:depth=20", 3),
    ("resnet56:depth=20", 0), ("resnet56:depth=20", 1),
    ("densenet40:depth=16", 0), ("densenet40:depth=16", 1),
    ("pruned", 0), ("pruned", 1),
])
def test_what_if_formula_equals_built_models(tmp_path: Path, spec: str, min_channels: int) -> None:
    if spec == "pruned":
        model = build_model(load_checkpoint(_pruned_densenet(tmp_path)))
    else:
        model = _random_gammas(create_arch(spec, 10, SHAPE), seed=len(spec))
    ratios = [0.05, 0.3, 0.55, 0.8, 0.95]
    reference = _built(model, SHAPE, ratios, min_channels=min_channels)  # on the real model
    twin = meta_twin(model)
    bns = analyze(twin, SHAPE).bns
    fast, info = what_if(model, SHAPE, ratios, min_channels=min_channels, bns=bns, twin=twin)
    built, built_info = what_if(model, SHAPE, ratios, min_channels=min_channels, bns=bns, twin=twin,
                                formula=False)
    assert info["method"] == "formula" and built_info["method"] == "surgery"
    _rows_equal([r.as_dict() for r in fast], reference)
    _rows_equal([r.as_dict() for r in built], reference)


@pytest.mark.parametrize("name", ["vgg_flatten2x2", "vgg_view2x2", "hidden_fc", "preact", "dense", "postact"])
def test_what_if_formula_on_toy_graphs(name: str) -> None:
    """Flatten into a linear (H·W inputs per channel), BatchNorm1d, selections, residuals."""
    ctor, shape = TOYS[name]
    model = randomize(ctor(), seed=2).eval()
    ratios = [0.2, 0.5, 0.9]
    reference = _built(model, shape, ratios)
    rows, info = what_if(model, shape, ratios, twin=meta_twin(model))
    assert info["method"] == "formula"
    _rows_equal([r.as_dict() for r in rows], reference)


def test_a_wrong_formula_is_caught_by_the_surgery_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimcli.prune import whatif

    model = _random_gammas(create_arch(VGG, 10, SHAPE))
    ratios = [0.25, 0.5, 0.75]
    reference = _built(model, SHAPE, ratios)
    right = whatif._CostFormula.__call__

    def off_by_one(self: Any, widths: dict[str, int]) -> tuple[int, int]:
        params, flops = right(self, widths)
        return params + 1, flops

    monkeypatch.setattr(whatif._CostFormula, "__call__", off_by_one)
    rows, info = what_if(model, SHAPE, ratios)
    assert info["method"] == "surgery" and "disagreed" in info["note"]
    _rows_equal([r.as_dict() for r in rows], reference)


def test_meta_twin_counts_like_the_model() -> None:
    model = _random_gammas(create_arch("resnet164:depth=20", 10, SHAPE))
    twin = meta_twin(model)
    assert all(p.device.type == "meta" for p in twin.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model is untouched
    a, b = measure(model, SHAPE), measure(twin, SHAPE)
    assert (a.params, a.macs) == (b.params, b.macs)


# ----------------------------------------------------------------------------------------------
# |γ| statistics


def test_gamma_summary_histogram_zeros_and_bounds() -> None:
    f64 = torch.float64
    scores = {"a": torch.tensor([0.0, 0.0, 1e-3, 2e-3, 3e-2, 0.5], dtype=f64),
              "b": torch.tensor([1.0, float("nan"), 5e-2], dtype=f64)}
    s = gamma_summary(scores, bins=3)
    assert (s["count"], s["zeros"], s["nonfinite"]) == (9, 2, 1)
    assert s["histogram"]["edges"] == pytest.approx([-3, -2, -1, 0])
    assert s["histogram"]["counts"] == [2, 2, 2]  # [-3,-2) [-2,-1) [-1,0]: the last bin holds its edge
    assert s["below"] == {"0.0001": 2, "0.001": 2, "0.01": 4, "0.1": 6}
    assert (s["min"], s["max"]) == (0.0, 1.0)
    same = gamma_summary({"a": torch.full((4,), 0.5)}, bins=4)
    assert sum(same["histogram"]["counts"]) == 4 and same["quantiles"]["0.5"] == 0.5
    assert gamma_summary({}, bins=4)["histogram"]["counts"] == []
    bound, first = safe_below({"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.05, 0.3, 0.4])})
    assert bound == pytest.approx(2 / 5) and first == ["a"]  # 0.05 and 0.1 lie below a's largest (0.2)


def test_library_validates_its_arguments(tmp_path: Path) -> None:
    from slimcli.errors import UsageError

    path = _save(tmp_path / "v.safetensors", create_arch(VGG, 10, SHAPE), VGG)
    for kwargs in ({"ratio": 0.0}, {"ratio": 1.0}, {"min_channels": -1}, {"bins": 0}):
        with pytest.raises(UsageError):
            inspect_checkpoint(path, **kwargs)


# ----------------------------------------------------------------------------------------------
# the command line


def test_human_output_reads_in_100_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from slimcli.cli._common import out

    spec = "resnet56:depth=20"  # with --coupling select: BNs that feed residual sums are not prunable
    path = _save(tmp_path / "r.safetensors", _random_gammas(create_arch(spec, 10, SHAPE)), spec)
    monkeypatch.setattr(out, "_width", 100)  # restored to "auto" afterwards
    code, stdout, stderr = run_cli(["inspect", str(path), "--ratio", "0.6", "--coupling", "select"], capsys)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    lines = stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    doc = inspect_checkpoint(path, ratio=0.6, coupling="select")
    for text in (doc["sha256"], "resnet56", "scad:a=3.7", "lineage", "log10|γ|",
                 f"exact zeros: {doc['gamma']['zeros']}", "◀ threshold of ratio 0.6", "what-if",
                 "not prunable", "tied to",
                 f"(exact bound: {doc['safe_below']:.6g}, safe_below in --json)"):
        assert text in stdout, text
    bars = [line for line in lines if "█" in line]
    assert len(bars) == sum(1 for c in doc["gamma"]["histogram"]["counts"] if c)
    for row in doc["what_if"]:
        assert any(line.lstrip("│ ").startswith(f"{row['ratio']:g}") for line in lines), row["ratio"]


def test_training_row_of_a_finetuned_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from slimcli.cli._common import out

    train = {"penalty": "none", "lam": 1e-4, "update": "subgradient", "epochs": 3, "seed": 0}
    model = create_arch(VGG, 10, SHAPE)
    path = _save(tmp_path / "ft.safetensors", model, VGG, stage="finetuned", train=train)
    monkeypatch.setattr(out, "_width", 200)
    code, stdout, stderr = run_cli(["inspect", str(path)], capsys)
    assert code == 0, stderr
    row = next(line for line in stdout.splitlines() if "│ training" in line)
    assert "no penalty, epochs 3, seed 0" in row and "λ" not in row  # no meaningless λ without a penalty


def test_plot_is_a_png_and_json_stays_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = _save(tmp_path / "v.safetensors", _random_gammas(create_arch(VGG, 10, SHAPE)), VGG)
    png = tmp_path / "plots" / "inspect.png"
    png.parent.mkdir()
    code, stdout, stderr = run_cli(["inspect", str(path), "--json", "--plot", str(png)], capsys)
    assert code == 0, stderr
    json.loads(stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["inspect.png"]  # no temporary file left


def test_plot_without_matplotlib(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib… raises ImportError
    path = _save(tmp_path / "v.safetensors", create_arch(VGG, 10, SHAPE), VGG)
    code, stdout, stderr = run_cli(["inspect", str(path), "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 1 and stdout == ""
    assert stderr.strip().splitlines() == ['Error: --plot needs matplotlib: pip install "slim-prune[plot]"']
    assert not (tmp_path / "p.png").exists()


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tmp_path / "v.safetensors", create_arch(VGG, 10, SHAPE), VGG)
    cases = [(["--ratio", r], "ratio") for r in ("0", "1", "1.5", "-0.2", "nan")] + [
        (["--bins", "0"], "bins"), (["--min-channels", "-1"], "min-channels"), (["--plot", "x.jpg"], ".png")]
    for args, word in cases:
        code, stdout, stderr = run_cli(["inspect", str(path), *args], capsys)
        assert code == 2, (args, stderr)
        assert stdout == "" and word in stderr and "Traceback" not in stderr


def test_bad_checkpoints_exit_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _save(tmp_path / "v.safetensors", create_arch(VGG, 10, SHAPE), VGG)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:-64])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    for path, word in ((corrupt, "truncated"), (junk, "not a safetensors"), (tmp_path / "no.safetensors",
                                                                                "not found")):
        for extra in ([], ["--json"]):
            code, stdout, stderr = run_cli(["inspect", str(path), *extra], capsys)
            assert code == 1 and stdout == ""
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: ") and word in lines[0], stderr
