"""``slim list``: every registered penalty, architecture and dataset with its options."""

from __future__ import annotations

import difflib
import json

import typer
from rich.console import Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from slimcli.cli._common import out
from slimcli.cli.app import app
from slimcli.registry import FAILED, REGISTRIES, load_plugins

_SINGULAR = {"penalty": "penalties", "arch": "archs", "dataset": "datasets"}


def _kind(value: str | None) -> str | None:
    """Accept ``penalties``/``penalty``, ``archs``/``arch``, ``datasets``/``dataset``."""
    if value is None:
        return None
    low = value.strip().lower()
    low = _SINGULAR.get(low, low)
    if low in REGISTRIES:
        return low
    close = difflib.get_close_matches(low, [*REGISTRIES, *_SINGULAR], n=1, cutoff=0.5)
    hint = f" Did you mean '{_SINGULAR.get(close[0], close[0])}'?" if close else ""
    raise typer.BadParameter(f"unknown kind '{value}'.{hint} Choose penalties, archs or datasets")


def _options_cell(options: list[dict]) -> Group | str:
    """Each option as ``name=default (rule)`` with what it does indented under it."""
    lines: list[Text | Padding] = []
    for o in options:
        detail = o["rule"] or (" | ".join(map(str, o["choices"])) if o["choices"] else o["type"])
        lines.append(Text(f"{o['name']}={o['default']} ({detail})"))
        if o.get("help"):  # e.g. that scad's default θ = λ acts on |γ| ≤ a·λ only
            lines.append(Padding(Text(o["help"], style="dim"), (0, 0, 0, 2)))
    return Group(*lines) if lines else "-"


@app.command("list", short_help="List penalties, archs and datasets with options.")
def list_plugins(
    kind: str | None = typer.Argument(
        None, callback=_kind, metavar="KIND", help="Only this kind: penalties, archs or datasets."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """List plugins (penalties, archs, datasets) with their options and defaults."""
    load_plugins()
    kinds = [kind] if kind else list(REGISTRIES)
    data = {k: [info.as_dict() for info in REGISTRIES[k]] for k in kinds}
    if as_json:
        typer.echo(json.dumps(data if kind is None else data[kind], indent=2, ensure_ascii=False))
        return
    for k in kinds:
        table = Table(title=k, title_justify="left", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("options (default, valid range)")
        table.add_column("description")
        for p in data[k]:
            opts = _options_cell(p["options"])
            aliases = f"\naliases: {', '.join(p['aliases'])}" if p["aliases"] else ""
            table.add_row(p["name"], opts, p["description"] + aliases)
        out.print(table)
    for source, problem in FAILED:
        out.print(f"[yellow]not loaded:[/] {source}: {problem}")
