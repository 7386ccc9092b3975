"""Running an exported ONNX model in several inference runtimes and checking each against PyTorch.

Runtimes (each an optional extra; ``pip install "slim-prune[runtimes]"`` installs all):

``ort``
    onnxruntime, CPUExecutionProvider (the ``onnx`` extra).
``opencv``
    OpenCV's dnn module, ``cv2.dnn.readNetFromONNX`` (``opencv-python-headless``).
``openvino``
    OpenVINO on the CPU device, compiled with ``INFERENCE_PRECISION_HINT=f32``. OpenVINO's
    default on CPUs with bf16/AMX support is **bf16** inference (measured here: 0.2–0.9 % logit
    error and top-1 flips on near-ties), which no f32 parity check can pass; the f32 hint is
    what a deployment must set to get the model it exported.
``ncnn``
    ncnn through pnnx: the ONNX file is converted by the ``pnnx`` tool (``fp16=0``) into an
    ncnn param/bin pair at batch 1, and run one image at a time with every fp16/bf16 option
    off. pnnx turns an ONNX ``Gather`` on the channel axis (a channel selection) into a
    one-channel ``Crop``, so pruned models that still contain selections compute garbage in
    ncnn — exactly what this check is there to catch.

:func:`check_runtimes` runs the model in each, on random inputs at batch 1 and 3 (ncnn: image
by image) and on the real images given, and reports ``rel_diff`` (as in
:mod:`slimcli.export.verify`) and the batch-1 latency (median; one runtime after the other:
interleaved, one runtime's spinning thread pool slows the next). A runtime that is not installed,
fails to load the
model, or computes it beyond the tolerance is an :class:`ExportError`: ``slim export``
then writes nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimcli.errors import ExportError, UsageError
from slimcli.export.verify import INPUT_NAME, OUTPUT_NAME, RANDOM_BATCHES, first_line, session_for
from slimcli.measure import interleaved_medians

#: Runtime names in the order they are checked and reported.
RUNTIMES = ("ort", "opencv", "openvino", "ncnn")
#: The Python module each runtime needs, and the pip package that provides it.
_MODULES = {"ort": "onnxruntime", "opencv": "cv2", "openvino": "openvino", "ncnn": "ncnn"}
_PACKAGES = {
    "ort": "onnxruntime", "opencv": "opencv-python-headless", "openvino": "openvino", "ncnn": "ncnn pnnx",
}
_EXTRA = {"ort": "onnx", "opencv": "opencv", "openvino": "openvino", "ncnn": "ncnn"}

Run = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RuntimeCheck:
    """One runtime's agreement with PyTorch and its batch-1 latency."""

    runtime: str
    version: str
    max_abs_diff: float
    rel_diff: float  # max|runtime − torch| / max(1, max|torch|), over every check
    tolerance: float
    latency_ms: float | None  # batch 1, median; None: not timed
    checked_on: str  # e.g. "random batch 1, 3; 16 test images"
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.rel_diff <= self.tolerance


