"""Downloads: streamed with a progress bar on stderr, md5-verified, never half-written.

A file is fetched to ``NAME.<pid>.part`` next to its destination, checked, then renamed, so an
interrupted or corrupt download never sits where a good file is expected. Archives are
extracted into a temporary folder beside the destination and their files renamed into place.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from slimcli.errors import DataError

TIMEOUT_S = 60
CHUNK = 1 << 20


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def download_file(url: str, dest: Path, md5: str, *, hint: str) -> Path:
    """Fetch ``url`` to ``dest`` if its md5 matches; ``hint`` (where to put the file by hand) ends errors."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # two processes never share a .part
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(part, "wb") as f:
            length = resp.headers.get("Content-Length") if resp.headers is not None else None
            total = int(length) if length and length.isdigit() else None
            with _progress() as progress:
                task = progress.add_task(f"downloading {dest.name}", total=total)
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    progress.advance(task, len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts and resets are OSErrors
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"cannot download {url} ({reason}). {hint}") from exc
    got = digest.hexdigest()
    if got != md5:
        part.unlink(missing_ok=True)
        raise DataError(
            f"the download of {url} is corrupt (md5 {got}, expected {md5}); nothing was kept. "
            f"Try again, or {hint[0].lower() + hint[1:]}"
        )
    os.replace(part, dest)
    return dest


def extract_tar(archive: Path, top: str, dest: Path) -> Path:
    """Extract the regular files under ``top/`` of a .tar.gz into ``dest`` (created), each renamed into place.

    Members outside ``top/``, links and special files are ignored: an archive cannot write
    anywhere else.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".slim-extract-", dir=dest.parent))
    try:
        moved: list[PurePosixPath] = []
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if not member.isfile() or len(parts) < 2 or parts[0] != top or ".." in parts:
                        continue
                    rel = PurePosixPath(*parts[1:])
                    target = tmp.joinpath(*rel.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None  # a regular file always has data
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    moved.append(rel)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise DataError(f"{archive} is not a valid .tar.gz ({exc}); delete it and try again") from exc
        if not moved:
            raise DataError(f"{archive} has no folder '{top}/'; it is not the expected archive")
        for rel in moved:
            final = dest.joinpath(*rel.parts)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp.joinpath(*rel.parts), final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
