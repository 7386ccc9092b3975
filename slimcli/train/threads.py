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

PROBE_STEPS = 3  # timed passes per candidate at most, after one warm-up pass
PROBE_BATCH = 16  # images per probe pass: enough to show the threading cost, cheap on a deep model
PROBE_BUDGET_S = 6.0  # the whole probe stops timing a candidate once its share of this is spent


def candidates(n: int) -> list[int]:
    """torch's default, half of it, and 1 (distinct, largest first)."""
    return sorted({n, max(1, n // 2), 1}, reverse=True)


def pick_threads(
    model: nn.Module, x: Tensor, y: Tensor, autocast: Callable[[], contextlib.AbstractContextManager[object]],
    steps: int = PROBE_STEPS, *, budget_s: float = PROBE_BUDGET_S, log: Callable[[str], None] | None = None,
) -> tuple[int, dict[int, float]]:
    """Set and return the fastest thread count for a training step of ``model`` on batch ``x, y``.

    Runs on a deep copy (the model, its BN statistics and every RNG stay untouched) and on at
    most :data:`PROBE_BATCH` images; each candidate gets one warm-up pass and up to ``steps``
    timed ones, fewer once its share of ``budget_s`` is spent (so a deep model costs about
    ``budget_s`` plus one warm-up pass per candidate). ``log`` gets one line before and one after.
    Returns the chosen count and the median seconds per pass of each candidate.
    """
    n = torch.get_num_threads()
    if n <= 1:
        return n, {}
    x, y = x[:PROBE_BATCH], y[:PROBE_BATCH]
    counts = candidates(n)
    say = log or (lambda _msg: None)
    say(f"--threads 0: timing {len(counts)} thread counts ({', '.join(map(str, counts))}) on a few training "
        f"passes of {len(y)} images (at most ~{budget_s:g} s; --threads N skips this)")
    started = time.perf_counter()
    probe = copy.deepcopy(model).train()
    timings: dict[int, float] = {}
    share = budget_s / len(counts)
    for threads in counts:
        torch.set_num_threads(threads)
        times: list[float] = []
        begin = time.perf_counter()
        for i in range(steps + 1):
            t0 = time.perf_counter()
            with autocast():
                loss = F.cross_entropy(probe(x), y)
            loss.backward()
            probe.zero_grad(set_to_none=True)
            if i:  # the first pass warms up this thread count's kernels
                times.append(time.perf_counter() - t0)
            if times and time.perf_counter() - begin > share:
                break
        timings[threads] = statistics.median(times) if times else time.perf_counter() - begin
    best = min(timings, key=timings.__getitem__)
    torch.set_num_threads(best)
    shown = ", ".join(f"{t}: {1000 * s:.0f} ms" for t, s in timings.items())
    say(f"--threads 0: using {best} thread{'s' if best > 1 else ''} ({shown} per pass; "
        f"probe took {time.perf_counter() - started:.1f} s)")
    return best, timings
