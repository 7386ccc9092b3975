"""What a run directory holds between epochs: training state for ``--resume``, metrics, signals.

A run directory contains ``last.safetensors`` (model + metadata), ``last.state.safetensors``
(optimizer buffers, scheduler, loop counters, every RNG state, the config), ``best.safetensors``
and ``metrics.jsonl``. All tensors go through :mod:`slimcli.checkpoint` (atomic writes, no
pickle); small structured values travel as JSON metadata.
"""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from slimcli.errors import CheckpointError, TrainingError, UsageError

LAST = "last.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"


@dataclass
class LoopState:
    """Counters of the loop. ``step`` > 0 means the state was saved mid-epoch (after an
    interrupt); ``perm`` is then that epoch's shuffle order and ``partial`` its running sums."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps done in the current (incomplete) epoch
    global_step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    partial: dict[str, float] = field(default_factory=dict)
    perm: Tensor | None = None


# ----------------------------------------------------------------------------------------
# run directory
# ----------------------------------------------------------------------------------------
#: what a run leaves in its folder (a new run with ``force`` removes them first)
RUN_FILES = (LAST, "last.state.safetensors", "last.prev.state.safetensors", BEST, METRICS)


def check_new_run_dir(run_dir: Path, command: str, force: bool = False) -> None:
    """Refuse to start a new run where a run already left files (they would be overwritten),
    unless ``force``: then :func:`clear_run_dir` removes them when the run starts."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; choose a folder for the run")
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not force:
        raise UsageError(
            f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
            f"'slim {command} --resume {run_dir}', replace it with --force, or choose another --out"
        )


def clear_run_dir(run_dir: Path) -> None:
    """Remove an earlier run's files (a new run started with ``force``)."""
    for name in RUN_FILES:
        try:
            (run_dir / name).unlink(missing_ok=True)
        except OSError as exc:
            raise TrainingError(f"cannot replace {run_dir / name}: {exc.strerror or exc}; "
                                f"remove it or choose another --out") from None


def metrics_line(record: dict[str, Any]) -> str:
    """One strict-JSON line (no NaN/Infinity tokens: a non-finite number is written as null)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read {path}: {exc}; fix or remove that file") from None


def truncate_metrics(run_dir: Path, epochs: int) -> None:
    """Keep the lines of epochs 1..``epochs`` only, so a resumed run never writes an epoch twice."""
    path = run_dir / METRICS
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir)
            if isinstance(r, dict) and isinstance(r.get("epoch", 0), int) and r.get("epoch", 0) <= epochs]
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(metrics_line(r) for r in keep))
        tmp.replace(path)
    except OSError as exc:
        raise TrainingError(f"cannot write {path}: {exc.strerror or exc}; free disk space") from None


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's record to ``metrics.jsonl`` (strict JSON, see :func:`metrics_line`)."""
    try:
        with open(run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(metrics_line(record))
    except OSError as exc:
        raise TrainingError(f"cannot write {run_dir / METRICS}: {exc.strerror or exc}; free disk space, "
                            f"then resume with --resume {run_dir}") from None


# ----------------------------------------------------------------------------------------
# training state <-> (tensors, JSON)
# ----------------------------------------------------------------------------------------
def pack_state(
    loop: LoopState,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generators: dict[str, torch.Generator],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Everything ``--resume`` needs besides the model weights, split into tensors and JSON."""
    tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, gen in generators.items():
        tensors[f"rng.{name}"] = gen.get_state()
    if loop.perm is not None:
        tensors["perm"] = loop.perm
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "milestones"}  # rebuilt from config
    loop_json = {k: v for k, v in asdict(loop).items() if k != "perm"}
    meta = {
        "config": config,
        "loop": loop_json,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        "scheduler": sched,
        "scaler": scaler.state_dict(),
    }
    return tensors, meta


def unpack_state(
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generators: dict[str, torch.Generator],
) -> LoopState:
    """Restore optimizer, scheduler, scaler and RNGs in place; return the loop counters.

    A state that does not fit (a damaged or hand-edited file) is a :class:`CheckpointError`."""
    try:
        loop = _unpack(tensors, meta, optimizer, scheduler, scaler, generators)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"the training state does not fit this run ({type(exc).__name__}: {exc}); "
                              f"it cannot be resumed, start a new run from its last.safetensors") from None
    counters = (loop.epoch, loop.step, loop.global_step)
    if not all(isinstance(c, int) and c >= 0 for c in counters):
        raise CheckpointError(f"the training state has invalid counters (epoch {loop.epoch!r}, step "
                              f"{loop.step!r}); it cannot be resumed")
    return loop


def _unpack(
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generators: dict[str, torch.Generator],
) -> LoopState:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["optimizer"].get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"].cpu())
    cuda_states = [tensors[k].cpu() for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    for name, gen in generators.items():
        if f"rng.{name}" in tensors:
            gen.set_state(tensors[f"rng.{name}"].cpu())
    loop = LoopState(**meta["loop"])
    loop.perm = tensors.get("perm")
    return loop


# ----------------------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------------------
class StopRequest:
    """Set by SIGINT/SIGTERM; the loop checks it after every step. A second signal aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Turn the first SIGINT/SIGTERM into a flag (so the current step finishes and the state is
    saved) and restore the previous handlers afterwards."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: FrameType | None) -> None:
        if request.signum is not None:  # impatient second Ctrl-C: stop now, last checkpoint stays
            raise KeyboardInterrupt
        request.signum = signum

    for s in previous:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
