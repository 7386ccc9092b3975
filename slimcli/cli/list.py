"""``slim list``: every registered penalty, architecture and dataset with its options."""

from __future__ import annotations

import json
from enum import Enum

import typer
from rich.table import Table

from slimcli.cli._common import out
from slimcli.cli.app import app
from slimcli.registry import FAILED, REGISTRIES, load_plugins


class Kind(str, Enum):
    penalties = "penalties"
    archs = "archs"
    datasets = "datasets"


def _option_text(o: dict) -> str:
    text = f"{o['name']}={o['default']}"
    detail = o["rule"] or (" | ".join(map(str, o["choices"])) if o["choices"] else o["type"])
    return f"{text} ({detail})"


@app.command("list")
def list_plugins(
    kind: Kind | None = typer.Argument(None, help="Only this kind of plugin."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """List plugins (penalties, archs, datasets) with their options and defaults."""
    load_plugins()
    kinds = [kind.value] if kind else list(REGISTRIES)
    data = {k: [info.as_dict() for info in REGISTRIES[k]] for k in kinds}
    if as_json:
        typer.echo(json.dumps(data if kind is None else data[kind.value], indent=2, ensure_ascii=False))
        return
    for k in kinds:
        table = Table(title=k, title_justify="left", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("options (default, valid range)")
        table.add_column("description")
        for p in data[k]:
            opts = "\n".join(_option_text(o) for o in p["options"]) or "-"
            aliases = f"\naliases: {', '.join(p['aliases'])}" if p["aliases"] else ""
            table.add_row(p["name"], opts, p["description"] + aliases)
        out.print(table)
    for source, problem in FAILED:
        out.print(f"[yellow]not loaded:[/] {source}: {problem}")
