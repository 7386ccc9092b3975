"""Verified ONNX export: one self-contained file, dynamic batch, checked against PyTorch.

:func:`export_onnx` writes a model as a single ``.onnx`` file (every initializer embedded,
no external-data files) whose batch axis is dynamic, runs ``onnx.checker`` on it, runs it in
onnxruntime (CPU) on random inputs at batch 1 and 3 and on real images when given, and only
then renames it into place. Parity (``rel_diff``, see
:mod:`slimcli.export.verify`) above the tolerance is an :class:`ExportError` and
nothing is left at the destination. The checkpoint → ONNX path (metadata, real
images) is :mod:`slimcli.export.metadata`.

Exporter choice (measured with torch 2.13 on a ResNet-164-sized fx GraphModule with
index_select channel selections, 2 CPU cores): the TorchScript exporter (``dynamo=False``)
takes ~1 s and honours every opset it supports (7–20); the torch.export-based one
(``dynamo=True``) takes ~10 s and silently keeps opset 18 when asked for less. Both give the
same onnxruntime outputs (≤ 3e-7) and latency. ``exporter="auto"`` therefore tries
TorchScript first and falls back to dynamo when it fails (or is removed from a future
torch), or when its model does not pass the checks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimcli._fs import atomic_target, temp_path
from slimcli.checkpoint import unwrap_model
from slimcli.errors import ExportError, UsageError
from slimcli.export.forms import TARGET_RUNTIME, check_target, remove_identity_selections
from slimcli.export.runtimes import RuntimeCheck, check_runtimes, parse_runtimes
from slimcli.export.verify import (
    BATCH_AXIS,
    INPUT_NAME,
    OUTPUT_NAME,
    Candidate,
    ParityCheck,
    first_line,
    graph_opset,
    require_onnx,
    verify_export,
)
from slimcli.measure import measure, onnx_latency_ms
from slimcli.prune.select import ChannelSelection

EXPORTERS = ("auto", "torchscript", "dynamo")


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    size_bytes: int
    opset: int
    exporter: str  # "torchscript" or "dynamo": the one whose model was kept
    max_abs_diff: float  # over every check
    rel_diff: float  # over every check, see the module docstring
    tolerance: float
    latency_ms: float | None  # onnxruntime CPU, batch 1, median; None when not measured
    input_name: str
    input_shape: tuple[int | str, ...]  # the batch axis is the string "batch"
    output_name: str
    output_shape: tuple[int | str, ...]
    params: int  # parameters of the PyTorch model (numel, not buffers)
    checks: tuple[ParityCheck, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # e.g. why the real-data check was skipped
    macs: int | None = None  # of one input, as slim.macs
    target: str = "generic"
    runtimes: tuple[RuntimeCheck, ...] = ()  # the other runtimes checked (slimcli.export.runtimes)
    identity_selections_removed: int = 0
    extension: Any = None  # what the ``extension`` callback of export_onnx returned (the int8 report)


def _check_destination(path: Path) -> Path:
    """Validate the output path; return its (existing, writable-looking) folder."""
    if path.suffix.lower() != ".onnx":
        raise UsageError(
            f"the ONNX output must be a .onnx file, got {path}; e.g. {path.with_suffix('.onnx')}"
        )
    folder = path.parent
    if not folder.exists():
        raise ExportError(f"output folder {folder} does not exist; create it or choose another path")
    if not folder.is_dir():
        raise ExportError(f"cannot write {path}: {folder} is not a folder; choose another path")
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give a file name ending in .onnx")
    return folder


def check_onnx_destination(path: str | os.PathLike[str]) -> None:
    """Fail now, before any work, when ``export_onnx`` could not write ``path`` (same checks)."""
    path = Path(path)
    _check_destination(path)
    tmp = temp_path(path)
    _create_temp(tmp)  # proves the folder is writable
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _create_temp(tmp: Path) -> None:
    """Create the (empty) temporary file the export goes to: proves the folder is writable."""
    try:
        # 0o666 lets the umask decide the final file's permissions, like a plain open()
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise ExportError(
            f"cannot write to folder {tmp.parent}: {exc.strerror or exc}; choose a writable folder"
        ) from None


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptors 1 and 2 to a scratch file meanwhile.

    torch 2.13's TorchScript exporter always has its C++ log on (it tests the function
    ``_jit_is_onnx_log_enabled`` instead of calling it) and dumps its whole IR graph to
    stdout when it fails, which would corrupt the command's stdout; a failure is reported
    as one line instead.
    """
    saved: list[tuple[int, int]] = []
    try:
        with tempfile.TemporaryFile() as scratch:
            for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
                try:
                    stream.flush()
                    saved.append((fd, os.dup(fd)))
                    os.dup2(scratch.fileno(), fd)
                except (OSError, ValueError, AttributeError):  # no real fd (embedded interpreters)
                    continue
            yield
    finally:
        for fd, copy_fd in reversed(saved):
            os.dup2(copy_fd, fd)
            os.close(copy_fd)


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence the exporters' progress prints, deprecation warnings, log lines and native dumps.

    What Python code prints is captured so that a failure can quote it.
    """
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(buf),
            contextlib.redirect_stderr(buf),
            _native_output_silenced(),
        ):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --------------------------------------------------------------------------------------
# the two exporters
# --------------------------------------------------------------------------------------
def _export_torchscript(model: nn.Module, example: Tensor, f: Path, opset: int | None) -> None:
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "dynamic_axes": {INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
        "opset_version": opset,
        "do_constant_folding": True,  # folds eval-mode BN into the conv before it
    }
    try:
        torch.onnx.export(model, (example,), str(f), dynamo=False, **kwargs)
    except TypeError as exc:
        if "dynamo" not in str(exc):
            raise
        torch.onnx.export(model, (example,), str(f), **kwargs)  # torch < 2.5: no dynamo switch


def _export_dynamo(model: nn.Module, example: Tensor, f: Path, opset: int | None) -> None:
    batch = torch.export.Dim(BATCH_AXIS)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        optimize=True,
    )
    if program is None:  # pragma: no cover - only torch versions that write f themselves
        raise RuntimeError("the dynamo exporter returned no program")
    program.save(str(f), external_data=False)


def _torchscript_max_opset() -> int:
    consts = getattr(torch.onnx, "_constants", None)
    return int(getattr(consts, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


_EXPORT_FNS = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def _build(
    exporter: str,
    model: nn.Module,
    example: Tensor,
    opset: int | None,
    metadata: Mapping[str, str],
    doc: str,
) -> tuple[Any, bytes]:
    """Export with one exporter and return ``(ModelProto, serialised single-file bytes)``."""
    onnx, _ = require_onnx()
    # The exporter writes into a private folder, so any side files it makes (external data)
    # never appear next to the destination; the model is then re-serialised as one file.
    with tempfile.TemporaryDirectory(prefix="slim-onnx-") as work:
        f = Path(work) / "model.onnx"
        with _quiet() as log:
            try:
                with torch.no_grad():
                    _EXPORT_FNS[exporter](model, example, f, opset)
            except Exception as exc:
                tail = " | ".join(line for line in log.getvalue().strip().splitlines()[-3:] if line)
                raise ExportError(
                    f"{exporter} exporter failed: {first_line(exc)}" + (f" [{tail}]" if tail else "")
                ) from exc
        proto = onnx.load(str(f), load_external_data=True)
    for init in proto.graph.initializer:
        # load_external_data moved the bytes inline; make sure no pointer to a file remains
        if init.data_location == onnx.TensorProto.EXTERNAL or len(init.external_data):
            raise ExportError(f"initializer {init.name} still refers to external data; cannot embed it")
    got = graph_opset(proto)
    if opset is not None and got != opset:
        raise ExportError(f"{exporter} exporter wrote opset {got} instead of the requested {opset}")
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = doc
    try:
        data = proto.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GiB
        raise ExportError(
            f"the model does not fit in one ONNX file ({first_line(exc)}); ONNX files are limited to 2 GiB"
        ) from None
    return proto, data


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, int, int],
    metadata: Mapping[str, str],
    opset: int | None = None,
    real_inputs: Tensor | None = None,
    tolerance: float = 1e-4,
    exporter: str = "auto",
    latency_runs: int = 50,
    warmup_runs: int = 5,
    seed: int = 0,
    target: str = "generic",
    runtimes: Sequence[str] | str = (),
    runtime_latency_runs: int = 20,
    extension: Callable[[bytes, nn.Module], Any] | None = None,
) -> ExportReport:
    """Export ``model`` to one verified ONNX file at ``path`` and report on it.

    ``input_shape`` is one sample's (C, H, W); the batch axis is dynamic. ``metadata`` goes
    into ``metadata_props`` as given. ``opset=None`` takes the exporter's default.
    ``real_inputs`` (already normalised, N×C×H×W float) are compared too. The model is
    copied to the CPU in float32 eval mode; the caller's module is left untouched.
    Raises :class:`ExportError` (nothing written at ``path``) when the folder is missing
    or unwritable, the export fails, or ``rel_diff > tolerance``.

    Channel selections that keep every channel are removed first (:mod:`.forms`). ``slim.params``,
    ``slim.macs`` (of the exported model) and ``slim.target`` are added to ``metadata``.
    ``runtimes`` (and the runtime ``target`` implies) are checked too (:mod:`.runtimes`); one that
    computes the model wrongly is an ExportError. ``extension(onnx_bytes, model)`` runs last,
    before anything is written (its failure leaves nothing); its result is ``report.extension``.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    if not tolerance > 0:
        raise UsageError(f"tolerance must be positive, got {tolerance}")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise UsageError(f"ONNX metadata values must be strings (JSON for structured ones): {bad[:3]}")
    if real_inputs is not None and (real_inputs.dim() != 4 or tuple(real_inputs.shape[1:]) != shape):
        raise UsageError(f"real_inputs must be N×{'×'.join(map(str, shape))}, got {tuple(real_inputs.shape)}")
    check_target(target)
    checked = list(parse_runtimes(runtimes))
    implied = TARGET_RUNTIME[target]
    if implied is not None and implied not in checked and implied != "ort":  # ort: always verified
        checked.append(implied)
    onnx, _ = require_onnx()
    if opset is not None and not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise UsageError(f"opset {opset} is not supported; use 7…{onnx.defs.onnx_opset_version()}")

    path = Path(path)
    _check_destination(path)
    try:
        with atomic_target(path) as tmp:
            _create_temp(tmp)
            net = unwrap_model(model)
            try:
                net = copy.deepcopy(net)
            except Exception as exc:
                raise ExportError(f"cannot copy the model for export: {first_line(exc)}") from None
            net = net.to(device="cpu", dtype=torch.float32).eval()
            try:
                net, removed = remove_identity_selections(net, shape)
            except Exception as exc:
                raise ExportError(f"cannot prepare the model for export: {first_line(exc)}") from None
            gathers = sum(isinstance(m, ChannelSelection) for m in net.modules())
            cost = measure(net, shape)
            params = cost.params
            metadata = {**metadata, "slim.params": str(cost.params), "slim.macs": str(cost.macs),
                        "slim.target": target}
            if real_inputs is not None:
                real_inputs = real_inputs.detach().to(device="cpu", dtype=torch.float32)
            # traced at batch 2: torch.export specialises sizes 0 and 1, so 1 would pin the batch
            example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
            doc = f"exported by slim from {metadata.get('slim.arch', type(net).__name__)}"

            order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
            if exporter == "auto" and opset is not None and opset > _torchscript_max_opset():
                order = ["dynamo"]
            problems: list[str] = []
            chosen: Candidate | None = None
            for name in order:
                try:
                    proto, data = _build(name, net, example, opset, metadata, doc)
                    cand = verify_export(name, proto, data, net, shape, real_inputs, seed)
                except ExportError as exc:
                    problems.append(str(exc))
                    continue
                worst = max(c.rel_diff for c in cand.checks)
                if worst <= tolerance:
                    chosen = cand
                    break
                detail = ", ".join(
                    f"{c.inputs} inputs batch {c.batch}: {c.max_abs_diff:.3g} (rel {c.rel_diff:.3g})"
                    for c in cand.checks
                )
                problems.append(
                    f"{name} export differs from PyTorch by more than {tolerance:g} relative ({detail})"
                )
            if chosen is None:
                raise ExportError(f"ONNX export to {path} failed, nothing written: " + "; ".join(problems))
            others = check_runtimes(
                chosen.data, net, shape, checked,
                real_inputs=real_inputs, tolerance=tolerance, latency_runs=runtime_latency_runs, seed=seed,
            ) if checked else ()
            extra = extension(chosen.data, net) if extension is not None else None

            with open(tmp, "wb") as fh:
                fh.write(chosen.data)
                fh.flush()
                os.fsync(fh.fileno())
            latency = onnx_latency_ms(
                chosen.data,
                torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed)),
                latency_runs,
                warmup_runs,
                input_name=INPUT_NAME,
                output_name=OUTPUT_NAME,
            )
    except OSError as exc:
        raise ExportError(f"could not write {path}: {exc.strerror or exc}; nothing written") from None
    return ExportReport(
        path=path,
        size_bytes=path.stat().st_size,
        opset=graph_opset(chosen.proto),
        exporter=chosen.exporter,
        max_abs_diff=max(c.max_abs_diff for c in chosen.checks),
        rel_diff=max(c.rel_diff for c in chosen.checks),
        tolerance=tolerance,
        latency_ms=latency,
        input_name=INPUT_NAME,
        input_shape=chosen.input_shape,
        output_name=OUTPUT_NAME,
        output_shape=chosen.output_shape,
        params=params,
        checks=tuple(chosen.checks),
        metadata=dict(metadata),
        macs=cost.macs,
        target=target,
        runtimes=tuple(others),
        identity_selections_removed=removed,
        extension=extra,
        notes=(f"{gathers} channel selection(s) export as Gather nodes, which are slow on CPU runtimes "
               f"(and mistranslated by ncnn's converter); export with --selections zero (or "
               f"without --as-pruned) for a file without them (docs/export.md)",)
        if gathers and target != "generic" else (),
    )


__all__ = ["EXPORTERS", "ExportReport", "check_onnx_destination", "export_onnx"]
