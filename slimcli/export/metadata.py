"""Checkpoint → ONNX: the ``metadata_props`` a checkpoint gives its ONNX model, real test
images to compare on, and :func:`export_checkpoint`, the whole ``slim export`` /
``slim prune --export`` path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimcli._fs import atomic_write_bytes
from slimcli._version import __version__
from slimcli.checkpoint import STAGES, Checkpoint
from slimcli.data import create_dataset, no_downloads
from slimcli.errors import CheckpointError, DataError, ExportError, PruneError, SlimError, UsageError
from slimcli.export.choose import fastest
from slimcli.export.forms import SURGERY_SELECTIONS, realise, target_form
from slimcli.export.int8 import QUANTIZATION, Int8Report, compare_int8, int8_path, quantize_int8, set_metadata
from slimcli.export.onnx import ExportReport, export_onnx
from slimcli.export.runtimes import runtime_version
from slimcli.export.verify import require_onnx
from slimcli.measure import measure
from slimcli.model import Normalizer, build_model, calibration_images, dense_model, normalization_of
from slimcli.prune.reform import form_summary, reform_all

#: How many test images ``slim export`` / ``prune --export`` compare on.
REAL_SAMPLES = 16
#: Training images ``--int8`` calibrates on by default.
DEFAULT_CALIBRATION = 256
_META_PREFIX = "slim."


def _meta_of(source: Checkpoint | Mapping[str, Any]) -> dict[str, Any]:
    meta = getattr(source, "meta", source)
    if not isinstance(meta, Mapping):
        raise UsageError(f"expected a Checkpoint or its metadata dict, got {type(source).__name__}")
    # accept both the decoded form (no prefix) and raw slim.* keys
    return {(k[len(_META_PREFIX) :] if k.startswith(_META_PREFIX) else k): v for k, v in meta.items()}


def _entry_accuracy(entry: Any) -> float | None:
    """The test accuracy of one stage's metrics entry, under any of the names slim has used."""
    if isinstance(entry, Mapping):
        for name in ("test_acc", "test_accuracy", "accuracy", "acc"):
            value = entry.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def latest_accuracy(meta: Mapping[str, Any]) -> float | None:
    """The most recent test accuracy in ``meta["metrics"]`` (a fraction), or None.

    Metrics are kept per stage (``{"sparsify": {"test_acc": …}, "pruned": …}``); the current
    stage's entry wins, else the latest stage that has one.
    """
    own, other = measured_accuracy(meta)
    return own if own is not None else (other[1] if other is not None else None)


def measured_accuracy(meta: Mapping[str, Any]) -> tuple[float | None, tuple[str, float] | None]:
    """``(accuracy of this model, (stage, accuracy) of the latest *other* stage)``.

    The first is the test accuracy recorded for the checkpoint's own stage (None when this
    model was never evaluated, e.g. pruned without ``--eval``); the second is the most recent
    other stage's, e.g. the dense parent's — a different model's number, never to be passed off
    as this one's.
    """
    metrics = meta.get("metrics")
    if not isinstance(metrics, Mapping):
        return None, None
    stage = meta.get("stage")
    own = _entry_accuracy(metrics.get(stage)) if stage is not None else None
    order = [s for s in reversed(STAGES) if s in metrics and s != stage]
    order += [s for s in reversed(list(metrics)) if s not in order and s != stage]
    for key in order:
        value = _entry_accuracy(metrics.get(key))
        if value is not None:
            return own, (str(key), value)
    return own, None


