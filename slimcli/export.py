"""Verified ONNX export: one self-contained file, dynamic batch, checked against PyTorch.

:func:`export_onnx` writes a model as a single ``.onnx`` file (every initializer embedded,
no external-data files) whose batch axis is dynamic, runs ``onnx.checker`` on it, runs it in
onnxruntime (CPU) on random inputs at batch 1 and 3 and on real images when given, and only
then renames it into place. Parity is measured as::

    rel_diff = max |ort − torch| / max(1, max |torch|)

over every output element of every check (the ``max(1, …)`` keeps tiny logits from turning
float rounding into a large ratio). ``rel_diff > tolerance`` is an :class:`ExportError` and
nothing is left at the destination. :func:`checkpoint_metadata_for_onnx` builds the
``metadata_props`` (``slim.*`` keys, JSON where structured) from a checkpoint, and
:func:`export_checkpoint` is the whole ``slim export`` / ``slim prune --export`` path.

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
import dataclasses
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from slimcli._fs import atomic_target, temp_path
from slimcli.checkpoint import unwrap_model
from slimcli.errors import DataError, ExportError, SlimError, UsageError

if TYPE_CHECKING:
    from slimcli.checkpoint import Checkpoint

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
EXPORTERS = ("auto", "torchscript", "dynamo")
#: Batch sizes of the random-input checks: 1 (the latency case) and another one, which only
#: works if the batch axis really is dynamic (the model is traced at batch 2).
RANDOM_BATCHES = (1, 3)
#: How many test images ``slim export`` / ``prune --export`` compare on.
REAL_SAMPLES = 16
_PIP_HINT = 'pip install "slim-prune[onnx]"'
_META_PREFIX = "slim."


@dataclass(frozen=True)
class ParityCheck:
    """One onnxruntime-vs-PyTorch comparison."""

    inputs: str  # "random" or "real"
    batch: int
    max_abs_diff: float
    rel_diff: float  # max|ort − torch| / max(1, max|torch|)


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


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a SlimError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the onnx extras ({exc.name or exc} is missing): {_PIP_HINT}"
        ) from None
    return onnx, onnxruntime


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _graph_opset(proto: Any) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ExportError("the exported model declares no ai.onnx opset; this is an exporter bug")


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


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------
def _dims(value_info: Any) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return tuple(dims)


def _session(ort: Any, model_bytes: bytes, threads: int | None = None) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: warnings would go to stderr unasked
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def _compare(session: Any, model: nn.Module, x: Tensor, inputs: str) -> ParityCheck:
    with torch.inference_mode():
        ref = model(x).float()
    got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    if got.shape != ref.shape:
        raise ExportError(
            f"onnxruntime returned shape {tuple(got.shape)} for {inputs} inputs of batch {x.shape[0]}, "
            f"PyTorch {tuple(ref.shape)}; the batch axis did not export as dynamic"
        )
    if not bool(torch.isfinite(ref).all()):
        raise ExportError(
            f"the PyTorch model outputs NaN/inf on {inputs} inputs; fix the checkpoint before exporting"
        )
    diff = (got - ref).abs().max().item() if ref.numel() else 0.0
    if diff != diff:  # NaN from onnxruntime
        diff = float("inf")
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    return ParityCheck(inputs=inputs, batch=int(x.shape[0]), max_abs_diff=diff, rel_diff=diff / scale)


def _latency_ms(ort: Any, model_bytes: bytes, x: Tensor, runs: int, warmup: int) -> float | None:
    if runs <= 0:
        return None
    session = _session(ort, model_bytes)
    feed = {INPUT_NAME: x.numpy()}
    for _ in range(max(0, warmup)):
        session.run([OUTPUT_NAME], feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run([OUTPUT_NAME], feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@dataclass
class _Candidate:
    exporter: str
    proto: Any
    data: bytes
    checks: list[ParityCheck]
    input_shape: tuple[int | str, ...]
    output_shape: tuple[int | str, ...]


def _build(
    exporter: str,
    model: nn.Module,
    example: Tensor,
    opset: int | None,
    metadata: Mapping[str, str],
    doc: str,
) -> tuple[Any, bytes]:
    """Export with one exporter and return ``(ModelProto, serialised single-file bytes)``."""
    onnx, _ = _require_onnx()
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
                    f"{exporter} exporter failed: {_first_line(exc)}" + (f" [{tail}]" if tail else "")
                ) from exc
        proto = onnx.load(str(f), load_external_data=True)
    for init in proto.graph.initializer:
        # load_external_data moved the bytes inline; make sure no pointer to a file remains
        if init.data_location == onnx.TensorProto.EXTERNAL or len(init.external_data):
            raise ExportError(f"initializer {init.name} still refers to external data; cannot embed it")
    got = _graph_opset(proto)
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
            f"the model does not fit in one ONNX file ({_first_line(exc)}); ONNX files are limited to 2 GiB"
        ) from None
    return proto, data


def _verify(
    exporter: str,
    proto: Any,
    data: bytes,
    model: nn.Module,
    input_shape: tuple[int, int, int],
    real_inputs: Tensor | None,
    seed: int,
) -> _Candidate:
    onnx, ort = _require_onnx()
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, or shape-inference errors from full_check
        raise ExportError(f"onnx.checker rejected the {exporter} export: {_first_line(exc)}") from None
    try:
        session = _session(ort, data, threads=1)  # parity needs no parallelism; latency uses the default
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the {exporter} export: {_first_line(exc)}") from None
    if [i.name for i in session.get_inputs()] != [INPUT_NAME]:
        raise ExportError(
            f"the {exporter} export has inputs {[i.name for i in session.get_inputs()]}, "
            f"expected one named {INPUT_NAME!r}"
        )
    in_shape = _dims(proto.graph.input[0])
    out_shape = _dims(proto.graph.output[0])
    if isinstance(in_shape[0], int) or (out_shape and isinstance(out_shape[0], int)):
        raise ExportError(
            f"the {exporter} export has a fixed batch size ({in_shape} → {out_shape}), not a dynamic one"
        )
    gen = torch.Generator().manual_seed(seed)
    checks = [
        _compare(session, model, torch.randn(b, *input_shape, generator=gen), "random")
        for b in RANDOM_BATCHES
    ]
    if real_inputs is not None and len(real_inputs):
        checks.append(_compare(session, model, real_inputs, "real"))
    return _Candidate(exporter, proto, data, checks, in_shape, out_shape)


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
) -> ExportReport:
    """Export ``model`` to one verified ONNX file at ``path`` and report on it.

    ``input_shape`` is one sample's (C, H, W); the batch axis is dynamic. ``metadata`` goes
    into ``metadata_props`` as given. ``opset=None`` takes the exporter's default.
    ``real_inputs`` (already normalised, N×C×H×W float) are compared too. The model is
    copied to the CPU in float32 eval mode; the caller's module is left untouched.
    Raises :class:`ExportError` (nothing written at ``path``) when the folder is missing
    or unwritable, the export fails, or ``rel_diff > tolerance``.
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
    onnx, ort = _require_onnx()
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
                raise ExportError(f"cannot copy the model for export: {_first_line(exc)}") from None
            net = net.to(device="cpu", dtype=torch.float32).eval()
            params = sum(p.numel() for p in net.parameters())
            if real_inputs is not None:
                real_inputs = real_inputs.detach().to(device="cpu", dtype=torch.float32)
            # traced at batch 2: torch.export specialises sizes 0 and 1, so 1 would pin the batch
            example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
            doc = f"exported by slim from {metadata.get(_META_PREFIX + 'arch', type(net).__name__)}"

            order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
            if exporter == "auto" and opset is not None and opset > _torchscript_max_opset():
                order = ["dynamo"]
            problems: list[str] = []
            chosen: _Candidate | None = None
            for name in order:
                try:
                    proto, data = _build(name, net, example, opset, metadata, doc)
                    cand = _verify(name, proto, data, net, shape, real_inputs, seed)
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

            with open(tmp, "wb") as fh:
                fh.write(chosen.data)
                fh.flush()
                os.fsync(fh.fileno())
            latency = _latency_ms(
                ort,
                chosen.data,
                torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed)),
                latency_runs,
                warmup_runs,
            )
    except OSError as exc:
        raise ExportError(f"could not write {path}: {exc.strerror or exc}; nothing written") from None
    return ExportReport(
        path=path,
        size_bytes=path.stat().st_size,
        opset=_graph_opset(chosen.proto),
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
    )