def parse_runtimes(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"ort,openvino"`` → ``("ort", "openvino")`` in :data:`RUNTIMES` order; ``all`` = every one."""
    items = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if "all" in items:
        return RUNTIMES
    aliases = {"onnxruntime": "ort", "cv2": "opencv", "ov": "openvino"}
    items = [aliases.get(s, s) for s in items]
    bad = [s for s in items if s not in RUNTIMES]
    if bad:
        raise UsageError(f"unknown runtime(s) {', '.join(bad)}; choose from {', '.join(RUNTIMES)} or all")
    return tuple(r for r in RUNTIMES if r in items)


def runtime_version(name: str) -> str | None:
    """The installed version of runtime ``name``, or None when it cannot be imported."""
    try:
        mod = importlib.import_module(_MODULES[name])
        if name == "ncnn":
            importlib.import_module("pnnx")
    except Exception:  # ImportError, or a broken wheel raising something else at import
        return None
    return str(getattr(mod, "__version__", None) or getattr(mod, "get_version", lambda: "?")())


def install_hint(name: str) -> str:
    return f'pip install "slim-prune[{_EXTRA[name]}]" (or: pip install {_PACKAGES[name]})'


# --------------------------------------------------------------------------------------
# loaders: ONNX bytes → a function from an N×C×H×W float32 array to N×classes logits
# --------------------------------------------------------------------------------------
def _load_ort(data: bytes, path: Path, shape: tuple[int, int, int], threads: int | None, work: Path) -> Run:
    import onnxruntime as ort

    session = session_for(ort, data, threads=threads)
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _load_opencv(
    data: bytes, path: Path, shape: tuple[int, int, int], threads: int | None, work: Path
) -> Run:
    import cv2

    if threads:
        cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromONNX(str(path))

    def run(x: np.ndarray) -> np.ndarray:
        net.setInput(x)
        return np.asarray(net.forward())

    return run


def _load_openvino(
    data: bytes, path: Path, shape: tuple[int, int, int], threads: int | None, work: Path
) -> Run:
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU default may be bf16
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: np.asarray(request.infer({0: x})[compiled.output(0)])


def pnnx_to_ncnn(path: Path, shape: tuple[int, int, int], work: Path) -> tuple[Path, Path]:
    """Convert an ONNX file to an ncnn (param, bin) pair with the pnnx tool, fp32, batch 1."""
    import pnnx

    stem = work / "model"
    outputs = {
        "pnnxparam": f"{stem}.pnnx.param", "pnnxbin": f"{stem}.pnnx.bin", "pnnxpy": f"{stem}_pnnx.py",
        "pnnxonnx": f"{stem}.pnnx.onnx", "ncnnparam": f"{stem}.ncnn.param", "ncnnbin": f"{stem}.ncnn.bin",
        "ncnnpy": f"{stem}_ncnn.py",
    }
    dims = ",".join(map(str, shape))
    cmd = [pnnx.EXEC_PATH, str(path), f"inputshape=[1,{dims}]f32", "fp16=0", "device=cpu"]
    cmd += [f"{k}={v}" for k, v in outputs.items()]
    try:
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExportError(f"pnnx could not convert the model for ncnn: {first_line(exc)}") from None
    param, binary = Path(outputs["ncnnparam"]), Path(outputs["ncnnbin"])
    if proc.returncode != 0 or not param.exists() or not binary.exists():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise ExportError(f"pnnx could not convert the model for ncnn (exit {proc.returncode}): {tail}")
    return param, binary


class _NcnnRunner:
    """An ncnn net, fp32 throughout, run image by image (ncnn has no batch axis)."""

    def __init__(self, param: Path, binary: Path, threads: int | None) -> None:
        import ncnn

        self._ncnn = ncnn
        net = ncnn.Net()
        off = ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
               "use_bf16_packed")
        for opt in off:
            if hasattr(net.opt, opt):
                setattr(net.opt, opt, False)
        if threads:
            net.opt.num_threads = threads
        if hasattr(net.opt, "openmp_blocktime"):
            net.opt.openmp_blocktime = 0  # no spin-wait after a run: it starves whatever runs next
        if net.load_param(str(param)) != 0 or net.load_model(str(binary)) != 0:
            raise ExportError("ncnn could not load the model pnnx converted")
        self.net = net
        self.input = net.input_names()[0]
        self.output = net.output_names()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = []
        for sample in x:
            ex = self.net.create_extractor()
            mat = self._ncnn.Mat(np.ascontiguousarray(sample))
            ex.input(self.input, mat)
            code, out = ex.extract(self.output)
            if code != 0:
                raise ExportError(f"ncnn failed to run the model (extract returned {code})")
            rows.append(np.array(out).reshape(-1).copy())
            del out, mat  # Mats before the extractor, the extractor before the net
            ex.clear()
            del ex
        return np.stack(rows)

    def close(self) -> None:
        self.net.clear()


def _load_ncnn(data: bytes, path: Path, shape: tuple[int, int, int], threads: int | None, work: Path) -> Run:
    param, binary = pnnx_to_ncnn(path, shape, work)
    return _NcnnRunner(param, binary, threads)


_LOADERS = {"ort": _load_ort, "opencv": _load_opencv, "openvino": _load_openvino, "ncnn": _load_ncnn}


@contextlib.contextmanager
def loaded_runtimes(
    data: bytes, names: Sequence[str], input_shape: tuple[int, int, int], *, threads: int | None = None
) -> Any:
    """Yield ``{runtime: run}`` for the ONNX model ``data`` (missing runtime → ExportError)."""
    missing = [n for n in names if runtime_version(n) is None]
    if missing:
        hints = "; ".join(f"{n}: {install_hint(n)}" for n in missing)
        raise ExportError(f"runtime(s) not installed: {', '.join(missing)} ({hints})")
    with tempfile.TemporaryDirectory(prefix="slim-runtimes-") as tmp:
        work = Path(tmp)
        path = work / "model.onnx"  # some runtimes read only files, and pick the format by extension
        path.write_bytes(data)
        runs: dict[str, Run] = {}
        try:
            for name in names:
                try:
                    runs[name] = _LOADERS[name](data, path, input_shape, threads, work)
                except ExportError:
                    raise
                except Exception as exc:
                    raise ExportError(f"{name} cannot load the model: {first_line(exc)}") from None
            yield runs
        finally:
            for run in runs.values():
                close = getattr(run, "close", None)
                if close is not None:
                    close()


def _diff(got: np.ndarray, ref: np.ndarray, name: str, what: str) -> float:
    got = np.asarray(got, dtype=np.float32)
    if got.size != ref.size:
        raise ExportError(f"{name} returned shape {got.shape} for {what}, PyTorch {ref.shape}")
    d = float(np.abs(got.reshape(ref.shape) - ref).max()) if ref.size else 0.0
    return float("inf") if d != d else d  # NaN → inf: a NaN output is never parity


def check_runtimes(
    data: bytes,
    model: nn.Module,
    input_shape: tuple[int, int, int],
    runtimes: Sequence[str],
    *,
    real_inputs: Tensor | None = None,
    tolerance: float = 1e-4,
    latency_runs: int = 20,
    warmup_runs: int = 3,
    threads: int | None = None,
    seed: int = 0,
    raise_on_mismatch: bool = True,
) -> tuple[RuntimeCheck, ...]:
    """Run the ONNX model ``data`` in each of ``runtimes`` and compare with PyTorch's ``model``.

    Raises :class:`ExportError` naming every runtime that differs by more than ``tolerance``
    (``rel_diff``) unless ``raise_on_mismatch`` is False (the benchmark wants the numbers).
    """
    names = parse_runtimes(runtimes)
    if not names:
        return ()
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)
    inputs = [("random", torch.randn(b, *input_shape, generator=gen)) for b in RANDOM_BATCHES]
    if real_inputs is not None and len(real_inputs):
        inputs.append(("real", real_inputs.detach().to("cpu", torch.float32)))
    with torch.inference_mode():
        refs = [model(x).float().numpy() for _, x in inputs]
    scale = max(1.0, *(float(np.abs(r).max()) for r in refs if r.size))
    checked_on = f"random batch {', '.join(map(str, RANDOM_BATCHES))}" + (
        f"; {len(inputs[-1][1])} test images" if inputs[-1][0] == "real" else ""
    )
    results: dict[str, tuple[float, str]] = {}
    latency: dict[str, float] = {}
    with loaded_runtimes(data, names, input_shape, threads=threads) as runs:
        for name, run in runs.items():
            worst, note = 0.0, ""
            for (kind, x), ref in zip(inputs, refs, strict=True):
                what = f"{kind} inputs of batch {len(x)}"
                try:
                    got = run(np.ascontiguousarray(x.numpy()))
                except ExportError:
                    raise
                except Exception as exc:
                    raise ExportError(f"{name} failed to run the model on {what}: {first_line(exc)}") from exc
                worst = max(worst, _diff(got, ref, name, what))
            results[name] = (worst, note)
        if latency_runs > 0:
            one = np.ascontiguousarray(inputs[0][1][:1].numpy())
            # one runtime at a time: interleaved, one runtime's spinning thread pool starves the next
            # (measured: ncnn 0.3 → 24 ms after onnxruntime on two cores)
            for n, r in runs.items():
                latency.update(interleaved_medians({n: lambda r=r: r(one)}, latency_runs, warmup_runs))
    checks = tuple(
        RuntimeCheck(
            runtime=n, version=runtime_version(n) or "?", max_abs_diff=results[n][0],
            rel_diff=results[n][0] / scale, tolerance=tolerance, latency_ms=latency.get(n),
            checked_on=checked_on if n != "ncnn" else checked_on + " (image by image)",
            note="f32 hint" if n == "openvino" else results[n][1],
        )
        for n in names
    )
    bad = [c for c in checks if not c.ok]
    if bad and raise_on_mismatch:
        detail = "; ".join(f"{c.runtime} {c.version}: rel diff {c.rel_diff:.3g} > {c.tolerance:g}"
                           for c in bad)
        raise ExportError(
            f"the model is computed wrongly by {', '.join(c.runtime for c in bad)} ({detail}); "
            f"nothing written. Do not deploy it there; see docs/export.md (runtimes)"
        )
    return checks


def interleaved_latency(
    blobs: Mapping[str, bytes], input_shape: tuple[int, int, int], runtime: str = "ort", *, batch: int = 1,
    runs: int = 20, warmup: int = 2, threads: int | None = None, budget_s: float = 0.0, seed: int = 0,
) -> dict[str, float]:
    """Median ms of every ONNX model of ``blobs`` in ``runtime`` at ``batch``, all loaded at once
    and timed interleaved on the same input (:func:`~slimcli.measure.interleaved_medians`)."""
    x = np.random.default_rng(seed).standard_normal((batch, *input_shape), dtype=np.float32)
    with contextlib.ExitStack() as stack:
        fns = {}
        for name, blob in blobs.items():
            run = stack.enter_context(loaded_runtimes(blob, [runtime], input_shape, threads=threads))[runtime]
            fns[name] = lambda run=run: run(x)
        return interleaved_medians(fns, runs, warmup, budget_s=budget_s)


__all__ = [
    "RUNTIMES",
    "RuntimeCheck",
    "check_runtimes",
    "install_hint",
    "interleaved_latency",
    "loaded_runtimes",
    "parse_runtimes",
    "pnnx_to_ncnn",
    "runtime_version",
]