def checkpoint_metadata_for_onnx(
    ckpt: Checkpoint | Mapping[str, Any], *, sha256: str | None = None
) -> dict[str, str]:
    """The ONNX ``metadata_props`` for a checkpoint: ``slim.*`` keys, JSON where structured.

    Keys: ``arch``, ``widths`` (``{}`` for a dense model), ``num_classes``, ``classes``,
    ``normalization`` (``{"mean", "std"}`` in [0, 1] pixel units), ``input_shape``,
    ``preprocessing``, ``dataset``, ``stage``, ``accuracy`` (test accuracy of *this* model, a
    fraction; absent when it was not measured), ``accuracy_parent`` (JSON ``{"stage",
    "accuracy"}``: the latest other stage's, labelled, when this model has none), ``metrics``,
    ``prune``, ``lineage``, ``source_sha256`` (the checkpoint file) and ``version`` (of slim);
    :func:`~slimcli.export.export_onnx` adds ``params``, ``macs`` and ``target``.
    ``ckpt`` may also be a metadata dict (with ``sha256`` given),
    as ``prune --export`` has before it writes its checkpoint. Absent values are left out.
    """
    meta = _meta_of(ckpt)
    sha = sha256 if sha256 is not None else getattr(ckpt, "sha256", None)
    own, other = measured_accuracy(meta)
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
        "accuracy": own,
        "accuracy_parent": (
            {"stage": other[0], "accuracy": other[1],
             "note": "measured on an earlier stage's model, not this one (this model was not evaluated)"}
            if own is None and other is not None else None
        ),
        "metrics": meta.get("metrics"),
        "prune": meta.get("prune"),
        "lineage": meta.get("lineage") or None,
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


def sample_inputs(
    ckpt: Checkpoint | Mapping[str, Any], root: str | os.PathLike[str] | None = None, n: int = REAL_SAMPLES
) -> Tensor:
    """``n`` test images of the checkpoint's dataset, normalised as in training (float32 N×C×H×W).

    Images are spread evenly over the test split. The dataset is never downloaded here;
    a missing dataset is a :class:`DataError`.
    """
    meta = _meta_of(ckpt)
    spec = meta.get("dataset")
    if not spec:
        raise DataError("the checkpoint records no dataset")
    dataset = create_dataset(str(spec))
    with no_downloads():
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
    target: str = "generic",
    runtimes: Sequence[str] | str = (),
    int8: bool = False,
    calibration: int = DEFAULT_CALIBRATION,
    seed: int = 0,
    as_pruned: bool = False,
    selections: str | None = None,
    pad_to: int | None = None,
) -> ExportReport:
    """Export a checkpoint's model (or ``model``, described by ``ckpt``) with its metadata.

    The path of ``slim export`` and ``slim prune --export``: rebuilds the model unless given,
    compares on :data:`REAL_SAMPLES` test images when ``real_data`` and the dataset is
    available locally (why not is in ``report.notes``), and on random inputs always;
    ``target`` and ``runtimes`` go to :func:`export_onnx`. ``int8`` also writes
    ``OUT.int8.onnx`` (:mod:`.int8`), calibrated on ``calibration`` training images drawn with
    ``seed`` and compared with the fp32 model on the whole test split (``report.extension`` is
    its :class:`~slimcli.export.int8.Int8Report`); the dataset must be on disk, else nothing
    is written. A slim model is re-formed for ``target`` first (:func:`reformed`) unless
    ``as_pruned``; ``selections`` and ``pad_to`` override the target's form.
    """
    meta = _meta_of(ckpt)
    if model is None:
        if not isinstance(ckpt, Checkpoint):
            raise UsageError("export_checkpoint needs a loaded Checkpoint when no model is given")
        model = build_model(ckpt)
    shape = meta.get("input_shape")
    if not shape or len(shape) != 3:
        raise ExportError(f"the checkpoint's input_shape {shape!r} is not (channels, height, width)")
    notes: list[str] = []
    form = None
    if not as_pruned:
        model, form, note = reformed(model, meta, target, selections, pad_to)
        if note:
            notes.append(note)
    real: Tensor | None = None
    if real_data:
        try:
            real = sample_inputs(meta, data_dir)
        except SlimError as exc:
            notes.append(f"real-data check skipped: {exc}")
    else:
        notes.append("real-data check skipped (--no-real-data)")
    extension = _int8_step(meta, data_dir, calibration, seed, latency_runs) if int8 else None
    props = checkpoint_metadata_for_onnx(meta, sha256=sha256 or getattr(ckpt, "sha256", None))
    if form is not None:
        props["slim.form"] = json.dumps(form)
    report = export_onnx(
        model,
        path,
        input_shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
        metadata=props,
        opset=opset,
        real_inputs=real,
        tolerance=tolerance,
        exporter=exporter,
        latency_runs=latency_runs,
        target=target,
        runtimes=runtimes,
        extension=extension,
    )
    notes.extend(report.notes)
    if report.identity_selections_removed:
        n = report.identity_selections_removed
        notes.append(f"removed {n} channel selection(s) that kept every channel (no Gather in the file)")
    if int8:
        pending: tuple[bytes, dict[str, Any]] = report.extension
        target_path = int8_path(Path(path))
        try:
            atomic_write_bytes(target_path, pending[0])
        except OSError as exc:
            raise ExportError(
                f"wrote {path} but could not write {target_path}: {exc.strerror or exc}"
            ) from None
        report = dataclasses.replace(report, extension=Int8Report(
            path=target_path, size_bytes=target_path.stat().st_size, fp32_size_bytes=report.size_bytes,
            **pending[1],
        ))
    return dataclasses.replace(report, notes=tuple(notes))


