"""Self-describing safetensors checkpoints: tensors, ``slim.*`` metadata, atomic writes, lineage.

A checkpoint is one ``*.safetensors`` file holding a model's ``state_dict`` plus string
metadata, every key prefixed ``slim.`` (JSON for structured values). Everything needed to
rebuild the model is in the file: :func:`slimcli.model.build_model` creates the registered
architecture, applies the recorded pruned widths and loads the tensors with ``strict=True``.
This module is the file format and its I/O only; it knows nothing about architectures. Training
state for ``--resume`` lives in the sibling ``<stem>.state.safetensors``, which records the
sha256 of the model file it belongs to.

Nothing here ever unpickles: safetensors holds raw tensor bytes, and importing a foreign
``.pth`` goes through ``torch.load(weights_only=True)`` only (:func:`import_pth`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor, nn

from slimcli._cmdline import command_line
from slimcli._fs import atomic_write_bytes, probe_writable, temp_path
from slimcli._version import __version__
from slimcli.errors import CheckpointError

#: Version of the on-disk layout; bump when a reader of the old version would misread a new file.
FORMAT_VERSION = 1
PREFIX = "slim."
STAGES = ("sparsify", "pruned", "finetuned")
#: Metadata stored as plain strings; every other key is JSON.
_STR_KEYS = frozenset({"version", "arch", "dataset", "stage", "data_sha256", "model_sha256"})
#: What build_model needs; a checkpoint without these cannot be rebuilt.
_REQUIRED = ("arch", "num_classes", "input_shape")
STATE_SUFFIX = ".state.safetensors"
_CHUNK = 1 << 24  # hash in 16 MiB pieces
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors, decoded ``slim.*`` metadata (prefix removed) and sha256."""

    path: Path | None
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    sha256: str

    @property
    def arch(self) -> str:
        return self.meta["arch"]

    @property
    def widths(self) -> dict[str, int] | None:
        return self.meta.get("widths")

    @property
    def stage(self) -> str | None:
        return self.meta.get("stage")

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input_shape"])

    @property
    def lineage(self) -> list[dict[str, Any]]:
        return list(self.meta.get("lineage") or [])

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.meta.get("metrics") or {})


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def state_path(path: str | os.PathLike[str]) -> Path:
    """The sibling training-state file of a checkpoint: ``last.safetensors`` → ``last.state.safetensors``."""
    p = Path(path)
    if p.name.endswith(STATE_SUFFIX):
        return p
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(stem + STATE_SUFFIX)