# --------------------------------------------------------------------------------------
# checkpoints → ONNX
# --------------------------------------------------------------------------------------
def _meta_of(source: Checkpoint | Mapping[str, Any]) -> dict[str, Any]:
    meta = getattr(source, "meta", source)
    if not isinstance(meta, Mapping):
        raise UsageError(f"expected a Checkpoint or its metadata dict, got {type(source).__name__}")
    # accept both the decoded form (no prefix) and raw slim.* keys
    return {(k[len(_META_PREFIX) :] if k.startswith(_META_PREFIX) else k): v for k, v in meta.items()}


def latest_accuracy(meta: Mapping[str, Any]) -> float | None:
    """The most recent test accuracy in ``meta["metrics"]`` (a fraction), or None.

    Metrics are kept per stage (``{"sparsify": {"test_acc": …}, "pruned": …}``); the current
    stage's entry wins, else the latest stage that has one.
    """
    metrics = meta.get("metrics")
    if not isinstance(metrics, Mapping):
        return None
    from slimcli.checkpoint import STAGES

    stage = meta.get("stage")
    order = [stage] if stage in metrics else []
    order += [s for s in reversed(STAGES) if s in metrics and s != stage]
    order += [s for s in reversed(list(metrics)) if s not in order]
    for key in order:
        entry = metrics.get(key)
        if isinstance(entry, Mapping):
            for name in ("test_acc", "test_accuracy", "accuracy", "acc"):
                value = entry.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return float(value)
    return None