def reformed(
    model: nn.Module, meta: Mapping[str, Any], target: str, selections: str | None = None,
    pad_to: int | None = None,
) -> tuple[nn.Module, dict[str, Any] | None, str | None]:
    """A slim ``model`` in ``target``'s form: (model, ``slim.form`` record, note); a dense model, or
    one that cannot be re-formed, comes back as is.

    The candidates of :data:`~slimcli.export.forms.TARGET_FORMS` that ``selections`` / ``pad_to``
    leave open are timed in the target's runtime (:func:`~slimcli.export.choose.fastest`)."""
    sels, pads, runtime = target_form(target, selections, pad_to)
    if not getattr(model, "slim_keep", None):
        return model, None, None
    shape = tuple(int(s) for s in meta["input_shape"])
    if runtime is not None and runtime_version(runtime) is None:
        runtime = "ort"
    wanted = [(s_, p) for s_ in sels for p in pads]  # in order of preference
    forms: dict[str, tuple[nn.Module, Any]] = {}
    seen = set()
    try:
        dense = dense_model(meta)
        made = reform_all(model, dense, [(SURGERY_SELECTIONS[s_], p) for s_, p in wanted], input_shape=shape)
    except (PruneError, CheckpointError) as exc:
        return model, None, f"exported as pruned (not re-formed for --target {target}): {exc}"
    rewrites: dict[str, dict[str, Any]] = {}
    for (s_, p), (new, report) in zip(wanted, made, strict=True):
        try:
            new, done = realise(new, s_, shape)
        except PruneError:  # a rewrite that changed the numbers: this candidate is never exported
            continue
        # the same surgery and the same rewrites make the same file (pieces with no concatenation to
        # read is the gather file again)
        key = (tuple(sorted(done)), tuple(sorted(report.widths.items())),
               tuple(la.form for la in report.layers))
        if key not in seen:
            seen.add(key)
            forms[f"{s_}/{p}"] = (new, report)
            rewrites[f"{s_}/{p}"] = done
    if not forms:
        return model, None, f"exported as pruned (no form for --target {target} computed the same)"
    # batch 1 and a batch that fills the cores; 32 where an image is small (CIFAR-size and below)
    big = 32 if math.prod(shape) <= 3 * 64 * 64 else 8
    candidates = {k: v[0] for k, v in forms.items()}
    chosen, times = (fastest(candidates, shape, runtime=runtime, batches=(1, big), baseline=dense.eval())
                     if runtime is not None else (next(iter(candidates)), {}))
    new, report = forms[chosen]
    sel, _, p = chosen.partition("/")
    pad = int(p)
    before, after = measure(model, shape), measure(new, shape)
    summary = form_summary(report, rewrites[chosen])
    form = {"selections": sel, "pad_to": pad, "forms": summary["forms"], "layers": summary["layers"],
            "as_pruned": {"params": before.params, "macs": before.macs}}
    if rewrites[chosen].get("bn_as_conv"):
        form["bn_as_depthwise_conv"] = rewrites[chosen]["bn_as_conv"]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary["forms"].items()) if k != "narrow")
    counts = f"selections {sel} ({counts})" if counts else "no channel selections"
    timed = ""
    if times:
        form["timed"] = {"runtime": runtime, "ms": times}
        timed = f"; fastest in {runtime} of " + ", ".join(
            f"{k} ({' / '.join(f'b{b} {ms:.2f} ms' for b, ms in t.items())})"
            for k, t in times.items() if k != "dense")
        dense_ms = times.get("dense")
        if dense_ms:
            ratio = {b: times[chosen][b] / ms for b, ms in dense_ms.items()}
            form["timed"]["vs_dense"] = ratio
            timed += "; " + ", ".join(f"{r:.2f}× the dense time at batch {b}" for b, r in ratio.items())
            if any(r > 1 for r in ratio.values()):
                timed += " (no faster than dense there: prune more, or try --round-to 8)"
    note = (f"re-formed for --target {target} (exact, checked): {counts}, kept counts "
            f"padded to multiples of {pad}{timed}; params {before.params:,} → {after.params:,}, MACs "
            f"{before.macs:,} → {after.macs:,} (--as-pruned exports the checkpoint's own structure)")
    return new, form, note


