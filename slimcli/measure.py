"""Model size and cost: parameters, MACs and FLOPs, in total and per layer.

Definitions (docs/architectures.md, design §6): ``params`` is the sum of ``numel`` over the
model's parameters (buffers such as channel-selection indices excluded); ``MACs`` are the
multiply-accumulates of conv and linear layers for *one* input of ``input_shape``;
``FLOPs = 2 × MACs``. Counting is done by :class:`torch.utils.flop_counter.FlopCounterMode`,
which already reports a matmul or convolution as 2 FLOPs per multiply-accumulate; its
per-module-hierarchy counts give the per-layer attribution. Works on an ``nn.Module`` and on
the ``torch.fx.GraphModule`` the pruning engine produces (its submodules keep their names).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from slimcli.errors import UsageError


def count_params(model: nn.Module) -> int:
    """Σ numel over the parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class LayerCost:
    """Parameters and MACs of one leaf module (a conv, a linear, or any leaf that does matmuls)."""

    name: str
    type: str
    params: int
    macs: int

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass(frozen=True)
class Measurement:
    """Totals for one input of ``input_shape`` and the per-layer rows, in module order."""

    params: int
    macs: int
    input_shape: tuple[int, ...]
    per_layer: list[LayerCost] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "flops": self.flops,
            "input_shape": list(self.input_shape),
            "per_layer": [{**asdict(row), "flops": row.flops} for row in self.per_layer],
        }


def _flop_count(counts: dict[Any, int]) -> int:
    return int(sum(counts.values()))


@torch.no_grad()
def measure(model: nn.Module, input_shape: Sequence[int] | None = None) -> Measurement:
    """Count params, MACs and FLOPs of ``model`` for one input of ``input_shape`` (C, H, W).

    Without ``input_shape`` the model's own ``input_shape`` attribute is used (every
    built-in architecture has one). The model runs once, in eval mode (BN running statistics
    are not touched) and without gradients, on the device of its parameters; its
    training/eval mode is restored afterwards.
    """
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise UsageError("measure: pass input_shape=(channels, height, width); the model does not record one")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"measure: input_shape must be positive sizes like (3, 32, 32), got {shape}")
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros((1, *shape), device=device, dtype=dtype)

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    except RuntimeError as exc:
        raise UsageError(f"measure: the model cannot run on one input of shape {shape}: {exc}") from exc
    finally:
        model.train(was_training)

    counts = counter.get_flop_counts()
    total_flops = _flop_count(counts.get("Global", {}))
    # FlopCounterMode names modules "<RootClass>.<qualified name>"
    prefix = type(model).__name__ + "."
    rows: list[LayerCost] = []
    for name, module in model.named_modules():
        if not name or next(module.children(), None) is not None:
            continue
        flops = _flop_count(counts.get(prefix + name, {}))
        if flops or isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append(LayerCost(name, type(module).__name__, params, flops // 2))
    return Measurement(params=count_params(model), macs=total_flops // 2, input_shape=shape, per_layer=rows)


def human(n: float) -> str:
    """A count in engineering units: 20035018 → '20.04M', 3.98e8 → '398.0M'."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}" if abs(n) / scale < 1000 else f"{n / scale:.1f}{unit}"
    return f"{n:g}"


def ort_options(ort: Any, threads: int | None = None, *, stop_spinning: bool = True) -> Any:
    """The onnxruntime session options of the sessions slim creates (``ort``: the module).

    ``session.force_spinning_stop``: onnxruntime's worker threads spin for a while after a run,
    waiting for more work. With several sessions alive — the dense model and the candidates that
    are timed interleaved — one session's spinning workers take the cores from the next one's run:
    measured on 2 cores, interleaved ResNet-164 runs took 1.3× (batch 32) to 3× (batch 1) their
    time alone, and the *ratios* moved too (benchmarks/ort_spinning.py). With the option, workers
    spin during a run (where it helps) and stop when it returns: interleaved times match the times
    of each model run alone. The price: a run wakes its workers instead of finding them spinning,
    ~10 µs (the demo's 0.16 ms model: 0.170 vs 0.156 ms), so ``stop_spinning=False`` where one
    session is timed on its own (:func:`onnx_latency_ms`). (An onnxruntime that did not know the key
    would ignore it: session config keys are not validated.)
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: warnings would go to stderr unasked
    if threads:
        opts.intra_op_num_threads = threads
    if stop_spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def onnx_latency_ms(
    model_bytes: bytes, x: Tensor, runs: int = 50, warmup: int = 5, *, input_name: str = "input",
    output_name: str = "logits", threads: int | None = None,
) -> float | None:
    """Median onnxruntime (CPU) time in ms of one run on ``x``; None when ``runs`` is 0.

    Needs the ``onnx`` extra (onnxruntime, imported here: it is optional and slow to load).
    """
    if runs <= 0:
        return None
    import onnxruntime as ort

    opts = ort_options(ort, threads, stop_spinning=False)  # timed alone: spinning as deployed
    session = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {input_name: x.numpy()}
    for _ in range(max(0, warmup)):
        session.run([output_name], feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run([output_name], feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], runs: int = 20, warmup: int = 3, *,
    budget_s: float = 0.0, max_runs: int = 200,
) -> dict[str, float]:
    """Median wall time in ms of each of ``fns``, timed interleaved: run 1 of every function, then
    run 2 of every function, and so on (after ``warmup`` untimed rounds).

    On a shared machine the load changes from second to second; interleaving gives every
    function the same conditions, so the *ratios* of the medians are what to compare.
    ``budget_s`` > 0 raises the number of rounds to fill about that many seconds (from the last
    warm-up round's time), never above ``max_runs``: cheap models get more runs, less noise.
    """
    if runs < 1:
        raise UsageError(f"runs must be >= 1, got {runs}")
    round_s = 0.0
    for _ in range(max(0, warmup)):
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        round_s = time.perf_counter() - t0
    if budget_s > 0 and round_s > 0:
        runs = max(runs, min(max_runs, int(budget_s / round_s)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


__all__ = [
    "LayerCost", "Measurement", "count_params", "human", "interleaved_medians", "measure", "onnx_latency_ms",
    "ort_options",
]
