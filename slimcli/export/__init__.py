"""Verified ONNX export (:mod:`.onnx`), its checks against PyTorch (:mod:`.verify`) and the
checkpoint → ONNX path with metadata (:mod:`.metadata`)."""

from __future__ import annotations

from slimcli.export.metadata import (
    REAL_SAMPLES,
    checkpoint_metadata_for_onnx,
    export_checkpoint,
    latest_accuracy,
    sample_inputs,
)
from slimcli.export.onnx import EXPORTERS, ExportReport, check_onnx_destination, export_onnx
from slimcli.export.verify import INPUT_NAME, OUTPUT_NAME, ParityCheck

__all__ = [
    "EXPORTERS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "REAL_SAMPLES",
    "ExportReport",
    "ParityCheck",
    "check_onnx_destination",
    "checkpoint_metadata_for_onnx",
    "export_checkpoint",
    "export_onnx",
    "latest_accuracy",
    "sample_inputs",
]
