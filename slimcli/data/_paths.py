"""Where dataset files are searched for and where downloads go.

Search order: the explicit ``root`` (the CLI's ``--data-dir``), ``$SLIM_DATA``,
``~/.cache/slim``, then dataset-specific system folders (Debian's
``/usr/share/datasets``). Inside each root a dataset lives in a sub-folder with a
dataset-specific name (``cifar-10-batches-py``, ``fashion-mnist``, ``MNIST/raw`` …), the
same names torchvision uses where it has one, so existing downloads are found.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from slimcli.errors import DataError

OFFLINE_ENV = "SLIM_OFFLINE"
DATA_ENV = "SLIM_DATA"


def user_roots(root: Path | str | None) -> list[Path]:
    """The roots a user controls, in search order, without duplicates: ``root``, $SLIM_DATA, ~/.cache/slim."""
    roots: list[Path] = []
    if root is not None:
        roots.append(Path(root).expanduser())
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        roots.append(Path(env).expanduser())
    roots.append(Path.home() / ".cache" / "slim")
    unique: list[Path] = []
    for r in roots:
        if r not in unique:
            unique.append(r)
    return unique


def candidate_dirs(roots: Iterable[Path], subdirs: Sequence[str]) -> list[Path]:
    """Every folder where a dataset stored under one of ``subdirs`` may be, in search order.

    A root whose own name is one of the sub-folder names counts too, so
    ``--data-dir ~/data/cifar-10-batches-py`` works as well as ``--data-dir ~/data``.
    """
    dirs: list[Path] = []
    for r in roots:
        for sub in subdirs:
            for d in (r / sub, r if "/" not in sub and r.name == sub else None):
                if d is not None and d not in dirs:
                    dirs.append(d)
    return dirs


def find_dir(dirs: Iterable[Path], has_files: Callable[[Path], bool]) -> Path | None:
    """The first folder of ``dirs`` for which ``has_files`` is true."""
    for d in dirs:
        try:
            if d.is_dir() and has_files(d):
                return d
        except OSError:  # an unreadable folder is simply not a match
            continue
    return None


def writable_root(roots: Iterable[Path]) -> Path | None:
    """The first root that exists (or can be created) and is writable: where downloads go."""
    for r in roots:
        try:
            r.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(r, os.W_OK | os.X_OK):
            return r
    return None


def download_root(roots: list[Path], missing: str, hint: str) -> Path:
    """The root a missing dataset is downloaded into, or the :class:`DataError` saying why it cannot be.

    ``missing`` says what was not found where; ``hint`` (how to get the files by hand) ends the message.
    """
    if offline():
        raise DataError(f"{missing}; {OFFLINE_ENV}=1 forbids downloading. {hint}")
    target = writable_root(roots)
    if target is None:
        raise DataError(f"{missing}, and none of {show(roots)} is writable to download into. {hint}")
    return target


def offline() -> bool:
    """True when ``SLIM_OFFLINE`` forbids any network access."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def show(paths: Iterable[Path]) -> str:
    """Paths for a one-line error message."""
    return ", ".join(str(p) for p in paths)


def one_of(paths: Iterable[Path]) -> str:
    """``X`` for one folder, ``one of X, Y`` for several (where to put downloaded files)."""
    listed = list(paths)
    return show(listed) if len(listed) == 1 else f"one of {show(listed)}"
