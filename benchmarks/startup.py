"""Start-up time of ``slim --version`` and ``slim --help``: this tree against a baseline revision.

The baseline is checked out into a temporary ``git worktree`` (removed at the end). Each
command runs ``--runs`` times per tree, interleaved (baseline, current, baseline, …, so both
sides see the same machine load), as a fresh interpreter::

    python -c "import sys; sys.argv = ['slim', '--version']; from slimcli.cli import main; main()"

with the tree as working directory and first on ``PYTHONPATH``, so the tree's own ``slimcli``
is imported, not the editable install's (each tree's ``slimcli.__file__`` is checked and
printed before timing, with whether the command imported torch). Wall time includes the
interpreter's own start, as a user sees it; medians and the ratio baseline/current are
reported. Usage::

    python benchmarks/startup.py                     # baseline 576efb2, 20 runs of each
    python benchmarks/startup.py --baseline HEAD~3 --runs 40 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the commit before the restructure of issue 8 (command modules imported torch at start-up)
DEFAULT_BASELINE = "576efb2"
COMMANDS = (["--version"], ["--help"])

_RUN = "import sys; sys.argv = ['slim', *{args!r}]; from slimcli.cli import main; main()"
_WHERE = ("import sys, slimcli; sys.argv = ['slim', *{args!r}]; from slimcli.cli import main\n"
          "try:\n    main()\nexcept SystemExit:\n    pass\n"
          "print(slimcli.__file__, 'torch' in sys.modules, file=sys.__stderr__)")


def _env(tree: Path) -> dict[str, str]:
    drop = ("SLIM_DEBUG", "SLIM_PLUGINS", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["COLUMNS"] = "100"
    return env


def _where(python: str, tree: Path, args: list[str]) -> tuple[Path, bool]:
    """Which ``slimcli`` a run in ``tree`` imports, and whether the command imported torch."""
    res = subprocess.run([python, "-c", _WHERE.format(args=args)], cwd=tree, env=_env(tree),
                         capture_output=True, text=True, timeout=120, check=True)
    file, torch = res.stderr.strip().splitlines()[-1].rsplit(" ", 1)
    return Path(file).resolve(), torch == "True"


def _time(python: str, tree: Path, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", _RUN.format(args=args)], cwd=tree, env=_env(tree),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare against")
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each command per tree")
    parser.add_argument("--python", default=sys.executable, help="interpreter (its site-packages has torch)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    a = parser.parse_args()

    current = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=Path(__file__).parent,
                                  capture_output=True, text=True, check=True).stdout.strip())
    rev = subprocess.run(["git", "rev-parse", "--short", a.baseline], cwd=current,
                         capture_output=True, text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=current,
                          capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "slimcli"], cwd=current,
                           capture_output=True, text=True, check=True).stdout.strip()
    base = Path(tempfile.mkdtemp(prefix="slim-startup-")) / f"baseline-{rev}"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), rev], cwd=current,
                   capture_output=True, text=True, check=True)
    try:
        trees = {"baseline": base, "current": current}
        print(f"python {sys.version.split()[0]} ({a.python}); {os.cpu_count()} CPUs; {a.runs} runs each, "
              f"interleaved")
        print(f"baseline {rev}, current {head}{' + uncommitted changes' if dirty else ''}")
        for name, tree in trees.items():
            for args in COMMANDS:
                file, torch = _where(a.python, tree, args)
                if not file.is_relative_to(tree.resolve()):
                    raise SystemExit(f"{name}: imported {file}, not the tree {tree}; check PYTHONPATH")
                print(f"  {name:8s} slim {' '.join(args):9s} imports {file}  (torch imported: {torch})")
        for tree in trees.values():  # warm-up: bytecode caches, file cache
            for args in COMMANDS:
                _time(a.python, tree, args)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(a.runs):
            for args in COMMANDS:
                for name, tree in trees.items():
                    times.setdefault((name, " ".join(args)), []).append(_time(a.python, tree, args))
        bare = statistics.median(_time_bare(a.python) for _ in range(max(5, a.runs // 2)))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=current,
                       capture_output=True, text=True)
        base.parent.rmdir()

    result: dict[str, dict[str, float]] = {}
    print(f"\n{'command':16s} {'baseline':>10s} {'current':>10s} {'ratio':>7s}   (median wall time)")
    for args in COMMANDS:
        cmd = " ".join(args)
        b = statistics.median(times[("baseline", cmd)])
        c = statistics.median(times[("current", cmd)])
        result[f"slim {cmd}"] = {"baseline_s": round(b, 4), "current_s": round(c, 4),
                                 "ratio": round(b / c, 2)}
        print(f"slim {cmd:11s} {b * 1e3:8.0f} ms {c * 1e3:8.0f} ms {b / c:6.1f}×")
    print(f"(python -c pass alone: {bare * 1e3:.0f} ms)")
    if a.json:
        print(json.dumps({"baseline": rev, "current": head, "runs": a.runs, "bare_python_s": round(bare, 4),
                          **result}))


def _time_bare(python: str) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", "pass"], check=True, timeout=60)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