def _test_split(meta: Mapping[str, Any], data_dir: str | os.PathLike[str] | None) -> tuple[Tensor, Tensor]:
    """The whole test split, normalised as in training (float32), and its labels."""
    dataset = create_dataset(str(meta["dataset"]))
    with no_downloads():
        images, labels = dataset.load("test", Path(data_dir) if data_dir is not None else None)
    mean, std = normalization_of(meta) or (dataset.mean, dataset.std)
    return Normalizer(mean, std, torch.device("cpu"))(images), labels


def _int8_step(
    meta: Mapping[str, Any], data_dir: str | os.PathLike[str] | None, calibration: int, seed: int,
    latency_runs: int,
) -> Callable[[bytes, nn.Module], tuple[bytes, dict[str, Any]]]:
    """Read the calibration and test data now (a missing dataset fails before any export), and
    return the export extension that quantizes and measures the verified fp32 model."""
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise UsageError(f"the number of calibration images must be an integer >= 1, got {calibration!r}")
    spec = meta.get("dataset")
    if not spec:
        raise DataError("--int8 calibrates on the checkpoint's dataset, and the checkpoint records none")
    try:
        images = calibration_images(str(spec), calibration, seed=seed, data_dir=data_dir)
        test_x, test_y = _test_split(meta, data_dir)
    except DataError as exc:
        raise DataError(f"--int8 calibrates on the training images of {spec}: {exc}") from None
    dataset = create_dataset(str(spec))
    mean, std = normalization_of(meta) or (dataset.mean, dataset.std)
    calib = Normalizer(mean, std, torch.device("cpu"))(images)

    def step(fp32: bytes, _model: nn.Module) -> tuple[bytes, dict[str, Any]]:
        onnx, _ = require_onnx()
        q = quantize_int8(fp32, calib)
        res = compare_int8(fp32, q, test=(test_x, test_y), latency_runs=latency_runs, sample=test_x)
        props = {p.key: p.value for p in onnx.load_from_string(fp32).metadata_props}
        quant = {**QUANTIZATION, "calibration_images": len(calib), "calibration_split": "train",
                 "calibration_seed": seed, "test_images": res["test_images"],
                 "fp32_accuracy": res["fp32_accuracy"], "int8_accuracy": res["int8_accuracy"],
                 "top1_agreement": res["agreement"]}
        props["slim.quantization"] = json.dumps(quant)
        props.pop("slim.accuracy", None)  # the fp32 model's number; this file's is measured below
        if res["int8_accuracy"] is not None:
            props["slim.accuracy"] = json.dumps(res["int8_accuracy"])
        return set_metadata(q, props), {**res, "calibration_images": len(calib)}

    return step


__all__ = [
    "DEFAULT_CALIBRATION", "REAL_SAMPLES", "checkpoint_metadata_for_onnx", "export_checkpoint",
    "latest_accuracy", "measured_accuracy", "sample_inputs",
]
