"""``slim inspect CKPT``: metadata, size, the |γ| histogram, per-layer and what-if pruning tables."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from slimcli._fs import atomic_write_bytes
from slimcli.cli._common import (
    CouplingOption,
    RoundToOption,
    SelectionsOption,
    err,
    library_check,
    out,
)
from slimcli.cli.app import app
from slimcli.errors import SlimError

_PLOT_SUFFIXES = (".png", ".svg", ".pdf")
_MISSING_MPL = '--plot needs matplotlib: pip install "slim-prune[plot]"'
_EIGHTHS = " ▏▎▍▌▋▊▉"
#: names shown per row in the what-if "emptied" column before "+N more"
_SHOW_EMPTIED = 1


#: the library's own check, as exit 2
_ratio = library_check("slimcli.prune.rules", "check_ratio")


#: the library's own check, as exit 2
_min_channels = library_check("slimcli.prune.rules", "check_min_channels")


def _plot_path(value: Path | None) -> Path | None:
    if value is not None and value.suffix.lower() not in _PLOT_SUFFIXES:
        raise typer.BadParameter(f"must end in .png (or .svg, .pdf), e.g. {value.with_suffix('.png')}")
    return value


# ----------------------------------------------------------------------------------------------
# text output


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "—" if x is None else format(x, fmt)


def _count(n: int) -> str:
    from slimcli.measure import human

    return f"{human(n)} ({n:,})" if n >= 1000 else f"{n:,}"


def _bar(count: int, top: int, width: int) -> str:
    """A horizontal bar of ``count/top·width`` cells, in eighths of a cell."""
    if top <= 0 or count <= 0:
        return ""
    eighths = max(1, round(count / top * width * 8))
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def _train_text(train: dict[str, Any]) -> str:
    unpenalized = train.get("penalty") == "none"
    parts = ["no penalty"] if unpenalized else []
    for key, label in (("penalty", "penalty"), ("lam", "λ"), ("update", "update"), ("epochs", "epochs"),
                       ("seed", "seed"), ("device", "device"), ("amp", "amp")):
        if unpenalized and key in ("penalty", "lam", "update"):  # λ and the update rule mean nothing then
            continue
        if train.get(key) is not None:
            parts.append(f"{label} {train[key]}")
    return ", ".join(parts)


def _metrics_text(metrics: dict[str, Any]) -> str:
    lines = []
    for stage, values in metrics.items():
        if isinstance(values, dict):
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in values.items())
            lines.append(f"{stage}: {shown}")
        else:
            lines.append(f"{stage}: {values}")
    return "\n".join(lines)


def _prune_text(prune: dict[str, Any]) -> str:
    rule = prune.get("rule")
    text = f"{str(rule).replace('_', '-')} {prune.get('value', '')}".strip() if rule else "pruned"
    if prune.get("threshold") is not None:
        text += f" (keep |γ| > {prune['threshold']:.4g})"
    before, after = prune.get("params_before"), prune.get("params_after")
    if isinstance(before, int) and isinstance(after, int) and before:
        text += f"; params {before:,} → {after:,} ({1 - after / before:.1%} pruned)"
    return text


def _header(doc: dict[str, Any]) -> Table:
    meta, model = doc["meta"], doc["model"]
    table = Table(title=f"checkpoint {doc['path']}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("sha256", doc["sha256"])
    table.add_row("arch", f"{model['arch']}  (stage {model['stage'] or '?'}, format "
                          f"{meta.get('format', '?')}, written by slim {meta.get('version', '?')})")
    classes = meta.get("classes")
    dataset = str(meta.get("dataset") or "?")
    if isinstance(classes, list):
        dataset += f" ({len(classes)} classes)"
    shape = "×".join(map(str, model["input_shape"]))
    table.add_row("data", f"{dataset}, input {shape}")
    if isinstance(meta.get("train"), dict) and meta["train"]:
        table.add_row("training", _train_text(meta["train"]))
    if isinstance(meta.get("metrics"), dict) and meta["metrics"]:
        table.add_row("metrics", _metrics_text(meta["metrics"]))
    if isinstance(meta.get("prune"), dict) and meta["prune"]:
        table.add_row("pruned by", _prune_text(meta["prune"]))
    table.add_row("params", _count(model["params"]))
    table.add_row("MACs", f"{_count(model['macs'])} for one {shape} input")
    table.add_row("FLOPs", f"{_count(model['flops'])} (= 2 × MACs)")
    return table


def _lineage(doc: dict[str, Any]) -> Table | None:
    if not doc["lineage"]:
        return None
    table = Table(title="lineage (oldest first)", title_justify="left")
    table.add_column("stage")
    table.add_column("parent sha256")
    table.add_column("time (UTC)")
    table.add_column("command", overflow="fold")
    for entry in doc["lineage"]:
        parent = entry.get("parent")
        table.add_row(str(entry.get("stage", "?")), f"{parent[:12]}…" if parent else "—",
                      str(entry.get("time", "")), str(entry.get("command", "")))
    return table


def _histogram(doc: dict[str, Any], width: int) -> Table | None:
    gamma, at = doc["gamma"], doc["at_ratio"]
    hist = gamma["histogram"]
    if not gamma["count"]:
        return None
    title = (f"log10|γ| of the {gamma['count']:,} channels of {doc['model']['prunable_batchnorms']} "
             f"prunable BatchNorms")
    table = Table(title=title, title_justify="left", box=None, show_header=True, pad_edge=False)
    table.add_column("log10|γ|", justify="right", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    edges, counts = hist["edges"], hist["counts"]
    mark, note = None, ""
    if at["threshold"] is not None and at["threshold"] > 0 and edges:
        t = math.log10(at["threshold"])
        mark = next((i for i in range(len(counts)) if t < edges[i + 1]), len(counts) - 1)
        note = f" ◀ threshold of ratio {at['ratio']:g}: {at['threshold']:.3g}"
    top = max(counts, default=0)
    # what is left of the line after the edges (16), the counts and the marker of the threshold bin
    bar_width = max(10, min(50, width - 16 - len(f"{top:,}") - 4 - len(note)))
    for i, c in enumerate(counts):
        bar = Text(_bar(c, top, bar_width), style="cyan")
        if i == mark:
            bar.append(note, style="bold yellow")
        table.add_row(f"[{edges[i]:+.2f}, {edges[i + 1]:+.2f}{']' if i == len(counts) - 1 else ')'}",
                      f"{c:,}", bar)
    return table


def _gamma_notes(doc: dict[str, Any]) -> list[str]:
    gamma, at = doc["gamma"], doc["at_ratio"]
    notes = [f"exact zeros: {gamma['zeros']:,} (not in the histogram: log10 0 = −∞)"]
    if gamma["nonfinite"]:
        notes.append(f"non-finite |γ|: {gamma['nonfinite']:,} (not in the histogram)")
    q = gamma["quantiles"]
    if q:
        notes.append("quantiles of |γ|: " + ", ".join(
            f"{name} {_num(q.get(key))}"
            for name, key in (("min", "0"), ("1%", "0.01"), ("10%", "0.1"), ("median", "0.5"),
                              ("90%", "0.9"), ("max", "1"))))
    n = gamma["count"]
    notes.append("below: " + ", ".join(f"{k} {v / n:.1%}" for k, v in gamma["below"].items()))
    if at["threshold"] is not None:
        notes.append(f"ratio {at['ratio']:g}: threshold {at['threshold']:.4g}, {at['channels_under']:,} of "
                     f"{at['channels_total']:,} channels have |γ| ≤ threshold (pruned)")
    return notes


def _short_reason(reason: str | None) -> str:
    return re.sub(r" \('[^']*'\)", "", reason or "unknown")


def _reasons(doc: dict[str, Any]) -> dict[str, int]:
    """Each distinct reason for "not prunable" (graph node names dropped so equal ones group) → its number."""
    reasons: dict[str, int] = {}
    for row in doc["layers"]:
        if not row["prunable"]:
            reasons.setdefault(_short_reason(row["reason"]), len(reasons) + 1)
    return reasons


def _layers(doc: dict[str, Any], reasons: dict[str, int]) -> Table:
    at, mc = doc["at_ratio"], doc["settings"]["min_channels"]
    thr = f"{at['threshold']:.3g}" if at["threshold"] is not None else "—"
    table = Table(title=f"BatchNorms (ratio {at['ratio']:g}: prune |γ| ≤ {thr}, min-channels {mc})",
                  title_justify="left")
    table.add_column("BatchNorm", overflow="fold")
    for name in ("ch", "min |γ|", "median", "max |γ|", "≤ thr", "kept"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("prunable", no_wrap=True)
    for row in doc["layers"]:
        if row["prunable"]:
            kept = str(row["kept"])
            if row["emptied"]:
                kept = f"[red]{kept}[/]" if row["kept"] == 0 else f"[yellow]{kept}*[/]"
            how = "yes (selection)" if row["needs_selection"] else "yes"
        else:
            kept, how = str(row["kept"]), f"[dim]no \\[{reasons[_short_reason(row['reason'])]}][/]"
        under = row["under_threshold"]
        table.add_row(row["name"], str(row["channels"]), _num(row["gamma_min"]), _num(row["gamma_median"]),
                      _num(row["gamma_max"]), "—" if under is None else str(under), kept, how)
    return table


def _layer_notes(doc: dict[str, Any], reasons: dict[str, int]) -> list[str]:
    notes = []
    if any(row["prunable"] and row["needs_selection"] for row in doc["layers"]):
        notes.append("(selection): the BatchNorm reads a shared tensor (a residual sum, a concatenation), "
                     "so a channel-selection layer goes in front of it")
    if any(row["emptied"] for row in doc["layers"]):
        mc = doc["settings"]["min_channels"]
        notes.append(f"*: the threshold empties this layer; min-channels keeps its {mc} strongest "
                     f"channel(s)" if mc else
                     "0: the threshold empties this layer; slim prune would refuse (min-channels 0)")
    for reason, number in reasons.items():
        names = [r["name"] for r in doc["layers"]
                 if not r["prunable"] and _short_reason(r["reason"]) == reason]
        shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
        notes.append(f"[{number}] not prunable ({len(names)}: {shown}): {reason}")
    return notes


def _what_if(doc: dict[str, Any]) -> Table:
    from slimcli.measure import human

    chosen, rows = doc["settings"]["ratio"], doc["what_if"]
    table = Table(title=f"what-if: prune --ratio R (min-channels {doc['settings']['min_channels']})",
                  title_justify="left")
    table.add_column("R", justify="right", no_wrap=True)
    table.add_column("threshold", justify="right", no_wrap=True)
    table.add_column(f"channels kept\n(of {rows[0]['channels_total']:,})", justify="right", no_wrap=True)
    table.add_column("params kept", justify="right", no_wrap=True)
    table.add_column("FLOPs kept", justify="right", no_wrap=True)
    table.add_column("layers emptied", overflow="fold", ratio=1)
    for row in rows:
        emptied = row["emptied"]
        names = ", ".join(emptied[:_SHOW_EMPTIED])
        if len(emptied) > _SHOW_EMPTIED:
            names += f" +{len(emptied) - _SHOW_EMPTIED}"
        params = "—" if row["params"] is None else f"{human(row['params'])} {row['params_kept']:6.1%}"
        flops = "—" if row["flops"] is None else f"{human(row['flops'])} {row['flops_kept']:6.1%}"
        style = "bold" if row["ratio"] == chosen else ("yellow" if emptied else None)
        table.add_row(f"{row['ratio']:g}" + (" ◀" if row["ratio"] == chosen else ""), _num(row["threshold"]),
                      f"{row['channels_kept']:,}", params, flops,
                      f"{len(emptied)}: {names}" if emptied else "—", style=style)
    return table


def _rounded_down(x: float) -> str:
    """``x`` with 4 decimals, rounded so that the number shown is at most ``x`` (a safe ratio to type)."""
    shown = f"{x:.4f}"
    return shown if float(shown) <= x else f"{float(shown) - 1e-4:.4f}"


def _what_if_notes(doc: dict[str, Any]) -> list[str]:
    notes = []
    bound = doc["safe_below"]
    if bound is not None:
        first = ", ".join(doc["first_emptied"])
        notes.append(f"every ratio below {_rounded_down(bound)} empties no layer (exact bound: {bound:.6g}, "
                     f"safe_below in --json); the first layer to be emptied is {first}" if bound > 0 else
                     f"every ratio empties a layer; the first to be emptied is {first}")
    if doc["settings"]["min_channels"] > 0 and any(r["emptied"] for r in doc["what_if"]):
        notes.append(f"in rows with emptied layers, min-channels keeps the {doc['settings']['min_channels']} "
                     f"strongest channel(s) of each such layer (counted in the table)")
    method = doc["what_if_method"]
    if method["method"] == "formula":
        checked = ", ".join(f"{r:g}" for r in method["checked_ratios"])
        notes.append(f"params/FLOPs kept: closed form, checked against the rebuilt slim model at "
                     f"R = {checked}; fractions of this checkpoint's model")
    elif method.get("note"):
        notes.append(f"params/FLOPs kept: {method['note']}")
    return notes


def render(doc: dict[str, Any]) -> None:
    """Print an :func:`~slimcli.flows.inspect.inspect_checkpoint` document as tables on stdout."""
    out.print(_header(doc))
    lineage = _lineage(doc)
    if lineage is not None:
        out.print(lineage)
    hist = _histogram(doc, out.width)
    if hist is None:
        out.print("no prunable BatchNorm: nothing to histogram or prune", style="yellow")
    else:
        out.print()
        out.print(hist)
        for note in _gamma_notes(doc):
            out.print(note, markup=False, highlight=False, soft_wrap=False)
    out.print()
    reasons = _reasons(doc)
    out.print(_layers(doc, reasons))
    for note in _layer_notes(doc, reasons):
        out.print(note, markup=False, highlight=False, soft_wrap=False)
    if doc["what_if"]:
        out.print(_what_if(doc))
        for note in _what_if_notes(doc):
            out.print(note, markup=False, highlight=False, soft_wrap=False)


# ----------------------------------------------------------------------------------------------
# the plot


def _import_matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SlimError(_MISSING_MPL) from None
    return Figure, FigureCanvasAgg


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise SlimError(
            f"could not write {path}: {exc.strerror or exc}; choose another --plot file"
        ) from None


def save_plot(doc: dict[str, Any], path: Path) -> None:
    """Draw the |γ| histogram and the params/FLOPs-vs-ratio curve into ``path`` (atomically)."""
    Figure, FigureCanvasAgg = _import_matplotlib()
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, whatever the user's matplotlib default is
    left, right = fig.subplots(1, 2)
    gamma, at, model = doc["gamma"], doc["at_ratio"], doc["model"]
    edges, counts = gamma["histogram"]["edges"], gamma["histogram"]["counts"]
    if counts:
        left.stairs(counts, [10.0 ** e for e in edges], fill=True, color="#4c72b0", alpha=0.85)
        left.set_xscale("log")
    if at["threshold"]:
        left.axvline(at["threshold"], color="#c44e52", linestyle="--",
                     label=f"threshold of ratio {at['ratio']:g}: {at['threshold']:.3g}")
        left.legend(loc="upper left", fontsize="small")
    left.set_xlabel("|γ| (log scale)")
    left.set_ylabel("channels")
    left.set_title(f"|γ| of {gamma['count']:,} prunable channels (exact zeros: {gamma['zeros']:,})",
                   fontsize="medium")

    rows = [r for r in doc["what_if"] if r["params_kept"] is not None]
    if rows:
        ratios = [0.0] + [r["ratio"] for r in rows]  # ratio 0 keeps the whole model
        right.plot(ratios, [100] + [100 * r["params_kept"] for r in rows], "o-", ms=3.5, label="params kept")
        right.plot(ratios, [100] + [100 * r["flops_kept"] for r in rows], "s-", ms=3.5, label="FLOPs kept")
    if doc["safe_below"] is not None and doc["safe_below"] < 1:
        right.axvspan(doc["safe_below"], 1, color="#c44e52", alpha=0.12,
                      label=f"empties a layer (ratio ≥ {doc['safe_below']:.3f})")
    right.axvline(at["ratio"], color="0.4", linestyle="--", linewidth=1,
                  label=f"chosen ratio {at['ratio']:g}")
    right.set_xlim(0, 1)
    right.set_ylim(0, 105)
    right.set_xlabel("ratio of channels pruned (prune --ratio)")
    right.set_ylabel("% of this model kept")
    right.grid(alpha=0.3)
    right.legend(loc="lower left", fontsize="small")
    right.set_title(f"what pruning keeps (min-channels {doc['settings']['min_channels']})", fontsize="medium")
    fig.suptitle(f"{model['arch']} · stage {model['stage'] or '?'} · {Path(doc['path'] or '').name} · "
                 f"{model['params']:,} params, {model['flops']:,} FLOPs", fontsize="medium")
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lower().lstrip("."), dpi=120)
    _atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# the command


@app.command("inspect", short_help="Show γ histogram, per-layer and what-if tables.")
def inspect(
    ckpt: Annotated[Path, typer.Argument(metavar="CKPT", help="Checkpoint (.safetensors) to inspect.")],
    ratio: Annotated[float, typer.Option(
        "--ratio", callback=_ratio,
        help="Ratio whose threshold the per-layer table uses (≤ thr, kept); also a what-if row.")] = 0.5,
    min_channels: Annotated[int, typer.Option(
        "--min-channels", callback=_min_channels,
        help="Channels every layer keeps at least, as slim prune does.")] = 1,
    round_to: RoundToOption = 1,
    selections: SelectionsOption = "gather",
    coupling: CouplingOption = None,
    bins: Annotated[int, typer.Option("--bins", min=1, max=500, help="Bins of the log10|γ| histogram.")] = 20,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print everything as one JSON document on stdout (nothing else).")] = False,
    plot: Annotated[Path | None, typer.Option(
        "--plot", callback=_plot_path, metavar="FILE.png", show_default=False,
        help="Also draw the histogram and the params/FLOPs-vs-ratio curve (needs matplotlib).")] = None,
) -> None:
    """Show a checkpoint: metadata, lineage, size, |γ| histogram, per-layer and what-if pruning tables."""
    from slimcli.flows.inspect import inspect_checkpoint

    if plot is not None:
        _import_matplotlib()  # fail before the work, not after it
        if not plot.parent.is_dir():
            raise SlimError(f"cannot write the plot: folder {plot.parent} does not exist; create it first")
    with err.status(f"inspecting {ckpt} …") as status:
        doc = inspect_checkpoint(ckpt, ratio=ratio, min_channels=min_channels, bins=bins, coupling=coupling,
                                 round_to=round_to, selections=selections,
                                 log=lambda msg: status.update(f"{msg} …"))
    if as_json:
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False))
    else:
        render(doc)
    if plot is not None:
        save_plot(doc, plot)
        err.print(f"plot written to {plot}", markup=False, highlight=False)
