"""How many CPU threads to train with.

torch defaults to one thread per physical core. That is right on an idle machine, but when
other processes hold cores, OpenMP threads spin at every barrier waiting for a thread that
is not scheduled: on this project's shared 2-core machine a narrow VGG step took 25 ms with
one thread and 350–470 ms with two. Rather than guess, time a few forward/backward passes
of a throwaway copy of the model at a handful of thread counts and keep the fastest.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROBE_STEPS = 4  # timed passes per candidate, after one warm-up pass


def candidates(n: int) -> list[int]:
    """torch's default, half of it, and 1 (distinct, largest first)."""
    return sorted({n, max(1, n // 2), 1}, reverse=True)


def pick_threads(
    model: nn.Module, x: Tensor, y: Tensor, autocast: Callable[[], contextlib.AbstractContextManager[object]],
    steps: int = PROBE_STEPS,
) -> tuple[int, dict[int, float]]:
    """Set and return the fastest thread count for a training step of ``model`` on batch ``x, y``.

    Runs on a deep copy (the model, its BN statistics and every RNG stay untouched); returns
    the chosen count and the median seconds per pass of each candidate.
    """
    n = torch.get_num_threads()
    if n <= 1:
        return n, {}
    probe = copy.deepcopy(model).train()
    timings: dict[int, float] = {}
    for threads in candidates(n):
        torch.set_num_threads(threads)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            with autocast():
                loss = F.cross_entropy(probe(x), y)
            loss.backward()
            probe.zero_grad(set_to_none=True)
            if i:  # the first pass warms up this thread count's kernels
                times.append(time.perf_counter() - t0)
        timings[threads] = statistics.median(times)
    best = min(timings, key=timings.__getitem__)
    torch.set_num_threads(best)
    return best, timings
