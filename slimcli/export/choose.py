"""Pick the fastest of several exact forms of one model by timing them in the target runtime.

Whether padding kept channel counts to 8 or 16 pays depends on the network and the runtime: it
lets blocked conv kernels run but adds work where the kernels never block (a narrow network whose
layers pad back to full width); whether a Gather beats zeroed channels depends on the runtime too
(docs/benchmarks.md, ``benchmarks/latency.py``). A measurement settles it: the forms are exported
(unverified, only to be timed), run **interleaved** on the same input at a few batch sizes, and the
one with the smallest geometric mean of time relative to the best per batch wins, but a form is only
preferred over one earlier in the caller's order (the target's safe default first, fewer MACs
first) when it is measurably (> :data:`MARGIN`) faster; and where the dense model is timed too, a
form that is not clearly faster than it at every batch (by half the margin; by the whole margin for a
form with more MACs than the dense model, such as one-hot convs) gives way to the form with the best
worst-case ratio among the others — among those measured no slower than dense, the first in the
caller's order unless a later one's worst case is better by half the margin (the target's first
form is the one whose speed is least in doubt). A near-tie with the dense model is noise on a
shared CPU, and a file with more MACs than the dense one that only ties with it is likely slower on
the next machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from slimcli.export.onnx import _build
from slimcli.export.runtimes import interleaved_latency
from slimcli.measure import measure

#: a form later in the caller's order of preference must be this much faster (geometric mean over
#: the batches) to be chosen: single timings on a shared CPU move by ±10 %
MARGIN = 0.1
#: seconds of interleaved timing per batch size (at least ``runs`` rounds): more runs where cheap
BUDGET_S = 3.0


def time_forms(
    models: Mapping[str, nn.Module], input_shape: tuple[int, int, int], *, runtime: str = "ort",
    batches: Sequence[int] = (1, 8), runs: int = 7, threads: int | None = None, seed: int = 0,
) -> dict[str, dict[int, float]]:
    """Median ms of every model per batch size in ``runtime``, interleaved: ``{name: {batch: ms}}``."""
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(seed))
    blobs = {k: _build("torchscript", m.eval(), example, None, {}, "")[1] for k, m in models.items()}
    times: dict[str, dict[int, float]] = {k: {} for k in models}
    for b in batches:
        med = interleaved_latency(blobs, input_shape, runtime, batch=b, runs=runs, threads=threads,
                                  budget_s=BUDGET_S, seed=seed)
        for k, ms in med.items():
            times[k][b] = ms
    return times


def _preferred(keys: Sequence[str], better: Callable[[str, str], bool]) -> str:
    """The first of ``keys`` (the caller's order of preference) unless a later one is ``better``
    than the choice so far: a later form must earn its place."""
    choice = keys[0]
    for k in keys[1:]:
        if better(k, choice):
            choice = k
    return choice


def fastest(
    models: Mapping[str, nn.Module], input_shape: tuple[int, int, int], *, runtime: str = "ort",
    batches: Sequence[int] = (1, 8), runs: int = 7, threads: int | None = None,
    baseline: nn.Module | None = None,
) -> tuple[str, dict[str, dict[int, float]]]:
    """The name of the fastest of ``models`` (see the module docstring) and every timing.

    ``baseline`` (the dense model) is timed in the same interleaved runs, as ``"dense"``, but never
    chosen: its times say how much faster the chosen form is."""
    if len(models) == 1 and baseline is None:
        return next(iter(models)), {}
    timed = {**models, "dense": baseline} if baseline is not None else dict(models)
    times = time_forms(timed, input_shape, runtime=runtime, batches=batches, runs=runs, threads=threads)
    base = times.pop("dense", None)
    if len(models) == 1:
        return next(iter(models)), {**times, "dense": base} if base else times
    best = {b: min(t[b] for t in times.values()) for b in batches}
    score = {k: math.exp(sum(math.log(t[b] / best[b]) for b in batches) / len(batches))
             for k, t in times.items()}
    choice = _preferred(list(models), lambda k, c: score[k] < score[c] * (1 - MARGIN))
    if base:  # never knowingly slower than the dense model: then the form with the best worst case
        worst = {k: max(t[b] / base[b] for b in batches) for k, t in times.items()}
        assert baseline is not None
        dense_macs = measure(baseline, input_shape).macs
        heavy = {k for k, m in models.items() if measure(m, input_shape).macs > dense_macs}

        def safe(k: str) -> bool:  # clear of the noise; more MACs than dense must be clearly faster
            return worst[k] <= 1 - (MARGIN if k in heavy else MARGIN / 2)

        if not safe(choice):
            eligible = [k for k in models if k not in heavy or safe(k)] or list(models)
            not_slower = [k for k in eligible if worst[k] <= 1]
            choice = (_preferred(not_slower, lambda k, c: worst[k] < worst[c] - MARGIN / 2) if not_slower
                      else min(eligible, key=lambda k: worst[k]))
    return choice, ({**times, "dense": base} if base else times)


__all__ = ["BUDGET_S", "MARGIN", "fastest", "time_forms"]
