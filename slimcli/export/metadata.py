"""Checkpoint → ONNX: the ``metadata_props`` a checkpoint gives its ONNX model, real test
images to compare on, and :func:`export_checkpoint`, the whole ``slim export`` /
``slim prune --export`` path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimcli._version import __version__
from slimcli.checkpoint import STAGES, Checkpoint
from slimcli.data import create_dataset, no_downloads
from slimcli.errors import DataError, ExportError, SlimError, UsageError
from slimcli.export.onnx import ExportReport, export_onnx
from slimcli.model import Normalizer, build_model, normalization_of

#: How many test images ``slim export`` / ``prune --export`` compare on.
REAL_SAMPLES = 16
_META_PREFIX = "slim."


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
) -> ExportReport:
    """Export a checkpoint's model (or ``model``, described by ``ckpt``) with its metadata.

    The path of ``slim export`` and ``slim prune --export``: rebuilds the model unless given,
    compares on :data:`REAL_SAMPLES` test images when ``real_data`` and the dataset is
    available locally (why not is in ``report.notes``), and on random inputs always.
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
    "REAL_SAMPLES", "checkpoint_metadata_for_onnx", "export_checkpoint", "latest_accuracy", "sample_inputs",
]
