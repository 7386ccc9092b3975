"""``slim demo``: sparsify-train → inspect → prune → finetune → export → verify on fashion-mini."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from slimcli.cli._common import device_callback, err, out
from slimcli.cli.app import app

if TYPE_CHECKING:
    from slimcli.flows.demo import DemoResult


def _ratio(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 < value < 1):
        raise typer.BadParameter(f"must be strictly between 0 and 1, got {value}")
    return value


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def _render(r: DemoResult) -> None:
    # lazily: start-up cost, see docs/benchmarks.md (these import torch)
    from slimcli.measure import human

    s = r.settings
    def line(text: str) -> None:
        out.print(text, markup=False, highlight=False)

    line(f"slim demo: network slimming of {s.arch} on {s.dataset} → {r.out}")
    line(f"sparsity training: {s.epochs} epochs, penalty {s.penalty}, λ = {s.lam:g} (the paper's 1e-4 acts "
         f"over 160 CIFAR epochs; this short run needs a stronger pull toward zero)")
    n = r.gamma_count
    below = ", ".join(f"< {k}: {v / n:.0%}" for k, v in r.gamma_below.items()) if n else "—"
    line(f"inspect: |γ| of {n} BN channels {below}")
    what_if = Table(title="what-if (slim prune --ratio R)", title_justify="left", box=box.SIMPLE_HEAD,
                    pad_edge=False)
    for col in ("ratio", "threshold", "channels kept", "params kept", "FLOPs kept", "emptied"):
        what_if.add_column(col, justify="left" if col == "emptied" else "right")
    for row in r.what_if:
        thr = "—" if row["threshold"] is None else f"{row['threshold']:.3g}"
        what_if.add_row(f"{row['ratio']:g}", thr, f"{row['channels_kept']}/{row['channels_total']}",
                        _pct(row["params_kept"]), _pct(row["flops_kept"]), ", ".join(row["emptied"]) or "—")
    out.print(what_if)
    thr = "" if r.threshold is None else f", keep |γ| > {r.threshold:.3g}"
    line(f"prune: ratio {r.ratio:g}{thr} ({r.ratio_reason})")
    for name, (by_rule, kept) in r.min_channels_bit.items():
        line(f"  kept {kept} channel(s) of {name} (min-channels; the rule alone kept {by_rule})")

    dense = r.row("dense")
    table = Table(title="slim demo: every stage", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("stage", "params", "FLOPs", "ONNX size", "latency", "accuracy"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    labels = {"finetuned": "fine-tuned", "onnx": "ONNX"}
    for row in r.rows:
        kept = f" ({row.params / dense.params:.1%})" if row.stage != "dense" and dense.params else ""
        flops_kept = f" ({row.flops / dense.flops:.1%})" if row.stage != "dense" and dense.flops else ""
        lat = "—" if row.latency_ms is None else f"{row.latency_ms:.3f} ms"
        table.add_row(labels.get(row.stage, row.stage), f"{row.params:,}{kept}",
                      f"{human(row.flops)}{flops_kept}", _size(row.onnx_bytes), lat, _pct(row.accuracy))
    out.print(table)
    line(f"dense = after sparsity training; pruned = before fine-tuning; fine-tuned = {s.finetune_epochs} "
         f"epochs without penalty; ONNX = model.onnx run in onnxruntime (its accuracy measured there; the "
         f"fine-tuned model re-formed for the runtime, exactly: zero-padded channel counts, slim export).")
    onnx = r.row("onnx")
    speed = ""
    if onnx.latency_ms and dense.latency_ms:
        speed = f" (dense and ONNX timed interleaved: ONNX {onnx.latency_ms / dense.latency_ms:.2f}× dense)"
    line(f"FLOPs = 2×MACs per image; latency: onnxruntime CPU, batch 1, median{speed}. model.onnx matches "
         f"PyTorch (max |diff| {r.onnx_max_diff:.2g}; {r.onnx_disagreements} test predictions differ).")
    line(f"files: {r.out} (sparsify/, pruned.safetensors, pruned.onnx, finetune/, dense.onnx, model.onnx, "
         f"summary.json); {r.seconds.get('total', 0):.0f} s in all")


@app.command("demo", short_help="The whole chain on embedded data, about a minute.")
def demo(
    out_dir: Annotated[Path | None, typer.Option(
        "--out", show_default=False, help="Folder for every artefact [default: runs/demo-<time>].")] = None,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", min=1, show_default=False, help="Sparsity-training epochs [default: 15].")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(
        "--finetune-epochs", min=0, show_default=False, help="Fine-tuning epochs [default: 5].")] = None,
    ratio: Annotated[float | None, typer.Option(
        "--ratio", callback=_ratio, show_default=False,
        help="Channel ratio to prune [default: the fraction of |γ| the penalty drove below 1e-2].")] = None,
    device: Annotated[str, typer.Option(
        "--device", callback=device_callback, help="cpu (the demo's target), auto, cuda[:N].")] = "cpu",
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress on stderr; only the results.")] = False,
    fast: Annotated[bool, typer.Option(
        "--fast", hidden=True, help="A seconds-long chain on a tiny model (for tests).")] = False,
) -> None:
    """The whole chain on the embedded fashion-mini dataset, in about a minute on a laptop CPU.

    Trains a narrow VGG-11 with the Tℓ1 penalty, inspects and prunes it, fine-tunes, exports
    ONNX and checks it in onnxruntime; ends with one table of params, FLOPs, ONNX size,
    latency and accuracy at each stage.
    """
    # lazily: start-up cost, see docs/benchmarks.md (these import torch)
    from slimcli.flows.demo import DemoSettings, run_demo
    from slimcli.train import make_reporter

    settings = DemoSettings.fast() if fast else DemoSettings()
    changes = {"epochs": epochs, "finetune_epochs": finetune_epochs, "ratio": ratio, "device": device}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    log = None if quiet else (lambda msg: err.print(msg, markup=False, highlight=False))
    result = run_demo(settings, out_dir, log=log, reporter=None if quiet else make_reporter(err, False))
    _render(result)
