"""int8 ONNX models for edge devices: static post-training quantization with onnxruntime.

:func:`quantize_int8` quantizes a verified fp32 ONNX model with
``onnxruntime.quantization.quantize_static``: QDQ format (QuantizeLinear/DequantizeLinear pairs,
which onnxruntime, OpenVINO and TensorRT fuse into int8 kernels), int8 weights **per output
channel**, int8 activations, MinMax calibration on the images given (``slim export --int8`` passes
``--calibration N`` training images of the checkpoint's dataset, normalised as in training). The
batch axis stays dynamic. :func:`compare_int8` measures what the quantization cost: file size,
batch-1 onnxruntime latency of both models timed interleaved, test accuracy of both (and the drop)
and the top-1 agreement between them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from slimcli.errors import ExportError
from slimcli.export.verify import INPUT_NAME, OUTPUT_NAME, first_line, require_onnx, session_for, value_dims
from slimcli.measure import interleaved_medians

#: Images per calibration batch (MinMax takes the extremes over all of them; the batch only sets memory).
CALIBRATION_BATCH = 32
QUANTIZATION = {
    "method": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8, per channel",
    "activations": "int8, per tensor", "calibration": "MinMax",
}


@dataclass(frozen=True)
class Int8Report:
    """The int8 model next to its fp32 parent."""

    path: Path
    size_bytes: int
    fp32_size_bytes: int
    calibration_images: int
    fp32_latency_ms: float | None  # onnxruntime CPU, batch 1, median, interleaved with int8
    int8_latency_ms: float | None
    test_images: int  # 0: accuracy not measured
    fp32_accuracy: float | None
    int8_accuracy: float | None
    agreement: float | None  # fraction of test images where int8 and fp32 give the same top-1

    @property
    def accuracy_drop(self) -> float | None:
        if self.fp32_accuracy is None or self.int8_accuracy is None:
            return None
        return self.fp32_accuracy - self.int8_accuracy


def int8_path(fp32_path: Path) -> Path:
    """``model.onnx`` → ``model.int8.onnx`` (next to it)."""
    return fp32_path.with_name(fp32_path.stem + ".int8.onnx")


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a float N×C×H×W tensor."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {INPUT_NAME: np.ascontiguousarray(images[i : i + CALIBRATION_BATCH])}
            for i in range(0, len(images), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def set_metadata(data: bytes, metadata: Mapping[str, str]) -> bytes:
    """The ONNX model ``data`` with its ``metadata_props`` replaced by ``metadata``."""
    onnx, _ = require_onnx()
    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def quantize_int8(fp32: bytes, calibration: Tensor) -> bytes:
    """int8 QDQ model (bytes) of the fp32 ONNX model ``fp32``, calibrated on ``calibration``
    (already normalised float32 N×C×H×W); the batch axis stays dynamic."""
    onnx, _ = require_onnx()
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError as exc:  # pragma: no cover - onnxruntime always ships it
        raise ExportError(f"onnxruntime.quantization is not available: {exc}") from None
    if calibration.dim() != 4 or len(calibration) == 0:
        raise ExportError(f"int8 calibration needs N×C×H×W images, got shape {tuple(calibration.shape)}")
    images = calibration.detach().to("cpu").float().numpy()
    reader = type("SlimCalibration", (_Reader, CalibrationDataReader), {})(images)
    with tempfile.TemporaryDirectory(prefix="slim-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_static logs advice and per-weight warnings on the root logger
        try:
            quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibration_providers=["CPUExecutionProvider"],
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
            proto = onnx.load(str(dst))
        except Exception as exc:
            raise ExportError(f"int8 quantization failed: {first_line(exc)}") from None
        finally:
            root.setLevel(level)
    dims = value_dims(proto.graph.input[0])
    if not dims or isinstance(dims[0], int):
        raise ExportError(f"the int8 model lost the dynamic batch axis (input {dims}); this is a bug")
    return proto.SerializeToString()


def _top1(session: Any, images: Tensor, batch: int = 256) -> np.ndarray:
    out = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch].numpy()})[0].argmax(1)
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def compare_int8(
    fp32: bytes,
    int8: bytes,
    *,
    test: tuple[Tensor, Tensor] | None = None,
    latency_runs: int = 50,
    sample: Tensor | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Latency (batch 1, interleaved), and with ``test = (normalised images, labels)`` the test
    accuracy of both models and their top-1 agreement. Returns the fields of :class:`Int8Report`."""
    _, ort = require_onnx()
    try:
        s32, s8 = session_for(ort, fp32, threads), session_for(ort, int8, threads)
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the int8 model: {first_line(exc)}") from None
    res: dict[str, Any] = {"fp32_latency_ms": None, "int8_latency_ms": None, "test_images": 0,
                           "fp32_accuracy": None, "int8_accuracy": None, "agreement": None}
    if test is not None and len(test[1]):
        images, labels = test
        p32, p8 = _top1(s32, images), _top1(s8, images)
        y = labels.numpy()
        res.update(test_images=len(y), fp32_accuracy=float((p32 == y).mean()),
                   int8_accuracy=float((p8 == y).mean()), agreement=float((p32 == p8).mean()))
    if latency_runs > 0 and sample is not None:
        x = {INPUT_NAME: sample[:1].numpy()}
        fns = {"fp32": lambda: s32.run([OUTPUT_NAME], x), "int8": lambda: s8.run([OUTPUT_NAME], x)}
        med = interleaved_medians(fns, latency_runs, 5)
        res.update(fp32_latency_ms=med["fp32"], int8_latency_ms=med["int8"])
    return res


__all__ = ["QUANTIZATION", "Int8Report", "compare_int8", "int8_path", "quantize_int8", "set_metadata"]
