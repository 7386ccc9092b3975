"""The ``slim`` command line this process runs with, for lineage records (no torch here).

The CLI's ``main()`` records its arguments before any command module or torch is imported;
:func:`slimcli.checkpoint.lineage_entry` reads them back. Kept apart from ``checkpoint`` so
that ``slim --version`` and ``slim --help`` start without importing torch (docs/benchmarks.md).
"""

from __future__ import annotations

import shlex
import sys

_command_line: list[str] | None = None  # set by the CLI's main(); else sys.argv is used


def set_command_line(args: list[str]) -> None:
    """Record the ``slim`` arguments this process runs with (for lineage records)."""
    global _command_line
    _command_line = list(args)


def command_line() -> str:
    """``slim`` and its arguments as one shell-quoted string (those recorded, else ``sys.argv``)."""
    return shlex.join(["slim", *(_command_line if _command_line is not None else sys.argv[1:])])
