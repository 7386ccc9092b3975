"""``slim sweep``: the paper's experiment — every checkpoint pruned at every ratio.

For each checkpoint and each ratio of the grid (ascending), one *cell*: the slim model
``slim prune --ratio R`` builds (the same :func:`slimcli.flows.prune.prune_loaded`, so the
numbers are the same), its parameters and FLOPs, its test accuracy right after surgery,
after BatchNorm recalibration, and optionally after a short fine-tune. Without
``min_channels`` a checkpoint's sweep stops at the first ratio that would empty a layer
(the paper's "to the point where a layer has no more channels"); the remaining cells are
recorded as emptied.

Resumable: every finished cell goes into ``sweep.json`` at once (atomically), keyed by the
checkpoint's sha256, the ratio and the settings that change a cell's numbers; a rerun into
the same folder recomputes nothing that is there. The outputs are ``sweep.json``,
``sweep.csv``, ``sweep.md`` (laid out like the paper's Table 2: rows = ratio, columns =
checkpoint) and ``sweep.png`` (accuracy against the ratio and against the parameters
pruned, one curve per checkpoint, dense accuracy as a dashed line).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimcli._fs import atomic_write_bytes
from slimcli.checkpoint import Checkpoint, check_finite, ensure_folder, load_checkpoint, save_checkpoint
from slimcli.data import create_dataset, no_downloads
from slimcli.errors import CheckpointError, DataError, SlimError, UsageError
from slimcli.export import latest_accuracy
from slimcli.flows.prune import DEFAULT_RECALIBRATION, prune_loaded, pruned_meta
from slimcli.measure import measure
from slimcli.model import build_model, calibration_images
from slimcli.prune.rules import check_min_channels, check_rule
from slimcli.train import TrainConfig, train

SWEEP_VERSION = 1
OUTPUTS = ("sweep.json", "sweep.csv", "sweep.md", "sweep.png")


def parse_ratios(text: str) -> list[float]:
    """``START:STOP:STEP`` (inclusive, e.g. ``0.05:0.95:0.05``) or a comma list ``0.3,0.5,0.7``."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            n = math.floor(round((stop - start) / step, 9)) + 1
            values = [round(start + k * step, 10) for k in range(n)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(
            f"--ratios must be START:STOP:STEP (e.g. 0.05:0.95:0.05) or a list like 0.3,0.5,0.7; got {text!r}"
        ) from None
    if not values:
        raise UsageError("--ratios is empty; give e.g. 0.05:0.95:0.05")
    return sorted({check_rule("ratio", v) for v in values})


@dataclass(frozen=True)
class SweepSettings:
    """Everything that changes a cell's numbers (part of each cell's key)."""

    recalibrate: int = DEFAULT_RECALIBRATION
    finetune_epochs: int = 0
    #: a short fine-tune from trained weights wants a small step: lr 0.1 for one epoch undoes
    #: part of what recalibration recovered (measured: ℓ1 at 0.7, 90.9 % → 85.7 %)
    finetune_lr: float = 0.01
    min_channels: int | None = None  # None: stop where a layer would empty
    fold_shift: bool = False
    seed: int = 0
    coupling: str | None = None  # None: auto (a slim checkpoint keeps its own)
    round_to: int = 1
    selections: str = "gather"

    def validate(self) -> SweepSettings:
        for name in ("recalibrate", "finetune_epochs", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        if self.min_channels is not None:
            check_min_channels(self.min_channels)
        if not (isinstance(self.finetune_lr, (int, float)) and 0 < self.finetune_lr < math.inf):
            raise UsageError(f"finetune-lr must be a positive number, got {self.finetune_lr!r}")
        return self

    def key(self) -> dict[str, Any]:
        key = {"recalibrate": self.recalibrate, "finetune_epochs": self.finetune_epochs,
               "min_channels": self.min_channels, "fold_shift": self.fold_shift, "seed": self.seed}
        if self.selections != "gather":
            key["selections"] = self.selections
        if self.round_to != 1:
            key["round_to"] = self.round_to
        if self.coupling is not None:  # sweeps written before coupled groups keep their key
            key["coupling"] = self.coupling
        if self.finetune_epochs:
            key["finetune_lr"] = self.finetune_lr
        return key


@dataclass
class SweepResult:
    """The sweep document (what ``sweep.json`` holds) and where the outputs went."""

    out: Path
    doc: dict[str, Any]
    computed: int  # cells computed in this run
    reused: int = 0  # cells taken from an earlier run into the same folder
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _labels(ckpts: Sequence[Checkpoint]) -> list[str]:
    """A column name per checkpoint: its penalty (``tl1:a=0.5``), made unique with the run folder."""
    base = []
    for c in ckpts:
        train_meta = c.meta.get("train") if isinstance(c.meta.get("train"), dict) else {}
        base.append(str(train_meta.get("penalty") or (c.path.stem if c.path else "checkpoint")))
    labels = []
    for i, (label, c) in enumerate(zip(base, ckpts, strict=True)):
        if base.count(label) > 1:
            where = c.path.parent.name if c.path is not None else str(i)
            label = f"{label} ({where})"
        labels.append(label)
    return labels


def _cell_id(sha: str, ratio: float, settings: SweepSettings) -> str:
    return json.dumps({"sha256": sha, "ratio": round(ratio, 10), **settings.key()}, sort_keys=True)


def _load_previous(path: Path) -> dict[str, dict[str, Any]]:
    """Finished cells of an earlier run into the same folder, by cell id (unreadable: none)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("sweep_version") != SWEEP_VERSION:
        return {}
    cells = {}
    for cell in doc.get("cells") or []:
        if isinstance(cell, dict) and isinstance(cell.get("id"), str):
            cells[cell["id"]] = cell
    return cells


def _check_replaced(path: Path, previous: dict[str, dict[str, Any]], kept: set[str]) -> None:
    """Refuse (without force) to drop an earlier sweep's cells or to replace a sweep.json it cannot read."""
    if not path.exists():
        return
    dropped = [cid for cid in previous if cid not in kept]
    if dropped:
        raise UsageError(f"{path} holds {len(dropped)} cell(s) of an earlier sweep with other checkpoints, "
                         f"ratios or settings, which this sweep would drop; pass --force to replace them, "
                         f"or choose another --out")
    if not previous and path.stat().st_size > 0 and _load_previous_doc(path) is None:
        raise UsageError(f"{path} is not a sweep file this slim can read; pass --force to replace it, or "
                         f"choose another --out")


def _load_previous_doc(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("sweep_version") == SWEEP_VERSION else None


def _write(path: Path, data: bytes) -> None:
    """Atomic write; a full disk or lost permission is one clean error (the previous file stays)."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise SlimError(f"could not write {path}: {exc.strerror or exc}; the previous file is unchanged "
                        f"(free disk space, then rerun: finished cells are kept)") from None


def run_sweep(
    ckpt_paths: Sequence[str | os.PathLike[str]],
    ratios: Sequence[float],
    out: str | os.PathLike[str],
    settings: SweepSettings | None = None,
    *,
    device: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    force: bool = False,
) -> SweepResult:
    """Prune every checkpoint at every ratio into ``out`` (see the module docstring).

    A rerun into ``out`` keeps the cells it shares with the earlier sweep there; when it would
    drop cells of that sweep (other checkpoints, ratios or settings) or replace an unreadable
    ``sweep.json``, it refuses unless ``force``.

    ``progress(done, total, what)`` is called before every cell and once at the end; ``log``
    gets one line per notable event (e.g. no recalibration data).
    """
    say = log or (lambda _msg: None)
    settings = (settings or SweepSettings()).validate()
    ratios = sorted({check_rule("ratio", r) for r in ratios})
    if not ckpt_paths:
        raise UsageError("give at least one checkpoint to sweep")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a folder for the sweep's outputs")
    ensure_folder(out_dir)
    ckpts = [load_checkpoint(p) for p in ckpt_paths]
    for c in ckpts:
        check_finite(c, "sweep")
    seen: dict[str, Path] = {}
    for c in ckpts:
        if c.sha256 in seen:
            raise UsageError(f"{c.path} is the same checkpoint as {seen[c.sha256]}; give each once")
        seen[c.sha256] = c.path  # type: ignore[assignment]
    for c in ckpts:
        if not c.meta.get("dataset"):
            raise DataError(f"{c.path} records no dataset, so the sweep cannot test it; sweep another")
    labels = _labels(ckpts)
    previous = _load_previous(out_dir / "sweep.json")
    if not force:
        _check_replaced(out_dir / "sweep.json", previous,
                        {_cell_id(c.sha256, r, settings) for c in ckpts for r in ratios})
    total = len(ckpts) * len(ratios)
    done = computed = reused = 0
    notes: list[str] = []
    doc: dict[str, Any] = {
        "sweep_version": SWEEP_VERSION,
        "settings": settings.key(),
        "ratios": list(ratios),
        "checkpoints": [],
        "cells": [],
    }

    def write_json() -> None:
        text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
        _write(out_dir / "sweep.json", text.encode())

    for ckpt, label in zip(ckpts, labels, strict=True):
        dense = build_model(ckpt)
        dense_cost = measure(dense, ckpt.input_shape)  # the same for every ratio
        train_meta = ckpt.meta.get("train") if isinstance(ckpt.meta.get("train"), dict) else {}
        entry = {"label": label, "path": str(ckpt.path), "sha256": ckpt.sha256, "arch": ckpt.arch,
                 "dataset": ckpt.meta.get("dataset"), "penalty": train_meta.get("penalty"),
                 "accuracy": latest_accuracy(ckpt.meta)}
        doc["checkpoints"].append(entry)
        test_data = calibration = None
        stopped = False
        for ratio in ratios:
            cid = _cell_id(ckpt.sha256, ratio, settings)
            if progress:
                progress(done, total, f"{label} @ {ratio:g}")
            cell = previous.get(cid)
            reused += cell is not None
            if cell is None and stopped:  # past the first emptying ratio: no model, no numbers
                cell = {"id": cid, "label": label, "sha256": ckpt.sha256, "ratio": ratio, "emptied": True,
                        "emptied_layers": None, **dict.fromkeys(_NUMBERS)}
            if cell is None:
                if test_data is None:  # read once per checkpoint, only if a cell needs it
                    test_data, calibration, note = _data_for(ckpt, settings, data_dir)
                    if note:
                        notes.append(f"{label}: {note}")
                        say(f"{label}: {note}")
                cell = _compute_cell(ckpt, dense, dense_cost, label, ratio, cid, settings, out_dir, device,
                                     data_dir, test_data, calibration)
                computed += 1
            doc["cells"].append(cell)
            stopped = stopped or bool(cell.get("emptied"))
            done += 1
            write_json()
    if progress:
        progress(done, total, "done")
    files = [out_dir / "sweep.json", *_write_tables(doc, out_dir)]
    png = _plot(doc, out_dir / "sweep.png", notes)
    if png is not None:
        files.append(png)
    return SweepResult(out_dir, doc, computed, reused, files, notes)


def _data_for(ckpt: Checkpoint, settings: SweepSettings, data_dir: Any) -> tuple[Any, Any, str | None]:
    """(test images and labels, recalibration images or None, note) for one checkpoint."""
    try:
        dataset = create_dataset(str(ckpt.meta["dataset"]))
    except UsageError as exc:  # the checkpoint's record, not the command line, is wrong
        raise CheckpointError(f"{ckpt.path} records dataset {ckpt.meta['dataset']!r}, which slim cannot "
                              f"make ({exc})") from None
    root = Path(data_dir) if data_dir else None
    with no_downloads():
        test = dataset.load("test", root)
    calibration, note = None, None
    if settings.recalibrate > 0:
        try:
            calibration = calibration_images(str(ckpt.meta["dataset"]), settings.recalibrate,
                                             seed=settings.seed, data_dir=data_dir)
        except DataError as exc:
            note = f"no BatchNorm recalibration ({exc})"
    return test, calibration, note


def _compute_cell(ckpt: Checkpoint, dense: Any, dense_cost: Any, label: str, ratio: float, cid: str,
                  settings: SweepSettings, out_dir: Path, device: str, data_dir: Any, test_data: Any,
                  calibration: Any) -> dict[str, Any]:
    floor = settings.min_channels if settings.min_channels is not None else 1
    pruned = prune_loaded(ckpt, dense, "ratio", ratio, floor, fold_shift=settings.fold_shift,
                          recalibrate=settings.recalibrate if calibration is not None else 0,
                          seed=settings.seed, eval=True, device=device, data_dir=data_dir,
                          test_data=test_data, calibration=calibration, dense=dense_cost,
                          coupling=settings.coupling, round_to=settings.round_to,
                          selections=settings.selections)
    emptied = list(pruned.plan.emptied)
    cell: dict[str, Any] = {
        "id": cid, "label": label, "sha256": ckpt.sha256, "ratio": ratio,
        "emptied": bool(emptied) and settings.min_channels is None, "emptied_layers": emptied,
        "threshold": pruned.plan.threshold,
        "channels_pruned": pruned.plan.ratio,
        "params": pruned.after.params, "params_dense": pruned.before.params,
        "params_pruned": 1 - pruned.after.params / pruned.before.params if pruned.before.params else 0.0,
        "flops": pruned.after.flops, "flops_dense": pruned.before.flops,
        "acc_surgery": pruned.accuracy_surgery,
        "acc_recalibrated": pruned.accuracy if pruned.recalibration.get("images") else None,
        "acc_finetuned": None,
        "recalibration": pruned.recalibration,
    }
    if cell["emptied"]:  # the paper's sweep stops here: the numbers of a floored model do not count
        for key in ("params", "params_pruned", "flops", "acc_surgery", "acc_recalibrated"):
            cell[key] = None
        return cell
    if settings.finetune_epochs > 0:
        cell["acc_finetuned"] = _finetune(ckpt, pruned, label, ratio, settings, out_dir, device, data_dir)
    return cell


#: the per-cell numbers (None in a cell whose ratio empties a layer)
_NUMBERS = ("threshold", "channels_pruned", "params", "params_dense", "params_pruned", "flops", "flops_dense",
            "acc_surgery", "acc_recalibrated", "acc_finetuned", "recalibration")


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in label).strip("_") or "checkpoint"


def _finetune(ckpt: Checkpoint, pruned: Any, label: str, ratio: float, settings: SweepSettings,
              out_dir: Path, device: str, data_dir: Any) -> float:
    """Fine-tune the cell's slim model for a few epochs (no penalty); the last epoch's test accuracy."""
    cell_dir = out_dir / "cells" / _slug(label)
    ensure_folder(cell_dir)
    path = cell_dir / f"ratio-{ratio:.4g}.safetensors"
    meta = pruned_meta(ckpt, pruned, command=f"slim sweep (ratio {ratio:g})")
    save_checkpoint(path, pruned.model, meta)
    # the folder names the settings, so a fine-tune with other settings is never resumed by mistake
    s = settings
    run = cell_dir / f"ratio-{ratio:.4g}-ft{s.finetune_epochs}-lr{s.finetune_lr:g}-s{s.seed}"
    where = str(data_dir) if data_dir else None
    if run.exists() and (run / "last.safetensors").is_file():  # an interrupted fine-tune continues
        result = train(TrainConfig(resume=str(run), stage="finetuned", device=device, data_dir=where))
    else:
        result = train(TrainConfig(stage="finetuned", parent=str(path), dataset=None, penalty="none", lam=0.0,
                                   epochs=settings.finetune_epochs, lr=settings.finetune_lr,
                                   seed=settings.seed, device=device,
                                   out=str(run), data_dir=where,
                                   command=f"slim sweep --finetune-epochs {settings.finetune_epochs} "
                                           f"--finetune-lr {settings.finetune_lr:g}"))
    last = result.last or {}
    return float(last.get("test_acc", result.best_acc))


# ----------------------------------------------------------------------------------------------
# outputs

CSV_COLUMNS = ("label", "ratio", "channels_pruned", "params", "params_pruned", "flops", "acc_surgery",
               "acc_recalibrated", "acc_finetuned", "emptied", "threshold", "sha256")


def _fmt_pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "N/A"


def _write_tables(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for cell in doc["cells"]:
        writer.writerow(["" if cell.get(k) is None else cell.get(k) for k in CSV_COLUMNS])
    _write(out_dir / "sweep.csv", buf.getvalue().encode())
    _write(out_dir / "sweep.md", markdown_table(doc).encode())
    return [out_dir / "sweep.csv", out_dir / "sweep.md"]


def _best_accuracy(cell: dict[str, Any]) -> tuple[str, Any]:
    """The accuracy a cell shows: after fine-tuning, else after recalibration, else after surgery."""
    for key, name in (("acc_finetuned", "fine-tuned"), ("acc_recalibrated", "recalibrated"),
                      ("acc_surgery", "surgery")):
        if cell.get(key) is not None:
            return name, cell[key]
    return "surgery", None


def markdown_table(doc: dict[str, Any]) -> str:
    """Table 2 of the paper, extended: per ratio and checkpoint, % params pruned and accuracy."""
    labels = [c["label"] for c in doc["checkpoints"]]
    by = {(c["label"], c["ratio"]): c for c in doc["cells"]}
    stages = [k for k in ("acc_surgery", "acc_recalibrated", "acc_finetuned")
              if any(c.get(k) is not None for c in doc["cells"])]
    names = {"acc_surgery": "acc. after surgery", "acc_recalibrated": "acc. recalibrated",
             "acc_finetuned": "acc. fine-tuned"}
    lines = ["# slim sweep", ""]
    dense = ", ".join(f"{c['label']} {_fmt_pct(c.get('accuracy'))} %" for c in doc["checkpoints"])
    lines.append(f"Dense test accuracy: {dense}. Settings: {json.dumps(doc['settings'])}.")
    lines.append("")
    for title, key in [("Parameters pruned (%)", "params_pruned"), *[(names[k] + " (%)", k) for k in stages]]:
        lines += [f"## {title}", "", "| ratio | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for ratio in doc["ratios"]:
            row = [_fmt_pct(by.get((label, ratio), {}).get(key)) for label in labels]
            lines.append(f"| {ratio:.2f} | " + " | ".join(row) + " |")
        lines.append("")
    lines.append("N/A: the ratio empties a layer (the sweep stops there, as in the paper).")
    return "\n".join(lines) + "\n"


def _plot(doc: dict[str, Any], path: Path, notes: list[str]) -> Path | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        notes.append('sweep.png not drawn: matplotlib is missing (pip install "slim-prune[plot]")')
        return None
    fig = Figure(figsize=(11, 4.2), dpi=110)
    axes = fig.subplots(1, 2)
    for i, ckpt in enumerate(doc["checkpoints"]):
        cells = [c for c in doc["cells"] if c["label"] == ckpt["label"] and not c.get("emptied")]
        color = f"C{i % 10}"
        pairs = [(c["ratio"], c["params_pruned"], _best_accuracy(c)[1]) for c in cells]
        pairs = [p for p in pairs if p[2] is not None]
        stage = "surgery"
        if pairs:
            stage = _best_accuracy(cells[0])[0]
            axes[0].plot([p[0] for p in pairs], [100 * p[2] for p in pairs], "o-", color=color,
                         label=f"{ckpt['label']} ({stage})", markersize=3)
            axes[1].plot([100 * p[1] for p in pairs], [100 * p[2] for p in pairs], "o-", color=color,
                         markersize=3)
        plain = [(c["ratio"], c["params_pruned"], c["acc_surgery"]) for c in cells
                 if c.get("acc_surgery") is not None]
        if plain and stage != "surgery":  # the paper's number (no recalibration), dotted
            axes[0].plot([p[0] for p in plain], [100 * p[2] for p in plain], ":", color=color, linewidth=1,
                         label=f"{ckpt['label']} (after surgery)")
            axes[1].plot([100 * p[1] for p in plain], [100 * p[2] for p in plain], ":", color=color,
                         linewidth=1)
        if ckpt.get("accuracy") is not None:
            for ax in axes:
                ax.axhline(100 * ckpt["accuracy"], color=color, linestyle="--", linewidth=0.8)
    axes[0].set_xlabel("channel pruning ratio")
    axes[1].set_xlabel("parameters pruned (%)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("slim sweep: accuracy after pruning (dashed: dense accuracy; dotted: right after surgery)",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    _write(path, buf.getvalue())
    return path


__all__ = ["OUTPUTS", "SweepResult", "SweepSettings", "markdown_table", "parse_ratios", "run_sweep"]
