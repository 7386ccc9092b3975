"""``slim export CKPT OUT.onnx``: one verified ONNX file, checked against PyTorch in onnxruntime."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from slimcli.cli._common import err, one_of, out, positive
from slimcli.cli.app import app

if TYPE_CHECKING:
    from slimcli.export import ExportReport


class Target(str, Enum):
    generic = "generic"
    ort = "ort"
    openvino = "openvino"
    ncnn = "ncnn"


def _runtimes(value: str | None) -> str | None:
    if value is None:
        return None
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    known = ("ort", "opencv", "openvino", "ncnn", "all")
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise typer.BadParameter(
            f"unknown runtime(s) {', '.join(bad) or repr(value)}; use a comma list of {', '.join(known)}"
        )
    return ",".join(names)


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
    if report.macs is not None:
        table.add_row("MACs", f"{report.macs:,} per image")
    table.add_row("target", report.target)
    return table


def render_runtimes(report: ExportReport) -> Table:
    """Parity and latency of the model in each runtime ``--check-runtimes`` named."""
    on = report.runtimes[0].checked_on if report.runtimes else ""
    title = f"runtimes: parity vs PyTorch ({on}), latency at batch 1 (median)"
    table = Table(title=title, title_justify="left")
    for col in ("runtime", "version", "max rel diff", "latency ms", "note"):
        table.add_column(col, justify="right" if col in ("max rel diff", "latency ms") else "left")
    for c in report.runtimes:
        lat = f"{c.latency_ms:.3f}" if c.latency_ms is not None else "–"
        note = "; ".join(n for n in (c.note, "image by image" if c.runtime == "ncnn" else "") if n)
        table.add_row(c.runtime, c.version.split("-")[0], f"{c.rel_diff:.2g}", lat, note)
    return table


def render_int8(r: Any) -> Table:
    """The int8 model next to fp32: size, latency, accuracy (``--int8``)."""
    table = Table(title=f"int8 model: {r.path}", title_justify="left")
    for col in ("", "fp32", "int8", "int8 / fp32"):
        table.add_column(col, justify="left" if not col else "right")
    ratio = r.size_bytes / r.fp32_size_bytes
    table.add_row("size", f"{r.fp32_size_bytes:,} B", f"{r.size_bytes:,} B", f"{ratio:.2f}×")
    if r.fp32_latency_ms is not None:
        table.add_row("latency (ort, batch 1)", f"{r.fp32_latency_ms:.3f} ms", f"{r.int8_latency_ms:.3f} ms",
                      f"{r.int8_latency_ms / r.fp32_latency_ms:.2f}×")
    if r.test_images:
        table.add_row(f"test accuracy ({r.test_images} images)", f"{r.fp32_accuracy:.2%}",
                      f"{r.int8_accuracy:.2%}", f"drop {r.accuracy_drop * 100:.2f} points (fp32 − int8)")
        table.add_row("top-1 agreement", "", f"{r.agreement:.2%}", "")
    table.add_row("calibration", "", f"{r.calibration_images} training images", "")
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
    target: Target = typer.Option(
        Target.generic, "--target",
        help="Runtime the file is for: sets how a pruned model is re-formed (--selections, --pad-to) and, "
             "for openvino and ncnn, checks the file there."
    ),
    selections: str | None = typer.Option(
        None, "--selections", callback=one_of("auto", "gather", "zero", "conv", "pieces"), show_default=False,
        help="How a pruned model's channel selections are realised in the file: gather (ONNX Gather), zero "
             "(zeroed channels, no Gather), auto (a Gather only where it saves enough), conv (each Gather "
             "as a one-hot 1×1 conv) or pieces (a selection of a concatenation reads its pieces: DenseNet). "
             "[default: by --target: zero for generic and ncnn; for ort and openvino the fastest, timed "
             "there]"),
    pad_to: int | None = typer.Option(
        None, "--pad-to", metavar="N", min=1, max=4096, show_default=False,
        help="Pad a pruned model's kept channel counts with zero channels to multiples of N (never past "
             "the dense width; exact), for blocked CPU kernels. [default: 1, 8 or 16, the fastest timed in "
             "the target's runtime; 8 for ncnn. 1: no padding]"),
    as_pruned: bool = typer.Option(
        False, "--as-pruned", help="Export the checkpoint's own structure (the paper's channel counts) "
                                   "instead of re-forming it for --target."),
    check_runtimes: str | None = typer.Option(
        None, "--check-runtimes", callback=_runtimes, metavar="LIST",
        help="Also check parity and latency in these runtimes: ort,opencv,openvino,ncnn (or all).",
    ),
    int8: bool = typer.Option(False, "--int8", help="Also write OUT.int8.onnx (static int8 quantization)."),
    calibration: int = typer.Option(
        256, "--calibration", min=1, help="Training images --int8 calibrates on.", show_default=True
    ),
) -> None:
    """Export a checkpoint to one ONNX file (dynamic batch, metadata), checked against PyTorch."""
    # lazily: start-up cost, see docs/benchmarks.md (these import torch)
    from slimcli.checkpoint import check_finite, ensure_folder, load_checkpoint
    from slimcli.errors import UsageError
    from slimcli.export import check_onnx_destination, export_checkpoint

    if onnx_out.exists() and not onnx_out.is_dir() and not force:
        raise UsageError(f"{onnx_out} already exists; pass --force to replace it, or choose another OUT.onnx")
    q_out = onnx_out.with_name(onnx_out.stem + ".int8.onnx")
    if int8 and q_out.exists() and not force:
        raise UsageError(f"{q_out} already exists; pass --force to replace it, or choose another OUT.onnx")
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
        target=target.value,
        runtimes=check_runtimes or (),
        int8=int8,
        calibration=calibration,
        as_pruned=as_pruned,
        selections=selections,
        pad_to=pad_to,
    )
    for note in report.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(render_report(report))
    if report.runtimes:
        out.print(render_runtimes(report))
    if report.extension is not None:
        out.print(render_int8(report.extension))