def previous_state_path(path: str | os.PathLike[str]) -> Path:
    """Where the previous training state is kept: ``last.safetensors`` → ``last.prev.state.safetensors``.

    It matches the model file until the next model write lands, so a crash between the state
    write and the model write leaves a pair that :func:`load_state` can still resume from.
    """
    p = state_path(path)
    return p.with_name(p.name[: -len(STATE_SUFFIX)] + ".prev" + STATE_SUFFIX)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (the identity used in lineage and state pairing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def lineage_entry(stage: str, parent_sha: str | None, command: str | None = None) -> dict[str, Any]:
    """One lineage record: the stage, the parent checkpoint's sha256, the command line and UTC time.

    ``command`` defaults to the command line given to ``slim``
    (see :func:`slimcli._cmdline.set_command_line`).
    """
    if command is None:
        command = command_line()
    return {
        "stage": stage,
        "parent": parent_sha,
        "command": command,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DDP / DataParallel / torch.compile wrappers (so keys carry no prefix)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _plain_tensors(tensors: dict[str, Any], what: str) -> dict[str, Tensor]:
    """CPU, contiguous tensors that own their storage (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"cannot save {what}: '{name}' is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # a fresh copy: owns its storage
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # A view of part of a buffer, a tensor sharing storage with another, or a strided one
        # (channels_last, transposed) is copied into a fresh compact tensor.
        if (ptr in seen and t.numel() > 0) or not t.is_contiguous() or storage.nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = t
    return out


def _encode_meta(meta: dict[str, Any]) -> dict[str, str]:
    encoded: dict[str, str] = {}
    for key, value in meta.items():
        key = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if value is None and key in _STR_KEYS:
            continue
        if key in _STR_KEYS:
            encoded[PREFIX + key] = str(value)
            continue
        try:
            encoded[PREFIX + key] = json.dumps(value, ensure_ascii=False, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"cannot save metadata '{key}': {exc}; pass JSON-serialisable values"
            ) from None
    return encoded


def _decode_meta(raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            continue
        key = key[len(PREFIX) :]
        if key in _STR_KEYS:
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value  # a hand-edited or foreign value: keep the text rather than fail
    return meta


def _check_meta(meta: dict[str, Any]) -> None:
    missing = [k for k in _REQUIRED if meta.get(k) is None and meta.get(PREFIX + k) is None]
    if missing:
        raise CheckpointError(
            f"cannot save a checkpoint without {', '.join(missing)} in its metadata "
            f"(needed to rebuild the model)"
        )
    stage = meta.get("stage", meta.get(PREFIX + "stage"))
    if stage is not None and stage not in STAGES:
        raise CheckpointError(f"unknown checkpoint stage {stage!r}; expected one of {', '.join(STAGES)}")


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def ensure_folder(folder: Path, *, needed: int = 0, option: str = "--out", create: bool = True) -> None:
    """Make sure files can be written in ``folder``, or raise a :class:`CheckpointError` that says why.

    Creates the folder (and parents) unless ``create`` is false (then a missing folder is the
    error), and writes a small probe file (:func:`slimcli._fs.probe_writable`), so a read-only
    mount, missing permission or full disk (``needed`` bytes free) is reported before any work.
    """
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot write into {folder}: it is a file, not a folder; "
                              f"choose another {option}")
    if not create and not folder.is_dir():
        raise CheckpointError(f"folder {folder} does not exist; create it (mkdir -p {folder}) or choose "
                              f"another {option}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create folder {folder}: {exc.strerror or exc}; choose another {option}"
        ) from None
    try:
        probe_writable(folder, needed)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write to folder {folder}: {exc.strerror or exc}; free space, fix its permissions "
            f"or choose another {option}"
        ) from None


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise CheckpointError(
            f"could not write {path}: {exc.strerror or exc}; the previous file is unchanged "
            f"(free disk space or choose another --out)"
        ) from exc


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | dict[str, Tensor],
    meta: dict[str, Any],
    *,
    state: dict[str, Tensor] | None = None,
    state_meta: dict[str, Any] | None = None,
) -> str:
    """Atomically write a checkpoint (and its training state when ``state`` is given).

    ``meta`` keys are stored with the ``slim.`` prefix; ``format`` and ``version`` are filled
    in. The state file is written first and records the model file's sha256; the state it
    replaces is kept as :func:`previous_state_path` (when it fits the current model file), so a
    crash between the two writes leaves the previous good pair, which :func:`load_state` falls
    back to.
    Returns the sha256 of the written model file.
    """
    path = Path(path)
    _check_meta(meta)
    sd = unwrap_model(model).state_dict() if isinstance(model, nn.Module) else model
    tensors = _plain_tensors(dict(sd), f"checkpoint {path}")
    header = _encode_meta(meta)
    header[PREFIX + "format"] = str(FORMAT_VERSION)
    header[PREFIX + "version"] = __version__
    data = _with_data_checksum(tensors, header)
    sha = hashlib.sha256(data).hexdigest()
    if state is not None:
        _keep_previous_state(path)
        smeta = _encode_meta(state_meta or {})
        smeta[PREFIX + "format"] = str(FORMAT_VERSION)
        smeta[PREFIX + "version"] = __version__
        smeta[PREFIX + "model_sha256"] = sha
        _atomic_write(state_path(path), _with_data_checksum(_plain_tensors(state, "training state"), smeta))
    _atomic_write(path, data)
    return sha


def _recorded_model_sha(state_file: Path) -> str | None:
    """The ``slim.model_sha256`` in a state file's header (read without loading its tensors)."""
    try:
        with open(state_file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 2 <= n <= _MAX_HEADER:
                return None
            meta = json.loads(f.read(n).decode("utf-8")).get("__metadata__") or {}
        value = meta.get(PREFIX + "model_sha256")
        return value if isinstance(value, str) else None
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None


def _keep_previous_state(path: Path) -> None:
    """Before a new state is written, keep the current one as the previous state when it belongs
    to the current model file (a hard link, or a copy where links are not possible)."""
    sp, prev = state_path(path), previous_state_path(path)
    if not (sp.is_file() and path.is_file()) or _recorded_model_sha(sp) != file_sha256(path):
        return  # no pair yet, or a mismatched one: the previous state (if any) is the good one
    link = temp_path(prev)
    try:
        os.link(sp, link)
        os.replace(link, prev)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(link)
        try:
            atomic_write_bytes(prev, sp.read_bytes())
        except OSError as exc:
            raise CheckpointError(
                f"could not keep the previous training state as {prev}: {exc.strerror or exc}; "
                f"nothing was changed (free disk space or choose another --out)"
            ) from None


def _data_section(data: bytes) -> bytes:
    return data[8 + struct.unpack("<Q", data[:8])[0] :]


def _with_data_checksum(tensors: dict[str, Tensor], header: dict[str, str]) -> bytes:
    """Serialise with ``slim.data_sha256``: the sha256 of the tensor bytes, so that damage inside
    the data (not only a cut or a broken header) is caught on load. The data section does not
    depend on the metadata, so the second serialisation has the same bytes after the header."""
    digest = hashlib.sha256(_data_section(_st_save(tensors, metadata=header))).hexdigest()
    return _st_save(tensors, metadata={**header, PREFIX + "data_sha256": digest})


# --------------------------------------------------------------------------------------
# metadata checks (once, where a file is read)
# --------------------------------------------------------------------------------------
_MAX_DIM = 1 << 16  # an input side or channel count beyond this is a damaged file, not a model
_MAX_PIXELS = 1 << 26
_SCALAR = (str, int, float, bool, type(None))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _bad(field: str, want: str, value: Any) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"slim.{field} must be {want}, got {_kind(value)} {shown}")


def validate_meta(meta: dict[str, Any]) -> None:
    """Check the type and range of every ``slim.*`` field slim reads; a :class:`CheckpointError` naming
    the field when one is wrong (a damaged or hand-edited file). Unknown fields are left alone."""
    arch = meta.get("arch")
    if not isinstance(arch, str) or not arch.strip():
        raise _bad("arch", "an architecture spec string such as vgg19", arch)
    nc = meta.get("num_classes")
    if not _is_int(nc) or not 2 <= nc <= 1 << 20:
        raise _bad("num_classes", "an integer >= 2", nc)
    shape = meta.get("input_shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 4
            or not all(_is_int(d) and 1 <= d <= _MAX_DIM for d in shape)):
        raise _bad("input_shape", f"a list of 1 to 4 positive integers (at most {_MAX_DIM}), "
                   f"e.g. [3, 32, 32]", shape)
    pixels = 1
    for d in shape:
        pixels *= d
    if pixels > _MAX_PIXELS:
        raise _bad("input_shape", f"an input of at most {_MAX_PIXELS} values", shape)
    stage = meta.get("stage")
    if stage is not None and stage not in STAGES:
        raise _bad("stage", f"one of {', '.join(STAGES)}", stage)
    widths = meta.get("widths")
    if widths is not None and (not isinstance(widths, dict) or not all(
            isinstance(k, str) and _is_int(v) and 1 <= v <= _MAX_DIM for k, v in widths.items())):
        raise _bad("widths", "an object of layer name -> positive channel count", widths)
    for key in ("dataset",):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise _bad(key, "a string", meta[key])
    classes = meta.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise _bad("classes", "a list of class names", classes)
        if len(classes) != nc:
            raise CheckpointError(f"slim.classes names {len(classes)} classes but slim.num_classes is {nc}")
    norm = meta.get("normalization")
    if norm is not None:
        ok = isinstance(norm, dict) and all(
            isinstance(norm.get(k), list) and len(norm[k]) == shape[0]
            and all(_number(x) and math.isfinite(x) for x in norm[k]) for k in ("mean", "std"))
        if not ok or not all(x > 0 for x in norm["std"]):
            raise _bad("normalization", f"an object with 'mean' and 'std' lists of {shape[0]} finite "
                       f"numbers (std > 0)", norm)
    metrics = meta.get("metrics")
    if metrics is not None and (not isinstance(metrics, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, _SCALAR) for x in v.values())
            for v in metrics.values())):
        raise _bad("metrics", "an object of stage -> {name: number}", metrics)
    lineage = meta.get("lineage")
    if lineage is not None:
        if not isinstance(lineage, list):
            raise _bad("lineage", "a list of records", lineage)
        for i, entry in enumerate(lineage):
            if not isinstance(entry, dict) or not all(entry.get(k) is None or isinstance(entry[k], str)
                                                      for k in ("stage", "parent", "command", "time")):
                raise _bad(f"lineage[{i}]", "an object with string stage, parent, command and time", entry)
    for key in ("prune", "train"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise _bad(key, "an object", meta[key])
    prune = meta.get("prune") or {}
    for key in ("value", "threshold", "achieved", "params_before", "params_after", "flops_before",
                "flops_after", "ratio", "accuracy", "loss"):
        if prune.get(key) is not None and not _number(prune[key]):
            raise _bad(f"prune.{key}", "a number", prune[key])


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def _check_path(path: Path, what: str) -> None:
    if not path.exists():
        hint = ""
        if path.parent.is_dir():
            near = sorted(
                p.name for p in path.parent.glob("*.safetensors") if not p.name.endswith(STATE_SUFFIX)
            )
            if near:
                hint = f" (that folder has: {', '.join(near[:5])})"
        raise CheckpointError(f"{what} not found: {path}{hint}; check the path")
    if path.is_dir():
        inside = [n for n in ("best.safetensors", "last.safetensors") if (path / n).is_file()]
        hint = f", e.g. {path / inside[0]}" if inside else ""
        raise CheckpointError(f"{path} is a folder, not a {what}; pass a .safetensors file{hint}")


def _read_bytes(path: Path, what: str) -> bytes:
    _check_path(path, what)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def _looks_like_pickle(data: bytes) -> bool:
    # torch.save writes a zip archive (PK\x03\x04) since 1.6, a bare pickle (protocol ≥ 2: 0x80) before.
    return data[:4] == b"PK\x03\x04" or (len(data) > 1 and data[0] == 0x80 and data[1] <= 5)


#: bytes per element of every dtype name safetensors writes
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_end(name: str, entry: Any) -> int:
    """Check one tensor entry of the header (dtype, shape, offsets agree); its end offset."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise ValueError(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 1 << 48 for d in shape):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] < 1 << 62):
        raise ValueError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if numel * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
        raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} does not fit data_offsets {offsets}")
    return int(offsets[1])


def _check_raw_metadata(raw: Any) -> None:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError("__metadata__ must map strings to strings")


def _parse_header(data: bytes, path: Path, what: str) -> dict[str, Any]:
    """Validate the safetensors layout by hand so every failure gets a message that says what is wrong."""
    if len(data) == 0:
        raise CheckpointError(f"{path} is empty, not a {what} (an interrupted copy?); use another file")
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    # Every safetensors header is a JSON object; test that first, since a valid header length
    # can start with the same bytes as a pickle.
    if not (data[8:9] == b"{" and 2 <= n <= _MAX_HEADER):
        if _looks_like_pickle(data):
            raise CheckpointError(
                f"{path} is a PyTorch pickle (.pth/.pt), not a slim {what}; slim never unpickles files: "
                f"convert it with 'slim import' (network-slimming reference checkpoints) or "
                f"slimcli.checkpoint.import_pth (torch.load(weights_only=True))"
            )
        raise CheckpointError(f"{path} is not a safetensors file; pass a checkpoint written by slim")
    if len(data) < 8 + n:
        raise CheckpointError(
            f"{path} is truncated ({len(data)} bytes, header alone needs {8 + n}); re-create or re-copy it"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                _check_raw_metadata(entry)
                continue
            end = max(end, _entry_end(name, entry))
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, UnicodeDecodeError,
            RecursionError) as exc:
        raise CheckpointError(
            f"{path} is corrupt (unreadable header: {exc}); re-create or re-copy it"
        ) from None
    body = len(data) - 8 - n
    if body < end:
        raise CheckpointError(
            f"{path} is truncated ({body} of {end} data bytes present); re-create or re-copy it"
        )
    if body > end:
        raise CheckpointError(
            f"{path} is corrupt ({body - end} unexpected trailing bytes); re-create or re-copy it"
        )
    return header


def _read_safetensors(
    path: Path, what: str, map_location: str | torch.device
) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    data = _read_bytes(path, what)
    header = _parse_header(data, path, what)
    raw_meta = header.get("__metadata__") or {}
    if not isinstance(raw_meta, dict) or PREFIX + "format" not in raw_meta:
        raise CheckpointError(
            f"{path} is a safetensors file but not a slim {what} (no slim.* metadata); load foreign "
            f"weights into a registered arch and save them with slimcli.checkpoint.save_checkpoint "
            f"(a .pth goes through slimcli.checkpoint.import_pth)"
        )
    try:
        fmt = int(raw_meta[PREFIX + "format"])
    except ValueError:
        raise CheckpointError(
            f"{path} has an unreadable format version {raw_meta[PREFIX + 'format']!r}; re-create it"
        ) from None
    if fmt > FORMAT_VERSION:
        writer = raw_meta.get(PREFIX + "version", "?")
        raise CheckpointError(
            f"{path} uses checkpoint format {fmt}, written by a newer slim ({writer}); "
            f"this slim {__version__} reads format {FORMAT_VERSION}: upgrade slim (pip install -U slim-prune)"
        )
    if fmt < 1:
        raise CheckpointError(f"{path} has an invalid format version {fmt}; re-create it")
    expected = raw_meta.get(PREFIX + "data_sha256")
    if expected is not None and hashlib.sha256(_data_section(data)).hexdigest() != expected:
        raise CheckpointError(
            f"{path} is corrupt (its tensor data does not match the checksum saved with it); "
            f"re-create or re-copy it"
        )
    try:
        tensors = _st_load(data)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); re-create or re-copy it") from None
    if torch.device(map_location).type != "cpu":
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors, _decode_meta(raw_meta), hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a slim checkpoint (tensors on ``map_location``); never unpickles."""
    p = Path(path)
    tensors, meta, sha = _read_safetensors(p, "checkpoint", map_location)
    missing = [k for k in _REQUIRED if k not in meta]
    if missing and p.name.endswith(STATE_SUFFIX):
        model = p.with_name(p.name[: -len(STATE_SUFFIX)] + ".safetensors")
        raise CheckpointError(f"{p} is the training state of a run (what --resume reads), not a model; "
                              f"pass {model}")
    if missing:
        raise CheckpointError(
            f"{p} lacks slim.{', slim.'.join(missing)} metadata, so it cannot be rebuilt; re-create it"
        )
    try:
        validate_meta(meta)
    except CheckpointError as exc:
        fix = "re-create the file or fix the field"
        raise CheckpointError(f"{p} has invalid metadata: {exc}; {fix}") from None
    return Checkpoint(p, tensors, meta, sha)


def check_finite(ckpt: Checkpoint, what: str = "use") -> None:
    """Refuse a checkpoint whose weights hold NaN or infinity (a diverged run) with one clear error."""
    for name, t in ckpt.tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{ckpt.path} holds non-finite weights ({name} has NaN or infinity: a diverged run?), "
                f"which slim cannot {what}; take an earlier checkpoint of the run, or train again with a "
                f"lower --lr"
            )


