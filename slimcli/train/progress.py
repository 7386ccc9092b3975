"""Progress reporting for the training loop (stderr; stdout stays for results).

The loop calls a :class:`Reporter`; the command line picks :class:`RichReporter` (a live bar)
on a terminal and :class:`PlainReporter` (one line per epoch) when stderr is a file or pipe
or with ``--quiet``. The library default reports nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

#: seconds between progress lines within an epoch when stderr is a file or pipe (not with --quiet)
PLAIN_EVERY_S = 5.0


def epoch_line(r: dict[str, Any], epochs: int) -> str:
    """One human-readable line summarising an epoch's metrics record."""
    return (
        f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f} acc {r['train_acc']:.2%}  "
        f"test loss {r['test_loss']:.4f} acc {r['test_acc']:.2%}  lr {r['lr']:.3g}  "
        f"{r['images_per_s']:.0f} img/s  γ<1e-2 {r['frac_below_1e-2']:.1%}  {r['seconds']:.1f}s"
    )


def clock_text(seconds: float | None) -> str:
    """``h:mm:ss`` (``-:--:--`` while unknown)."""
    if seconds is None or not seconds >= 0 or seconds > 1e8:
        return "-:--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Eta:
    """Time left in the epoch and in the run, from the pace of the steps done so far in this epoch
    (the per-epoch evaluation is not counted)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.epoch = self.epochs = self.steps = self.done0 = 0
        self.t0 = 0.0

    def start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.epoch, self.epochs, self.steps, self.done0, self.t0 = epoch, epochs, steps, done, self.clock()

    def left(self, done: int) -> tuple[float | None, float | None]:
        """(seconds left in this epoch, seconds left in the run), None while nothing was timed."""
        if done <= self.done0:
            return None, None
        per_step = (self.clock() - self.t0) / (done - self.done0)
        epoch_left = (self.steps - done) * per_step
        return epoch_left, epoch_left + (self.epochs - self.epoch) * self.steps * per_step

    def text(self, done: int) -> str:
        epoch_left, run_left = self.left(done)
        text = f"ETA {clock_text(epoch_left)}"
        if self.epochs > self.epoch:
            text += f" (run {clock_text(run_left)})"
        return text


class Reporter:
    """No-op base: the hooks the loop calls."""

    def start(self, info: dict[str, Any]) -> None:
        """Once, before the first epoch: run dir, device, precision, sizes."""

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        """Epoch ``epoch`` (1-based) of ``epochs`` begins with ``done`` of ``steps`` already done."""

    def step(self, done: int, stats: dict[str, float]) -> None:
        """Called a few times per second with running loss, acc, lr, images_per_s, frac_below_1e-2."""

    def epoch_end(self, record: dict[str, Any]) -> None:
        """The epoch's metrics record (the line written to metrics.jsonl)."""

    def message(self, text: str) -> None:
        """A log line (resume notice, interruption, …)."""

    def close(self) -> None:
        """Tear down any live display (also after an error)."""


class PlainReporter(Reporter):
    """One line per epoch on stderr: for logs, pipes, CI and ``--quiet``; with ``every_s`` also a
    progress line within an epoch every that many seconds."""

    def __init__(self, console: Console, every_s: float | None = None) -> None:
        self.console = console
        self.epochs = 0
        self.every_s = every_s
        self.eta = Eta()
        self.last_line = 0.0

    def start(self, info: dict[str, Any]) -> None:
        self.epochs = int(info["epochs"])
        penalty = ("no penalty" if info["penalty"] == "none"  # λ means nothing then
                   else f"penalty {info['penalty']} λ={info['lam']:g} ({info['update']})")
        self.console.print(
            f"training {info['arch']} on {info['dataset']} ({info['train_size']} images) for "
            f"{self.epochs} epoch{'' if self.epochs == 1 else 's'}: {penalty}, "
            f"{info['device']}, amp {info['precision']} → {info['run_dir']}",
            markup=False, highlight=False,
        )

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.eta.start(epoch, epochs, steps, done)
        self.last_line = self.eta.clock()

    def step(self, done: int, stats: dict[str, float]) -> None:
        if self.every_s is None or self.eta.clock() - self.last_line < self.every_s:
            return
        self.last_line = self.eta.clock()
        e = self.eta
        self.console.print(
            f"epoch {e.epoch}/{e.epochs}  step {done}/{e.steps} ({done / max(e.steps, 1):.0%})  "
            f"loss {stats['loss']:.4f} acc {stats['acc']:.2%}  {stats['images_per_s']:.0f} img/s  "
            f"{e.text(done)}", markup=False, highlight=False)

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.console.print(epoch_line(record, self.epochs), markup=False, highlight=False)

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


class RichReporter(PlainReporter):
    """A live progress bar per epoch with running loss, accuracy, lr, images/s and γ sparsity."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%} lr {task.fields[lr]:.3g} "
                "{task.fields[ips]:.0f} img/s γ<1e-2 {task.fields[frac]:.1%}"
            ),
            TextColumn("{task.fields[eta]}"),
            console=console,
            transient=True,
        )
        self.task: Any = None

    def start(self, info: dict[str, Any]) -> None:
        super().start(info)
        self.progress.start()

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.eta.start(epoch, epochs, steps, done)
        fields = {"epoch": f"{epoch}/{epochs}", "loss": 0.0, "acc": 0.0, "lr": 0.0, "ips": 0.0, "frac": 0.0,
                  "eta": self.eta.text(done)}
        if self.task is None:
            self.task = self.progress.add_task("train", total=steps, completed=done, **fields)
        else:
            self.progress.reset(self.task, total=steps, completed=done, **fields)

    def step(self, done: int, stats: dict[str, float]) -> None:
        self.progress.update(
            self.task, completed=done, loss=stats["loss"], acc=stats["acc"], lr=stats["lr"],
            ips=stats["images_per_s"], frac=stats["frac_below_1e-2"], eta=self.eta.text(done),
        )

    def epoch_end(self, record: dict[str, Any]) -> None:
        # printed through the live display so the line stays above the bar
        self.progress.console.print(epoch_line(record, self.epochs), markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(console: Console, quiet: bool) -> Reporter:
    """The live bar on an interactive stderr, plain epoch lines otherwise."""
    if quiet:
        return PlainReporter(console)
    if not console.is_terminal:  # a log file or pipe: a progress line every few seconds
        return PlainReporter(console, every_s=PLAIN_EVERY_S)
    return RichReporter(console)
