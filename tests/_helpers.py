"""Helpers shared by the test modules (import as ``from _helpers import ...``)."""

from __future__ import annotations

import pytest

from slimcli.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``slim ARGV`` in-process: ``(exit code, stdout, stderr)``."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else int(code)), captured.out, captured.err
