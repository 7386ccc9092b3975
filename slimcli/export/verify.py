"""Checking an ONNX export against PyTorch: onnx.checker, onnxruntime parity at batch 1 and 3
(the batch axis must be dynamic) and on real images. Parity is measured as::

    rel_diff = max |ort − torch| / max(1, max |torch|)

over every output element of every check (the ``max(1, …)`` keeps tiny logits from turning
float rounding into a large ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimcli.errors import ExportError
from slimcli.measure import ort_options

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
#: Batch sizes of the random-input checks: 1 (the latency case) and another one, which only
#: works if the batch axis really is dynamic (the model is traced at batch 2).
RANDOM_BATCHES = (1, 3)
_PIP_HINT = 'pip install "slim-prune[onnx]"'


@dataclass(frozen=True)
class ParityCheck:
    """One onnxruntime-vs-PyTorch comparison."""

    inputs: str  # "random" or "real"
    batch: int
    max_abs_diff: float
    rel_diff: float  # max|ort − torch| / max(1, max|torch|)


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a SlimError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the onnx extras ({exc.name or exc} is missing): {_PIP_HINT}"
        ) from None
    return onnx, onnxruntime


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def graph_opset(proto: Any) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ExportError("the exported model declares no ai.onnx opset; this is an exporter bug")


def value_dims(value_info: Any) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return tuple(dims)


def session_for(ort: Any, model_bytes: bytes, threads: int | None = None) -> Any:
    opts = ort_options(ort, threads)
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def compare(session: Any, model: nn.Module, x: Tensor, inputs: str) -> ParityCheck:
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


@dataclass
class Candidate:
    exporter: str
    proto: Any
    data: bytes
    checks: list[ParityCheck]
    input_shape: tuple[int | str, ...]
    output_shape: tuple[int | str, ...]


def verify_export(
    exporter: str,
    proto: Any,
    data: bytes,
    model: nn.Module,
    input_shape: tuple[int, int, int],
    real_inputs: Tensor | None,
    seed: int,
) -> Candidate:
    onnx, ort = require_onnx()
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, or shape-inference errors from full_check
        raise ExportError(f"onnx.checker rejected the {exporter} export: {first_line(exc)}") from None
    try:
        session = session_for(ort, data, threads=1)  # parity needs no parallelism; latency uses the default
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the {exporter} export: {first_line(exc)}") from None
    if [i.name for i in session.get_inputs()] != [INPUT_NAME]:
        raise ExportError(
            f"the {exporter} export has inputs {[i.name for i in session.get_inputs()]}, "
            f"expected one named {INPUT_NAME!r}"
        )
    in_shape = value_dims(proto.graph.input[0])
    out_shape = value_dims(proto.graph.output[0])
    if isinstance(in_shape[0], int) or (out_shape and isinstance(out_shape[0], int)):
        raise ExportError(
            f"the {exporter} export has a fixed batch size ({in_shape} → {out_shape}), not a dynamic one"
        )
    gen = torch.Generator().manual_seed(seed)
    checks = [
        compare(session, model, torch.randn(b, *input_shape, generator=gen), "random")
        for b in RANDOM_BATCHES
    ]
    if real_inputs is not None and len(real_inputs):
        checks.append(compare(session, model, real_inputs, "real"))
    return Candidate(exporter, proto, data, checks, in_shape, out_shape)


__all__ = [
    "BATCH_AXIS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "RANDOM_BATCHES",
    "Candidate",
    "ParityCheck",
    "compare",
    "first_line",
    "graph_opset",
    "require_onnx",
    "session_for",
    "value_dims",
    "verify_export",
]
