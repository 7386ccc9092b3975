"""``slim import FILE.pth.tar``: a checkpoint of the network-slimming reference code → a slim checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from slimcli.cli._common import err, out, spec_callback
from slimcli.cli.app import app
from slimcli.registry import ARCHS, DATASETS

if TYPE_CHECKING:
    from slimcli.flows.importref import ImportResult

_STAGES = ("sparsify", "pruned", "finetuned")  # slimcli.checkpoint.STAGES (not imported: start-up cost)


def _stage(value: str | None) -> str | None:
    if value is not None and value not in _STAGES:
        raise typer.BadParameter(f"must be one of {', '.join(_STAGES)}, got {value!r}")
    return value


def render(result: ImportResult) -> Table:
    """The result table of an import."""
    d = result.as_dict()
    table = Table(title=f"imported {d['source']}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    src = f"{d['reference']}, {d['layout']} layout"
    if d["epoch"] is not None:
        src += f", epoch {d['epoch']}"
    if d["best_prec1"] is not None:
        src += f", best_prec1 {d['best_prec1']:.4g}"
    table.add_row("source", src)
    table.add_row("arch", f"{d['arch']}  (stage {d['stage']}, dataset {d['dataset'] or '—'})")
    before, after = d["channels_before"], d["channels_after"]
    kept = f"{after:,} of {before:,} BatchNorm channels"
    if d["selections"]:
        kept += f"; {len(d['selections'])} channel selections carried over"
    table.add_row("channels", kept)
    table.add_row("params", f"{d['params']:,}" + (f" (dense arch {d['params_dense']:,})"
                                                  if d["params"] != d["params_dense"] else ""))
    table.add_row("out", f"{d['out']}  (sha256 {d['sha256'][:12]}…)")
    return table


@app.command("import", short_help="Convert a reference-code .pth.tar to a slim checkpoint.")
def import_(
    source: Annotated[Path, typer.Argument(
        metavar="FILE", show_default=False,
        help="model_best.pth.tar, checkpoint.pth.tar or pruned.pth.tar of the reference code.")],
    arch: Annotated[str | None, typer.Option(
        "--arch", callback=spec_callback(ARCHS), show_default=False,
        help="slim arch the file holds: vgg19 (vgg11…vgg19), resnet164[:depth=…], densenet40:stem=24 "
             "[default: detected from the file].")] = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Checkpoint to write (.safetensors) [default: FILE's name with .safetensors].")] = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", callback=spec_callback(DATASETS), show_default=False,
        help="Dataset it was trained on [default: cifar10 or cifar100 by the number of classes].")] = None,
    stage: Annotated[str | None, typer.Option(
        "--stage", callback=_stage, show_default=False,
        help="Stage to record: sparsify, pruned or finetuned [default: from the file's layout].")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing --out checkpoint.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the result as one JSON document on stdout (nothing else).")] = False,
) -> None:
    """Import a checkpoint of the network-slimming reference code (dense or pruned).

    Reads the file with torch.load(weights_only=True) only, renames its keys onto slim's
    vgg / resnet164 / densenet40, carries its channel selections over, and writes an ordinary
    slim checkpoint (inspect, prune, finetune and export work on it).
    """
    # lazily: start-up cost, see docs/benchmarks.md (the library imports torch)
    from slimcli.flows.importref import import_reference

    result = import_reference(source, arch, out_path, dataset=dataset, stage=stage,
                              force=force, log=None if as_json else err.print)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), ensure_ascii=False))
        return
    if result.meta.get("dataset") is None:
        err.print("[yellow]note:[/] no dataset recorded (not 10 or 100 classes); pass --dataset for "
                  "prune --eval and finetune", highlight=False)
    out.print(render(result))
