"""``slim sweep`` and ``slim prune --recalibrate``: cells equal ``slim prune``, resume recomputes
nothing finished, the sweep stops where a layer empties, and recalibration is recorded."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from _helpers import run_cli
from torch import nn

from slimcli.archs import create_arch
from slimcli.checkpoint import file_sha256, lineage_entry, load_checkpoint, save_checkpoint
from slimcli.errors import UsageError
from slimcli.flows import sweep as sw
from slimcli.flows.sweep import SweepSettings, parse_ratios, run_sweep

ARCH = "vgg:depth=11,width=0.0625"
SHAPE = (1, 28, 28)
RECAL = "64"

pytestmark = pytest.mark.usefixtures("one_thread")


def _ckpt(path: Path, penalty: str, seed: int, *, emptying: bool = False,
          dataset: str = "fashion-mini") -> Path:
    """A checkpoint with distinct random |γ|, β and statistics (every removed channel matters)."""
    torch.manual_seed(seed)
    model = create_arch(ARCH, 10, SHAPE)
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            n = bn.num_features
            bn.weight.copy_(torch.rand(n, generator=g) * 0.9 + 0.05)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        if emptying:  # the first layer's |γ| are far below everyone else's: ratio ≥ 4/228 empties it
            bns[0].weight.mul_(1e-3)
    meta = {
        "arch": ARCH, "num_classes": 10, "input_shape": list(SHAPE), "dataset": dataset,
        "classes": [f"c{i}" for i in range(10)], "normalization": {"mean": [0.3], "std": [0.35]},
        "stage": "sparsify", "metrics": {"sparsify": {"test_acc": 0.5, "test_loss": 1.0}},
        "train": {"penalty": penalty, "lam": 1e-4},
        "lineage": [lineage_entry("sparsify", None, "slim sparsify-train")],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model.eval(), meta)
    return path


@pytest.fixture
def two(tmp_path: Path) -> list[Path]:
    return [_ckpt(tmp_path / "a" / "best.safetensors", "l1", 0),
            _ckpt(tmp_path / "b" / "best.safetensors", "tl1:a=0.5", 1)]


def test_parse_ratios() -> None:
    assert parse_ratios("0.05:0.95:0.05") == [round(0.05 * k, 10) for k in range(1, 20)]
    assert parse_ratios("0.7,0.3,0.5,0.3") == [0.3, 0.5, 0.7]
    for bad in ("", "0.3:0.1:0.1", "a,b", "0:0.5:0.1", "0.5,1.0"):
        with pytest.raises(UsageError):
            parse_ratios(bad)


def test_sweep_writes_all_outputs_and_cells_equal_slim_prune(
    two: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = [file_sha256(p) for p in two]
    out = tmp_path / "sweep"
    code, stdout, stderr = run_cli(["sweep", *map(str, two), "--ratios", "0.3,0.6", "--recalibrate", RECAL,
                                    "--device", "cpu", "--out", str(out), "--json"], capsys)
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == sorted(sw.OUTPUTS)
    assert json.loads((out / "sweep.json").read_text()) == doc
    assert [c["label"] for c in doc["checkpoints"]] == ["l1", "tl1:a=0.5"]
    assert len(doc["cells"]) == 4 and not any(c["emptied"] for c in doc["cells"])
    for cell in doc["cells"]:
        path = two[0] if cell["label"] == "l1" else two[1]
        target = tmp_path / f"p-{cell['label'][:2]}-{cell['ratio']}.safetensors"
        code, stdout, stderr = run_cli(["prune", str(path), "--ratio", str(cell["ratio"]), "--recalibrate",
                                        RECAL, "--eval", "--device", "cpu", "--out", str(target), "--json"],
                                       capsys)
        assert code == 0, stderr
        res = json.loads(stdout)
        assert res["accuracy_after_surgery"] == cell["acc_surgery"]
        assert res["accuracy"] == cell["acc_recalibrated"]
        assert res["prune"]["params_after"] == cell["params"]
        assert res["prune"]["params_pruned_ratio"] == pytest.approx(cell["params_pruned"], abs=1e-15)
        assert res["prune"]["threshold"] == cell["threshold"]
        assert res["recalibration"] == cell["recalibration"]
    # Table 2 layout: one row per ratio, one column per checkpoint
    md = (out / "sweep.md").read_text()
    assert "| ratio | l1 | tl1:a=0.5 |" in md and "| 0.30 |" in md and "| 0.60 |" in md
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["label"], float(r["ratio"])) for r in rows] == [(c["label"], c["ratio"]) for c in doc["cells"]]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [file_sha256(p) for p in two] == before  # the inputs are only read


def test_a_half_done_sweep_recomputes_nothing_finished(
    two: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sweep"
    settings = SweepSettings(recalibrate=0)
    full = run_sweep(two, [0.2, 0.4, 0.6], out, settings, device="cpu")
    assert full.computed == 6
    doc = json.loads((out / "sweep.json").read_text())
    doc["cells"] = doc["cells"][:4]  # as if the run had stopped after four cells
    (out / "sweep.json").write_text(json.dumps(doc))
    calls: list[float] = []
    real = sw.prune_loaded

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(float(args[3]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sw, "prune_loaded", counting)
    again = run_sweep(two, [0.2, 0.4, 0.6], out, settings, device="cpu")
    assert again.computed == 2 and again.reused == 4 and sorted(calls) == [0.4, 0.6]
    assert again.doc["cells"] == full.doc["cells"]
    calls.clear()
    assert run_sweep(two, [0.2, 0.4, 0.6], out, settings, device="cpu").computed == 0 and calls == []
    # other settings are other cells: nothing is reused by mistake, and the earlier ones are not
    # dropped without force
    with pytest.raises(UsageError, match="--force"):
        run_sweep(two, [0.2], out, SweepSettings(recalibrate=16), device="cpu")
    assert len(json.loads((out / "sweep.json").read_text())["cells"]) == 6
    assert run_sweep(two, [0.2], out, SweepSettings(recalibrate=16), device="cpu", force=True).computed == 2


def test_sweep_stops_where_a_layer_would_empty_unless_min_channels(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path / "e" / "best.safetensors", "l1", 2, emptying=True)
    res = run_sweep([ckpt], [0.01, 0.3, 0.5], tmp_path / "s", SweepSettings(recalibrate=0), device="cpu")
    cells = res.doc["cells"]
    assert [c["emptied"] for c in cells] == [False, True, True]
    assert cells[1]["emptied_layers"] and cells[1]["params"] is None and cells[2]["acc_surgery"] is None
    assert "N/A" in (tmp_path / "s" / "sweep.md").read_text()
    floored = run_sweep([ckpt], [0.01, 0.3, 0.5], tmp_path / "f",
                        SweepSettings(recalibrate=0, min_channels=1), device="cpu")
    assert [c["emptied"] for c in floored.doc["cells"]] == [False, False, False]
    assert all(c["acc_surgery"] is not None for c in floored.doc["cells"])


def test_sweep_finetunes_cells(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path / "a" / "best.safetensors", "l1", 0)
    settings = SweepSettings(recalibrate=32, finetune_epochs=1)
    res = run_sweep([ckpt], [0.5], tmp_path / "s", settings, device="cpu")
    cell = res.doc["cells"][0]
    assert cell["acc_finetuned"] is not None and 0 <= cell["acc_finetuned"] <= 1
    run = tmp_path / "s" / "cells" / "l1" / "ratio-0.5-ft1-lr0.01-s0"
    ft = load_checkpoint(run / "last.safetensors")
    assert ft.stage == "finetuned" and ft.meta["prune"]["recalibration"]["images"] == 32
    # a fine-tune interrupted after its checkpoint was written continues instead of starting over
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    doc["cells"] = []
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(doc))
    again = run_sweep([ckpt], [0.5], tmp_path / "s", settings, device="cpu")
    assert again.computed == 1 and again.doc["cells"][0]["acc_finetuned"] == cell["acc_finetuned"]


def test_sweep_bad_input(two: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["sweep", str(two[0]), str(two[0]), "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "same checkpoint" in err
    code, _, err = run_cli(["sweep", str(two[0]), "--ratios", "0.5:0.1:0.1"], capsys)
    assert code == 2 and "--ratios" in err
    code, _, err = run_cli(["sweep", str(two[0]), "--recalibrate", "-1"], capsys)
    assert code == 2


# ----------------------------------------------------------------------------------------------
# slim prune --recalibrate


def test_prune_recalibrates_by_default_and_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _ckpt(tmp_path / "best.safetensors", "l1", 0)
    sha = file_sha256(ckpt)
    code, stdout, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.5", "--eval", "--device", "cpu",
                                    "--json"], capsys)
    assert code == 0, stderr
    res = json.loads(stdout)
    rec = res["recalibration"]
    assert rec["images"] > 0 and rec["split"] == "train" and rec["seed"] == 0 and rec["batch_size"] == 256
    written = load_checkpoint(tmp_path / "best-pruned.safetensors")
    assert written.meta["prune"]["recalibration"] == rec
    assert written.meta["prune"]["accuracy_after_surgery"] == res["accuracy_after_surgery"]
    assert written.meta["metrics"]["pruned"]["test_acc"] == res["accuracy"]  # the file's own accuracy
    assert file_sha256(ckpt) == sha  # the dense input is never touched
    # deterministic for a seed: the same statistics again; another seed draws other images
    code, _, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.5", "--device", "cpu", "--out",
                               str(tmp_path / "again.safetensors")], capsys)
    assert code == 0, stderr
    again = load_checkpoint(tmp_path / "again.safetensors").tensors
    assert all(torch.equal(v, again[k]) for k, v in written.tensors.items())
    run_cli(["prune", str(ckpt), "--ratio", "0.5", "--device", "cpu", "--seed", "5", "--out",
             str(tmp_path / "seed5.safetensors")], capsys)
    other = load_checkpoint(tmp_path / "seed5.safetensors").tensors
    assert any(not torch.equal(v, other[k]) for k, v in written.tensors.items() if "running" in k)


def test_prune_recalibrate_zero_is_the_plain_surgery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimcli.cli._common import out as console

    monkeypatch.setattr(console, "_width", 200)  # one table row per line
    ckpt = _ckpt(tmp_path / "best.safetensors", "l1", 0)
    code, stdout, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.5", "--eval", "--device", "cpu",
                                    "--json", "--recalibrate", "0"], capsys)
    assert code == 0, stderr
    res = json.loads(stdout)
    assert res["recalibration"]["images"] == 0 and res["accuracy"] == res["accuracy_after_surgery"]
    code, stdout, _ = run_cli(["prune", str(ckpt), "--ratio", "0.5", "--eval", "--device", "cpu", "--out",
                               str(tmp_path / "x.safetensors")], capsys)
    assert code == 0 and "after surgery" in stdout and "after recalibration" in stdout
    assert "recalibrated on " in stdout  # the BN statistics row


def test_prune_without_training_data_notes_it_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIM_OFFLINE", "1")
    monkeypatch.setenv("SLIM_DATA", str(tmp_path / "nothing-here"))
    ckpt = _ckpt(tmp_path / "best.safetensors", "l1", 0, dataset="mnist")
    code, _, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.5", "--device", "cpu", "--data-dir",
                               str(tmp_path / "nothing-here")], capsys)
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if "no BatchNorm recalibration" in line]
    assert len(notes) == 1 and "--recalibrate 0" in notes[0]
    meta = load_checkpoint(tmp_path / "best-pruned.safetensors").meta["prune"]["recalibration"]
    assert meta["images"] == 0 and meta["note"].startswith("skipped")


def test_recalibration_composes_with_fold_shift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--fold-shift first moves β into biases / running means, recalibration then re-estimates the
    BatchNorm statistics: both are recorded, and only BatchNorm statistics differ from folding alone."""
    ckpt = _ckpt(tmp_path / "best.safetensors", "l1", 0)
    outs = {}
    for name, recal in (("fold", "0"), ("both", "64")):
        code, stdout, stderr = run_cli(["prune", str(ckpt), "--ratio", "0.5", "--fold-shift", "--recalibrate",
                                        recal, "--device", "cpu", "--json", "--out",
                                        str(tmp_path / f"{name}.safetensors")], capsys)
        assert code == 0, stderr
        outs[name] = json.loads(stdout)
    assert outs["both"]["prune"]["fold_shift"] and outs["both"]["recalibration"]["images"] == 64
    assert outs["fold"]["recalibration"]["images"] == 0
    fold = load_checkpoint(tmp_path / "fold.safetensors").tensors
    both = load_checkpoint(tmp_path / "both.safetensors").tensors
    changed = {k for k, v in fold.items() if not torch.equal(v, both[k])}
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert changed and all(k.endswith(stats) for k in changed)
