"""``slim prune [CKPT]``: remove the channels with small BN scales |γ| and write a slim checkpoint."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.columns import Columns
from rich.markup import escape
from rich.table import Table

from slimcli.cli._common import (
    CouplingOption,
    RoundToOption,
    SelectionsOption,
    device_callback,
    err,
    library_check,
    non_negative,
    one_of,
    out,
)
from slimcli.cli.app import app

if TYPE_CHECKING:
    from slimcli.flows.prune import PruneResult

RULE = "Pruning rule (exactly one)"
#: up to this many prunable layers get one table row each; more are packed into columns
_TABLE_ROWS = 24


def _rule_value(param: typer.CallbackParam, value: float | None) -> float | None:
    """--ratio, --threshold, --target-params, --target-flops: the library's own check, as exit 2."""
    if value is None:  # not given
        return None
    from slimcli.errors import UsageError
    from slimcli.prune.rules import check_rule

    try:
        return check_rule(str(param.name), value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


#: the library's own check, as exit 2
_min_channels = library_check("slimcli.prune.rules", "check_min_channels")


def _onnx_path(value: Path | None) -> Path | None:
    if value is not None and value.suffix.lower() != ".onnx":
        raise typer.BadParameter(f"must end in .onnx, e.g. {value.with_suffix('.onnx')}")
    return value


def _out_path(value: Path | None) -> Path | None:
    name = value.name if value is not None else ""
    if value is not None and (not name.endswith(".safetensors") or name.endswith(".state.safetensors")):
        raise typer.BadParameter(f"must be a checkpoint file ending in .safetensors, got {value}")
    return value


def _pct(part: float, whole: float) -> str:
    return f"{1 - part / whole:.1%} pruned" if whole else "—"


def _render(r: PruneResult) -> None:
    from slimcli.measure import human

    plan = r.plan
    rule = f"{plan.rule.replace('_', '-')} {plan.value:g}"
    if plan.threshold is not None:
        rule += f" → keep |γ| > {plan.threshold:.6g}"
    else:
        rule += " → nothing below the threshold"
    if plan.achieved is not None:
        what = "parameters" if plan.rule == "target_params" else "FLOPs"
        rule += f" (reached {plan.achieved:.4f} of the {what})"
    table = Table(title=f"pruned {r.source}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths are never cut short
    table.add_row("rule", rule)
    table.add_row("channels", f"{plan.kept_channels:,} of {plan.total_channels:,} kept "
                              f"({plan.ratio:.1%} pruned; min-channels {plan.min_channels})")
    table.add_row("params", f"{r.before.params:,} → {r.after.params:,} "
                            f"({_pct(r.after.params, r.before.params)})")
    table.add_row("FLOPs (2×MACs)", f"{human(r.before.flops)} → {human(r.after.flops)} "
                                   f"({_pct(r.after.flops, r.before.flops)})")
    rounding = (r.meta.get("prune") or {}).get("rounding")
    if rounding:
        table.add_row(f"round-to {rounding['round_to']}",
                      f"+{rounding['channels_added']:,} channels; without rounding params "
                      f"{rounding['params_unrounded']:,}, FLOPs {human(rounding['flops_unrounded'])}")
    groups = r.report.groups
    if groups:
        table.add_row("coupling", f"{r.report.coupling}: {len(groups)} coupled group(s) pruned jointly "
                                  f"({sum(len(v) for v in groups.values())} BNs; --json lists them)")
    recal = r.recalibration.get("images") or 0
    if r.accuracy is not None:
        steps = [f"{r.accuracy_before:.2%} recorded"] if r.accuracy_before is not None else []
        if recal:
            steps += [f"{r.accuracy_surgery:.2%} after surgery", f"{r.accuracy:.2%} after recalibration"]
        else:
            steps += [f"{r.accuracy:.2%} right after pruning"]
        table.add_row("test accuracy", " → ".join(steps) + " (before fine-tuning)")
    elif r.accuracy_before is not None:
        table.add_row("test accuracy",
                      f"{r.accuracy_before:.2%} recorded before pruning (--eval measures it after)")
    if recal:
        table.add_row("BN statistics", f"recalibrated on {recal:,} training images "
                                       f"(seed {r.recalibration.get('seed')}; --recalibrate 0: off)")
    else:
        table.add_row("BN statistics", f"not recalibrated ({r.recalibration.get('note') or 'off'})")
    if r.report.fold_shift:
        folded = [f for f in r.report.folds if f.targets]
        approx = sum(1 for f in folded if not f.exact)
        table.add_row("BN shift β", f"folded into {len(folded)} consumer layer(s)"
                                    + (f", {approx} of them approximately (zero padding)" if approx else "")
                                    + f", {len(r.report.folds) - len(folded)} not folded")
    table.add_row("written", f"{r.out}  (stage pruned, sha256 {r.sha256[:12]}…)")
    out.print(table)

    layers = [x for x in r.report.layers if x.prunable]
    if len(layers) <= _TABLE_ROWS:
        notes = ["min-channels" if x.min_channels_bit else ("selection" if x.needs_selection else "")
                 for x in layers]
        widths = Table(title="per-layer widths", title_justify="left")
        widths.add_column("BatchNorm")
        widths.add_column("kept", justify="right")
        widths.add_column("of", justify="right")
        if any(notes):  # no empty column when there is nothing to say
            widths.add_column("note")
        for x, note in zip(layers, notes, strict=True):
            widths.add_row(x.name, str(x.kept), str(x.channels), *([note] if any(notes) else []))
        out.print(widths)
    else:
        out.print(f"per-layer widths (kept/of), {len(layers)} layers:", highlight=False)
        out.print(Columns([f"{x.name} {x.kept}/{x.channels}" + ("*" if x.min_channels_bit else "")
                           for x in layers], padding=(0, 2)), highlight=False)
    for x in layers:
        if x.min_channels_bit:
            by_rule, kept = x.min_channels_bit
            out.print(f"[yellow]kept {kept} of {x.channels} channels of {x.name} (min-channels; "
                      f"the rule alone kept {by_rule})[/]", highlight=False)
    for f in r.report.folds:
        if not f.targets:
            out.print(f"[yellow]shift of {f.channels} pruned channel(s) of {f.bn} not folded:[/] "
                      f"{escape(f.reason or '')}", highlight=False)
    reasons: dict[str, list[str]] = defaultdict(list)
    for x in r.report.layers:
        if not x.prunable:
            reasons[x.reason or "?"].append(x.name)
    for reason, names in reasons.items():
        shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        out.print(f"not prunable: {shown}: {reason}", markup=False, highlight=False)
    if r.export is not None:
        from slimcli.cli.export import render_report

        out.print(render_report(r.export))
    out.print(f"next: slim finetune {r.out}", markup=False, highlight=False)


@app.command("prune", short_help="Cut channels with small |γ|, write a slim checkpoint.")
def prune(
    ckpt: Annotated[Path | None, typer.Argument(
        metavar="CKPT", help="Checkpoint to prune [default: the newest under ./runs].",
        show_default=False)] = None,
    ratio: Annotated[float | None, typer.Option(
        "--ratio", callback=_rule_value, rich_help_panel=RULE, show_default=False,
        help="Global fraction of BN channels to remove (the paper's percentile), in (0, 1).")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", callback=_rule_value, rich_help_panel=RULE, show_default=False,
        help="Keep channels with |γ| > T (0 keeps exactly the nonzeros of a --update proximal run).")] = None,
    target_params: Annotated[float | None, typer.Option(
        "--target-params", callback=_rule_value, rich_help_panel=RULE, show_default=False,
        help="Keep at most this fraction of the parameters (largest such model, by search).")] = None,
    target_flops: Annotated[float | None, typer.Option(
        "--target-flops", callback=_rule_value, rich_help_panel=RULE, show_default=False,
        help="Keep at most this fraction of the FLOPs (largest such model, by search).")] = None,
    min_channels: Annotated[int, typer.Option(
        "--min-channels", callback=_min_channels,
        help="Keep at least N channels in every layer (0: a layer the rule empties is an error).")] = 1,
    recalibrate: Annotated[int, typer.Option(
        "--recalibrate", metavar="N", callback=non_negative,
        help="Re-estimate BatchNorm statistics on N training images after surgery (forward passes "
             "only; 0: off). Skipped with a note when the dataset is not on disk.")] = 2048,
    seed: Annotated[int, typer.Option(
        "--seed", callback=non_negative, help="Seed that draws the recalibration images.")] = 0,
    round_to: RoundToOption = 1,
    group_score: Annotated[str, typer.Option(
        "--group-score", callback=one_of("mean", "max"),
        help="How a coupled group of BN channels is scored: mean or max of their |γ| "
             "(max: a group goes only when every member is below the threshold).")] = "mean",
    selections: SelectionsOption = "gather",
    coupling: CouplingOption = None,
    fold_shift: Annotated[bool, typer.Option(
        "--fold-shift",
        help="Fold the constant relu(β) of removed channels into the next layer's bias / BN running "
             "mean instead of dropping it (default: the paper's, β dropped).")] = False,
    out_path: Annotated[Path | None, typer.Option(
        "--out", callback=_out_path, show_default=False,
        help="Slim checkpoint to write [default: <ckpt stem>-pruned.safetensors next to CKPT].")] = None,
    eval_: Annotated[bool, typer.Option(
        "--eval", help="Measure test accuracy right after pruning (before fine-tuning).")] = False,
    export: Annotated[Path | None, typer.Option(
        "--export", callback=_onnx_path, metavar="FILE.onnx", show_default=False,
        help="Also export the slim model to ONNX (verified against PyTorch, as slim export).")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", show_default=False,
        help="Where the checkpoint's dataset is (for --eval, --recalibrate and --export).")] = None,
    device: Annotated[str, typer.Option(
        "--device", callback=device_callback,
        help="Device for --eval and --recalibrate: auto (CUDA if present), cpu, cuda[:N].")] = "auto",
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the result as one JSON document on stdout (nothing else).")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing --out checkpoint or --export file.")] = False,
) -> None:
    """Prune channels by a global |γ| rule and write a slim checkpoint (stage "pruned").

    The checkpoint records the kept widths, so it loads without pruning code. BatchNorm
    statistics are re-estimated on 2048 training images (--recalibrate), which undoes the
    shift the removed channels' β leave behind; --export also writes a verified ONNX model,
    --eval measures accuracy before fine-tuning.
    """
    from slimcli.flows.prune import newest_checkpoint, prune_checkpoint

    rules = {"ratio": ratio, "threshold": threshold,
             "target_params": target_params, "target_flops": target_flops}
    given = {k: v for k, v in rules.items() if v is not None}
    if len(given) != 1:
        what = "two or more" if given else "none"
        raise typer.BadParameter(
            f"give exactly one of --ratio, --threshold, --target-params, --target-flops ({what} given)",
            param_hint="rule",
        )
    (rule, value), = given.items()
    if ckpt is None:
        ckpt = newest_checkpoint("runs")
        err.print(f"checkpoint: {ckpt} (the newest under ./runs)", markup=False, highlight=False)
    result = prune_checkpoint(
        ckpt, rule, value, min_channels, out_path, eval=eval_, export=export,
        data_dir=data_dir, device=device, fold_shift=fold_shift, recalibrate=recalibrate, seed=seed,
        force=force, coupling=coupling, round_to=round_to, selections=selections,
        group_score=group_score,
        log=lambda msg: err.print(msg, markup=False, highlight=False),
    )
    if as_json:
        typer.echo(json.dumps(result.as_dict(), ensure_ascii=False))
        return
    for note in result.export.notes if result.export is not None else ():
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    _render(result)
