"""Device and mixed-precision choices, with errors that say what to do instead."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

from slimcli.errors import TrainingError, UsageError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_string(text: str) -> str:
    """Validate ``auto|cpu|cuda[:i]`` without looking at the hardware (a usage check)."""
    value = text.strip().lower()
    if not _DEVICE_RE.match(value):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (e.g. cuda:0), got {text!r}")
    return value


def resolve_device(text: str) -> torch.device:
    """``auto`` = the current CUDA device if there is one, else the CPU; CUDA asked for but
    absent (or an index past the last GPU) is a runtime error."""
    value = check_device_string(text)
    if value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {value}: no CUDA device is available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise TrainingError(
                f"--device {value}: only {count} CUDA device(s) here (cuda:0…cuda:{count - 1})"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (``None`` = fp32) and whether a GradScaler is needed."""

    name: str  # "off", "bf16", "fp16"
    dtype: torch.dtype | None
    scaler: bool


def resolve_amp(text: str, device: torch.device) -> Precision:
    """``auto`` = bf16 on a CUDA device that supports it, else fp32 (CPU autocast is slower).

    bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 does (GradScaler).
    """
    if text == "off":
        return Precision("off", None, False)
    if text == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, False)
        return Precision("off", None, False)
    if text == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise TrainingError(f"--amp bf16: {name} has no bf16; use --amp fp16")
        return Precision("bf16", torch.bfloat16, False)
    if text == "fp16":
        if device.type == "cpu":
            warnings.warn("slim: --amp fp16 on the CPU runs several times slower than fp32 (CPUs have few "
                          "fast fp16 kernels, and fp16 needs loss scaling); use --amp off (the CPU default), "
                          "or --amp bf16 on a CPU with bf16 support", stacklevel=2)
        return Precision("fp16", torch.float16, True)
    raise UsageError(f"--amp must be auto, off, bf16 or fp16, got {text!r}")
