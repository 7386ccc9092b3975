"""Crash-safe file writing shared by checkpoints, ONNX export, pruning and plots.

A file is written to a hidden temporary file in its own folder, flushed to disk, and then
renamed over the destination, so a crash leaves either the old file or the new one, never a
half-written one. These helpers raise plain :class:`OSError`; each caller turns it into the
:class:`~slimcli.errors.SlimError` whose message fits its command.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 24  # write in 16 MiB pieces so a huge file never needs one giant syscall


def temp_path(path: Path, suffix: str = "") -> Path:
    """A fresh hidden name beside ``path`` (same folder, so the final rename is atomic)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; silently skipped where a folder cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_target(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    When the block or the rename fails (any exception, Ctrl-C included) the temporary file is
    removed and the exception goes on; ``path`` is then untouched. The block creates the file.
    """
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _write_all(f: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        f.write(view[start : start + _CHUNK])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    with atomic_target(path) as tmp:
        # os.open with mode 0o666 lets the umask decide the permissions, like a plain open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())


#: bytes the writability probe writes: a full disk refuses even this much, an empty file it may not
PROBE_BYTES = 4096


def probe_writable(folder: Path, needed: int = 0) -> None:
    """Raise :class:`OSError` unless a file can be written in ``folder`` (an existing folder).

    Writes and removes :data:`PROBE_BYTES` in a hidden temporary file, which catches read-only
    mounts, missing permissions and a full disk before any work starts. With ``needed`` > 0 the
    free space (``statvfs``, where the platform has it) must be at least that many bytes too.
    """
    tmp = temp_path(folder / "write-probe")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    try:
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    if needed > 0 and hasattr(os, "statvfs"):
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        if free < needed:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free / 1e6:.1f} MB free, "
                                        f"about {needed / 1e6:.1f} MB needed)")