def load_state(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, model_sha256: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The training state stored beside checkpoint ``path``, checked to belong to that exact file.

    ``model_sha256`` is the model file's hash when the caller has already read it (a
    :class:`Checkpoint`'s ``sha256``), which spares reading the model file again.
    Returns ``(tensors, meta)``; ``meta`` has the ``slim.`` prefix removed and includes
    ``model_sha256``.
    """
    p = Path(path)
    model_path = p
    if p.name.endswith(STATE_SUFFIX):
        model_path = p.with_name(p.name[: -len(STATE_SUFFIX)] + ".safetensors")
    sp = state_path(p)
    actual = model_sha256 or (file_sha256(model_path) if model_path.is_file() else None)
    try:
        tensors, meta, _ = _read_safetensors(sp, "training state", map_location)
        if actual is not None and meta.get("model_sha256") != actual:
            raise CheckpointError(
                f"{sp} belongs to a different checkpoint than {model_path} (an interrupted save?); "
                f"resume from another checkpoint or start the run again"
            )
    except CheckpointError as exc:
        prev = previous_state_path(model_path)
        if actual is None or not prev.is_file():
            raise
        try:
            tensors, meta, _ = _read_safetensors(prev, "training state", map_location)
        except CheckpointError:
            raise exc from None
        if meta.get("model_sha256") != actual:
            raise exc from None
        warnings.warn(f"slim: {sp.name} does not fit {model_path.name} (a save was interrupted); "
                      f"using the previous state {prev.name}, which does", stacklevel=2)
    return tensors, meta


# --------------------------------------------------------------------------------------
# importing foreign weights
# --------------------------------------------------------------------------------------
def _refusal(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` objected to, in a few words (not its whole essay)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a pickled {found[1]} object, which weights_only loading refuses"
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    if found:
        return found[1].strip().rstrip(".")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first.rstrip(".")


def read_pth(path: str | os.PathLike[str]) -> Any:
    """The object a ``torch.save`` file holds, read with ``torch.load(weights_only=True)`` only.

    Both the zip layout (PyTorch ≥ 1.6) and the legacy one are read; tensors land on the CPU.
    Only tensors, containers and plain Python values come back: a file holding pickled
    objects (a whole ``nn.Module``, numpy scalars, custom classes) is a :class:`CheckpointError`
    naming what it holds.
    """
    p = Path(path)
    _check_path(p, ".pth file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty, not a .pth file (an interrupted copy?); use another file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, zip errors, EOF: all mean "not a plain weights file"
        raise CheckpointError(
            f"cannot import {p} as plain weights ({_refusal(exc)}); slim reads .pth files with "
            f"torch.load(weights_only=True) only: re-save the weights with "
            f"torch.save({{'state_dict': model.state_dict()}}, ...)"
        ) from None


def import_pth(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of a foreign ``.pth`` state dict, read with ``torch.load(weights_only=True)`` only.

    Accepts a bare state dict or one nested under ``state_dict`` / ``model``; strips the
    ``module.`` prefix that DataParallel adds. Files holding pickled objects are refused.
    Checkpoints of the network-slimming reference code (other key names, channel-selection
    ``indexes``) go through ``slim import`` (:func:`slimcli.flows.importref.import_reference`).
    """
    p = Path(path)
    obj = read_pth(p)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{p} does not hold a state dict of tensors; re-save it with torch.save(model.state_dict(), ...)"
        )
    if all(str(k).startswith("module.") for k in obj):
        obj = {str(k)[len("module.") :]: v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}


__all__ = [
    "FORMAT_VERSION",
    "STAGES",
    "Checkpoint",
    "check_finite",
    "file_sha256",
    "import_pth",
    "lineage_entry",
    "load_checkpoint",
    "load_state",
    "previous_state_path",
    "read_pth",
    "save_checkpoint",
    "state_path",
    "validate_meta",
]
