"""slimcli._fs: the one implementation of crash-safe writes behind checkpoints, export, prune and plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimcli._fs import atomic_target, atomic_write_bytes


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_target_renames_on_success_and_removes_the_temp_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_target(path, suffix=".safetensors") as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".out.bin.")
        assert tmp.name.endswith(".tmp.safetensors")
        tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"  # nothing visible until the block ends
    assert path.read_bytes() == b"new" and _names(tmp_path) == ["out.bin"]

    for exc in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_target(path) as tmp:
            tmp.write_bytes(b"half")
            raise exc
        assert path.read_bytes() == b"new" and _names(tmp_path) == ["out.bin"]


def test_atomic_write_bytes_replaces_and_a_failed_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.png"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and _names(tmp_path) == ["f.png"]

    def boom(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("slimcli._fs.os.replace", boom)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write_bytes(path, b"three")
    assert path.read_bytes() == b"two" and _names(tmp_path) == ["f.png"]