def checkpoint_metadata_for_onnx(
    ckpt: Checkpoint | Mapping[str, Any], *, sha256: str | None = None
) -> dict[str, str]:
    """The ONNX ``metadata_props`` for a checkpoint: ``slim.*`` keys, JSON where structured.

    Keys: ``arch``, ``widths`` (``{}`` for a dense model), ``num_classes``, ``classes``,
    ``normalization`` (``{"mean", "std"}`` in [0, 1] pixel units), ``input_shape``,
    ``preprocessing``, ``dataset``, ``stage``, ``accuracy`` (latest test accuracy, a
    fraction), ``metrics``, ``prune``, ``source_sha256`` (the checkpoint file) and
    ``version`` (of slim). ``ckpt`` may also be a metadata dict (with ``sha256`` given),
    as ``prune --export`` has before it writes its checkpoint. Absent values are left out.
    """
    from slimcli import __version__

    meta = _meta_of(ckpt)
    sha = sha256 if sha256 is not None else getattr(ckpt, "sha256", None)
    props: dict[str, Any] = {
        "arch": meta.get("arch"),
        "widths": meta.get("widths") or {},
        "num_classes": meta.get("num_classes"),
        "classes": meta.get("classes"),
        "normalization": meta.get("normalization"),
        "input_shape": meta.get("input_shape"),
        "preprocessing": (
            "float32 NCHW, x = (pixel / 255 - mean) / std per channel (slim.normalization); "
            "output: logits over slim.classes"
        ),
        "dataset": meta.get("dataset"),
        "stage": meta.get("stage"),
        "accuracy": latest_accuracy(meta),
        "metrics": meta.get("metrics"),
        "prune": meta.get("prune"),
        "source_sha256": sha,
        "version": __version__,
    }
    out: dict[str, str] = {}
    for key, value in props.items():
        if value is None:
            continue
        if isinstance(value, str):
            out[_META_PREFIX + key] = value
        else:
            out[_META_PREFIX + key] = json.dumps(value, ensure_ascii=False, sort_keys=False)
    return out


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Forbid dataset downloads: exporting never fetches a dataset just to compare on it."""
    from slimcli.data._paths import OFFLINE_ENV

    old = os.environ.get(OFFLINE_ENV)
    os.environ[OFFLINE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(OFFLINE_ENV, None)
        else:
            os.environ[OFFLINE_ENV] = old


def sample_inputs(
    ckpt: Checkpoint | Mapping[str, Any], root: str | os.PathLike[str] | None = None, n: int = REAL_SAMPLES
) -> Tensor:
    """``n`` test images of the checkpoint's dataset, normalised as in training (float32 N×C×H×W).

    Images are spread evenly over the test split. The dataset is never downloaded here;
    a missing dataset is a :class:`DataError`.
    """
    from slimcli.data import create_dataset
    from slimcli.evaluate import normalization_of
    from slimcli.train.augment import Normalizer

    meta = _meta_of(ckpt)
    spec = meta.get("dataset")
    if not spec:
        raise DataError("the checkpoint records no dataset")
    dataset = create_dataset(str(spec))
    with _offline():
        images, _ = dataset.load("test", Path(root) if root is not None else None)
    if len(images) == 0:
        raise DataError(f"dataset {spec} has an empty test split")
    expected = tuple(int(s) for s in meta.get("input_shape") or dataset.input_shape)
    if tuple(images.shape[1:]) != expected:
        raise DataError(
            f"dataset {spec} has images of shape {tuple(images.shape[1:])}, the model wants {expected}"
        )
    idx = torch.linspace(0, len(images) - 1, steps=min(n, len(images))).round().long()
    mean, std = normalization_of(meta) or (dataset.mean, dataset.std)
    return Normalizer(mean, std, torch.device("cpu"))(images[idx])  # the training arithmetic itself


def export_checkpoint(
    ckpt: Checkpoint | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    sha256: str | None = None,
    opset: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    real_data: bool = True,
    tolerance: float = 1e-4,
    exporter: str = "auto",
    latency_runs: int = 50,
) -> ExportReport:
    """Export a checkpoint's model (or ``model``, described by ``ckpt``) with its metadata.

    The path of ``slim export`` and ``slim prune --export``: rebuilds the model unless given,
    compares on :data:`REAL_SAMPLES` test images when ``real_data`` and the dataset is
    available locally (why not is in ``report.notes``), and on random inputs always.
    """
    meta = _meta_of(ckpt)
    if model is None:
        from slimcli.checkpoint import Checkpoint, build_model

        if not isinstance(ckpt, Checkpoint):
            raise UsageError("export_checkpoint needs a loaded Checkpoint when no model is given")
        model = build_model(ckpt)
    shape = meta.get("input_shape")
    if not shape or len(shape) != 3:
        raise ExportError(f"the checkpoint's input_shape {shape!r} is not (channels, height, width)")
    notes: list[str] = []
    real: Tensor | None = None
    if real_data:
        try:
            real = sample_inputs(meta, data_dir)
        except SlimError as exc:
            notes.append(f"real-data check skipped: {exc}")
    else:
        notes.append("real-data check skipped (--no-real-data)")
    report = export_onnx(
        model,
        path,
        input_shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
        metadata=checkpoint_metadata_for_onnx(meta, sha256=sha256 or getattr(ckpt, "sha256", None)),
        opset=opset,
        real_inputs=real,
        tolerance=tolerance,
        exporter=exporter,
        latency_runs=latency_runs,
    )
    return dataclasses.replace(report, notes=tuple(notes))


__all__ = [
    "EXPORTERS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportReport",
    "ParityCheck",
    "checkpoint_metadata_for_onnx",
    "export_checkpoint",
    "export_onnx",
    "latest_accuracy",
    "sample_inputs",
]
