"""``slim sweep CKPT…``: prune every checkpoint at every ratio, the paper's Table 2 and Figure 3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from slimcli.cli._common import (
    CouplingOption,
    RoundToOption,
    SelectionsOption,
    device_callback,
    err,
    library_check,
    non_negative,
    out,
    positive,
)
from slimcli.cli.app import app

if TYPE_CHECKING:
    from slimcli.flows.sweep import SweepResult


def _ratios(value: str) -> str:
    from slimcli.errors import UsageError  # lazily: start-up cost, see docs/benchmarks.md
    from slimcli.flows.sweep import parse_ratios

    try:
        parse_ratios(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--ratios ")) from None
    return value


#: the library's own check, as exit 2
_min_channels = library_check("slimcli.prune.rules", "check_min_channels")


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}" if value is not None else "—"


def _render(result: SweepResult) -> None:
    from rich.table import Table

    doc = result.doc
    stages = [k for k in ("acc_surgery", "acc_recalibrated", "acc_finetuned")
              if any(c.get(k) is not None for c in doc["cells"])]
    names = {"acc_surgery": "surgery", "acc_recalibrated": "recal.", "acc_finetuned": "fine-tuned"}
    for ckpt in doc["checkpoints"]:
        acc = ckpt.get("accuracy")
        table = Table(title=f"{ckpt['label']}  (dense {_pct(acc)} %, {ckpt['path']})", title_justify="left")
        table.add_column("ratio", justify="right")
        table.add_column("params pruned %", justify="right")
        for key in stages:
            table.add_column(f"acc {names[key]} %", justify="right")
        for cell in (c for c in doc["cells"] if c["label"] == ckpt["label"]):
            if cell.get("emptied"):
                table.add_row(f"{cell['ratio']:.2f}", "empties a layer", *["—"] * len(stages))
                continue
            table.add_row(f"{cell['ratio']:.2f}", _pct(cell.get("params_pruned")),
                          *[_pct(cell.get(k)) for k in stages])
        out.print(table)
    past = len(doc["cells"]) - result.computed - result.reused
    out.print(f"{result.computed} cell(s) computed, {result.reused} from an earlier run, {past} past a ratio "
              f"that empties a layer; wrote " + ", ".join(str(p) for p in result.files),
              markup=False, highlight=False)


@app.command("sweep", short_help="Prune checkpoints at every ratio, tabulate, plot.")
def sweep(
    ckpts: Annotated[list[Path], typer.Argument(
        metavar="CKPT", help="Checkpoints to sweep (one column each).", show_default=False)],
    ratios: Annotated[str, typer.Option(
        "--ratios", callback=_ratios,
        help="START:STOP:STEP (inclusive) or a list like 0.3,0.5,0.7.")] = "0.05:0.95:0.05",
    recalibrate: Annotated[int, typer.Option(
        "--recalibrate", metavar="N", callback=non_negative,
        help="Re-estimate BatchNorm statistics on N training images after surgery (0: off).")] = 2048,
    finetune_epochs: Annotated[int, typer.Option(
        "--finetune-epochs", metavar="E", callback=non_negative,
        help="Also fine-tune every cell for E epochs (no penalty) and report that accuracy.")] = 0,
    finetune_lr: Annotated[float, typer.Option(
        "--finetune-lr", callback=positive,
        help="Learning rate of that fine-tune (÷10 at 50 % and 75 % of it).")] = 0.01,
    min_channels: Annotated[int | None, typer.Option(
        "--min-channels", callback=_min_channels, show_default=False,
        help="Keep at least N channels per layer and sweep on [default: stop where a layer would "
             "empty, as the paper].")] = None,
    round_to: RoundToOption = 1,
    selections: SelectionsOption = "gather",
    coupling: CouplingOption = None,
    fold_shift: Annotated[bool, typer.Option(
        "--fold-shift", help="Prune as slim prune --fold-shift.")] = False,
    seed: Annotated[int, typer.Option(
        "--seed", callback=non_negative, help="Seed of the recalibration images and fine-tuning.")] = 0,
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Folder for sweep.json/.csv/.md/.png (a rerun into it resumes).")] = Path("sweep"),
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", show_default=False, help="Where the checkpoints' dataset is.")] = None,
    device: Annotated[str, typer.Option(
        "--device", callback=device_callback, help="auto (CUDA if present), cpu, cuda[:N].")] = "auto",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print sweep.json on stdout (nothing else).")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an earlier sweep in --out whose cells this one would drop.")] = False,
) -> None:
    """Prune every CKPT at every ratio and measure accuracy after surgery, after BatchNorm
    recalibration and, with --finetune-epochs, after a short fine-tune.

    Writes sweep.json, sweep.csv, sweep.md (laid out like the paper's Table 2) and sweep.png
    into --out; finished cells are kept, so an interrupted sweep continues where it stopped.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from slimcli.flows.sweep import SweepSettings, parse_ratios, run_sweep

    settings = SweepSettings(recalibrate=recalibrate, finetune_epochs=finetune_epochs,
                             finetune_lr=finetune_lr, min_channels=min_channels, fold_shift=fold_shift,
                             coupling=coupling, round_to=round_to,
                             selections=selections, seed=seed)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)
    with bar:
        task = bar.add_task("sweep", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)
            if not err.is_terminal and done < total:
                err.print(f"[{done}/{total}] {what}", markup=False, highlight=False)

        result = run_sweep(ckpts, parse_ratios(ratios), out_dir, settings, device=device,
                           data_dir=data_dir, progress=progress, force=force,
                           log=lambda msg: err.print(f"note: {msg}", markup=False, highlight=False))
    if as_json:
        typer.echo(json.dumps(result.doc, ensure_ascii=False))
        return
    _render(result)
