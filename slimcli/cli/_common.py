"""Helpers shared by the command modules: consoles, spec-string validation at the edge."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.console import Console

from slimcli.errors import UsageError
from slimcli.registry import Registry

#: Results and tables go to stdout; progress and logs to stderr (so --json stays clean).
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def spec_callback(registry: Registry) -> Callable[[str | None], str | None]:
    """A Typer callback that validates a spec string and returns its canonical form."""

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(registry.parse(value))
        except UsageError as exc:
            raise typer.BadParameter(str(exc)) from None

    return check


def device_callback(value: str) -> str:
    """A Typer callback that checks a ``--device`` string (auto, cpu, cuda, cuda:N)."""
    from slimcli.train.device import check_device_string  # lazily: start-up cost, see docs/benchmarks.md

    try:
        return check_device_string(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--device ")) from None
