"""``slim export CKPT OUT.onnx``: one verified ONNX file, checked against PyTorch in onnxruntime."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from slimcli.cli._common import err, out, positive
from slimcli.cli.app import app

if TYPE_CHECKING:
    from slimcli.export import ExportReport


class Exporter(str, Enum):
    auto = "auto"
    torchscript = "torchscript"
    dynamo = "dynamo"


def _onnx_path(value: Path) -> Path:
    if value.suffix.lower() != ".onnx":
        raise typer.BadParameter(f"must end in .onnx, e.g. {value.with_suffix('.onnx')}")
    return value


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,} bytes)"
    return f"{n} bytes"


def _shape(name: str, shape: tuple[int | str, ...]) -> str:
    return f"{name}: {'×'.join(map(str, shape))}"


def render_report(report: ExportReport) -> Table:
    """The result table of an export (also used by ``slim prune --export``)."""
    random = [str(c.batch) for c in report.checks if c.inputs == "random"]
    real = [c.batch for c in report.checks if c.inputs == "real"]
    checks = f"random inputs (batch {', '.join(random)})" + (f", {sum(real)} test images" if real else "")
    table = Table(title="ONNX export (verified with onnxruntime)", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("file", str(report.path))
    table.add_row("size", _size(report.size_bytes))
    table.add_row("opset", f"{report.opset} ({report.exporter} exporter)")
    table.add_row("input", _shape(report.input_name, report.input_shape) + " float32")
    table.add_row("output", _shape(report.output_name, report.output_shape))
    table.add_row("params", f"{report.params:,}")
    diff = f"{report.max_abs_diff:.3g} abs, {report.rel_diff:.3g} relative (≤ {report.tolerance:g})"
    table.add_row("max diff", diff)
    table.add_row("checked on", checks)
    if report.latency_ms is not None:
        table.add_row("latency", f"{report.latency_ms:.3f} ms (onnxruntime CPU, batch 1, median)")
    return table


@app.command("export", short_help="Write a verified ONNX model of a checkpoint.")
def export(
    ckpt: Path = typer.Argument(..., metavar="CKPT", help="Checkpoint (.safetensors) to export."),
    onnx_out: Path = typer.Argument(..., metavar="OUT.onnx", callback=_onnx_path, help="ONNX file to write."),
    opset: int | None = typer.Option(
        None, "--opset", min=7, help="ONNX opset (default: the exporter's default, 20 with torch 2.13)."
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Where the checkpoint's dataset is (for the real-image check)."
    ),
    real_data: bool = typer.Option(
        True, "--real-data/--no-real-data", help="Also compare on test images (never downloads)."
    ),
    exporter: Exporter = typer.Option(
        Exporter.auto, "--exporter", help="torch.onnx exporter; auto tries torchscript, then dynamo."
    ),
    tolerance: float = typer.Option(
        1e-4, "--tolerance", callback=positive, help="Max |ort − torch| / max(1, max|torch|)."
    ),
    latency_runs: int = typer.Option(50, "--latency-runs", min=0, help="Timed batch-1 runs (0: skip)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT.onnx if it exists."),
) -> None:
    """Export a checkpoint to one ONNX file (dynamic batch, metadata), checked against PyTorch."""
    # lazily: start-up cost, see docs/benchmarks.md (these import torch)
    from slimcli.checkpoint import check_finite, ensure_folder, load_checkpoint
    from slimcli.errors import UsageError
    from slimcli.export import check_onnx_destination, export_checkpoint

    if onnx_out.exists() and not onnx_out.is_dir() and not force:
        raise UsageError(f"{onnx_out} already exists; pass --force to replace it, or choose another OUT.onnx")
    check_onnx_destination(onnx_out)  # the folder must exist and be writable: checked before any work
    ensure_folder(onnx_out.parent, needed=ckpt.stat().st_size if ckpt.is_file() else 0, create=False,
                  option="OUT.onnx")
    checkpoint = load_checkpoint(ckpt)
    check_finite(checkpoint, "export")
    err.print(f"exporting {ckpt} ({checkpoint.meta.get('arch')}, stage {checkpoint.stage or '?'}) …")
    report = export_checkpoint(
        checkpoint,
        onnx_out,
        opset=opset,
        data_dir=data_dir,
        real_data=real_data,
        tolerance=tolerance,
        exporter=exporter.value,
        latency_runs=latency_runs,
    )
    for note in report.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(render_report(report))
