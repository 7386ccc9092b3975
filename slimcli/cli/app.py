"""The Typer application object every command module registers on."""

from __future__ import annotations

import typer

from slimcli._version import __version__


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slim {__version__}")
        raise typer.Exit()


# Plain (non-rich) usage errors keep them to one readable "Error: …" line on stderr.
app = typer.Typer(
    name="slim",
    help="Network slimming with nonconvex penalties: sparsify BN scales, prune channels, "
    "fine-tune, export slim ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Network slimming with nonconvex penalties."""
