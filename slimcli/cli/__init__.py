"""The ``slim`` command line: thin commands that parse, call the library and render.

Each command lives in its own module and registers itself on :data:`app`; :func:`main`
turns library errors into one ``Error: …`` line (exit 1, or 2 for usage errors).

Start-up: no command module imports torch (or any library module that does) at module level;
they import the library inside the command body, so ``slim --help``, ``slim --version`` and
``slim CMD --help`` stay fast. tests/test_cli_basics.py guards it; see docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TextIO

from slimcli._cmdline import set_command_line
from slimcli.cli import demo as _demo  # noqa: F401  (registers the command)
from slimcli.cli import export as _export  # noqa: F401  (registers the command)
from slimcli.cli import finetune as _finetune  # noqa: F401  (registers the command)
from slimcli.cli import import_ as _import  # noqa: F401  (registers the command)
from slimcli.cli import inspect as _inspect  # noqa: F401  (registers the command)
from slimcli.cli import list as _list  # noqa: F401  (registers the command)
from slimcli.cli import prune as _prune  # noqa: F401  (registers the command)
from slimcli.cli import sparsify_train as _sparsify_train  # noqa: F401  (registers the command)
from slimcli.cli import sweep as _sweep  # noqa: F401  (registers the command)
from slimcli.cli.app import app
from slimcli.errors import SlimError


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """slim's own warnings ("slim: …") as one plain line; others as Python shows them."""
    text = str(message)
    if text.startswith("slim: "):
        print(f"warning: {text.removeprefix('slim: ')}", file=file or sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``slim`` console script."""
    debug = os.environ.get("SLIM_DEBUG", "").strip() not in ("", "0")
    set_command_line(sys.argv[1:] if argv is None else argv)
    try:
        with warnings.catch_warnings():  # restores showwarning when main() is called in-process
            if not debug:  # SLIM_DEBUG keeps Python's file:line form
                warnings.showwarning = _show_warning
            app(args=argv, prog_name="slim")
    except SlimError as exc:
        if debug:
            raise
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        print("Error: interrupted", file=sys.stderr)
        sys.exit(130)
