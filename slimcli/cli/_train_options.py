"""Options shared by ``slim sparsify-train`` and ``slim finetune``, declared once.

Each option is an ``Annotated`` type; a command lists the ones it takes with its own default.
Values are checked here (exit 2 with the option's name); :func:`run_training` builds the
:class:`~slimcli.train.TrainConfig`, runs the engine and renders the result.
"""

from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from slimcli.cli._common import device_callback, err, non_negative, out, positive, spec_callback
from slimcli.errors import UsageError
from slimcli.registry import ARCHS, DATASETS, PENALTIES, is_file_spec

if TYPE_CHECKING:
    from rich.console import Console

    from slimcli.train import Reporter, TrainConfig, TrainResult

TRAIN = "Training"  # help panel


class Update(str, Enum):
    subgradient = "subgradient"
    proximal = "proximal"


class Amp(str, Enum):
    auto = "auto"
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


def _seed(value: int) -> int:
    # torch.manual_seed takes [-2^63, 2^64); the augmentation generator is seeded with seed + 1
    if not -(2**63) <= value <= 2**64 - 2:
        raise typer.BadParameter(f"must be an integer from -2^63 to 2^64-2 (torch's seed range), got {value}")
    return value


def _momentum(value: float) -> float:
    if not (math.isfinite(value) and 0 <= value < 1):
        raise typer.BadParameter(f"must be in [0, 1) (SGD diverges at 1 and up; 0.9 is usual), got {value}")
    return value


def _milestones(value: str) -> str:
    # lazily: start-up cost, see docs/benchmarks.md (slimcli.train imports torch)
    from slimcli.train import TrainConfig
    from slimcli.train.config import parse_milestones

    try:
        TrainConfig(milestones=parse_milestones(value)).validate()
    except UsageError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--milestones ")) from None
    return value


def _opt(*names: str, help: str, **kw: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=TRAIN, **kw)


def _arch(value: str | None) -> str | None:
    """Check an ``--arch`` spec; a user file spec (``net.py:Net``) is kept as typed, so that the
    default run folder is named after it, not after its absolute path and sha256 (the checkpoint
    records the canonical form)."""
    checked = spec_callback(ARCHS)(value)
    return value.strip() if value is not None and is_file_spec(value) else checked


ArchOpt = Annotated[str, _opt("--arch", help="Architecture spec, e.g. vgg19, vgg11:width=0.25, resnet164, "
                              "or your own model: path/to/net.py:Net[:key=value,…].", callback=_arch)]
DatasetOpt = Annotated[str, _opt("--dataset", callback=spec_callback(DATASETS),
                                 help="Dataset spec, e.g. cifar10, fashion-mnist, synthetic:n=512.")]
PenaltyOpt = Annotated[str, _opt("--penalty", help="Sparsity penalty on BN scales: l1, lp:p=0.5, tl1:a=0.5, "
                                 "mcp, scad, l1-l2, none.", callback=spec_callback(PENALTIES))]
LamOpt = Annotated[float, _opt("--lam", help="Penalty strength λ (loss + λ·ΣR(γ)).", callback=non_negative)]
UpdateOpt = Annotated[Update, _opt("--update", help="subgradient: γ.grad += λ∂R(γ) after backward (paper); "
                                   "proximal: γ ← prox(γ, lr·λ) after each step (exact zeros).")]
EpochsOpt = Annotated[int, _opt("--epochs", help="Number of epochs.", min=0)]
BatchOpt = Annotated[int, _opt("--batch-size", help="Images per step.", min=1)]
LrOpt = Annotated[float, _opt("--lr", help="Initial SGD learning rate.", callback=positive)]
MomentumOpt = Annotated[float, _opt("--momentum", help="SGD momentum, in [0, 1).", callback=_momentum)]
NesterovOpt = Annotated[bool, _opt("--nesterov/--no-nesterov", help="Nesterov momentum.")]
WdOpt = Annotated[float, _opt("--weight-decay", help="L2 weight decay (also on γ, as in the paper).",
                              callback=non_negative)]
MilestonesOpt = Annotated[str, _opt("--milestones", help="Fractions of the epochs where lr drops ÷10.",
                                    callback=_milestones)]
GammaInitOpt = Annotated[float, _opt("--gamma-init", help="Initial value of every BN scale γ.")]
SeedOpt = Annotated[int, _opt("--seed", help="Seed of weight init, shuffling and augmentation.",
                              callback=_seed)]
DeviceOpt = Annotated[str, _opt("--device", help="auto (CUDA if present), cpu, cuda or cuda:N.",
                                callback=device_callback)]
AmpOpt = Annotated[Amp, _opt("--amp", help="Mixed precision: auto = bf16 on CUDA, off on CPU.")]
ChannelsLastOpt = Annotated[bool, _opt("--channels-last/--no-channels-last",
                                      help="NHWC memory layout (faster with cuDNN and on the CPU).")]
CompileOpt = Annotated[bool, _opt("--compile/--no-compile", help="torch.compile the model.")]
ThreadsOpt = Annotated[int, _opt("--threads", min=0, help="CPU threads; 0 = time a few steps with torch's "
                                 "default, half of it and 1, and keep the fastest.")]
DataDirOpt = Annotated[Path | None, _opt("--data-dir", help="Folder with the dataset files (searched first).",
                                         show_default=False)]
OutOpt = Annotated[Path | None, _opt("--out", show_default=False,
                                     help="Run folder [default: runs/<arch>-<dataset>-<penalty>-<time>].")]
ResumeOpt = Annotated[Path | None, _opt("--resume", help="Continue the run in this folder exactly where it "
                                        "stopped (its saved options are used).")]
ForceOpt = Annotated[bool, _opt("--force", help="Start a new run in an --out folder that holds one, "
                                "replacing its files.")]
QuietOpt = Annotated[bool, _opt("--quiet", "-q", help="No live progress bar; one line per epoch on stderr.")]

#: options that may accompany --resume (where to run, not what to run)
DataOnDeviceOpt = Annotated[bool | None, _opt(
    "--data-on-device/--no-data-on-device", show_default=False,
    help="Keep the dataset on the device (fast path) or stream it through DataLoader workers "
         "[default: stream only a dataset too large for the device, e.g. a big imagefolder].")]
WorkersOpt = Annotated[int | None, _opt("--workers", min=0, show_default=False,
                                        help="DataLoader worker processes per rank when streaming "
                                             "[default: CPUs per rank − 1, at most 8].")]
SyncBnOpt = Annotated[bool, _opt("--sync-bn/--no-sync-bn", help="Under torchrun: BatchNorm statistics over "
                                 "the global batch (all ranks) instead of each rank's slice.")]

RESUME_OK = {"resume", "device", "data_dir", "quiet", "ckpt", "threads", "workers"}


def check_resume_alone(ctx: typer.Context, resume: Path | None) -> None:
    """With ``--resume`` the run's saved options apply; passing others would silently not."""
    if resume is None:
        return
    given = [
        p for p in ctx.command.params
        if p.name not in RESUME_OK
        and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"  # type: ignore[arg-type]
    ]
    if given:
        names = ", ".join(p.opts[0] if p.opts else p.name for p in given)  # type: ignore[misc]
        raise typer.BadParameter(
            f"--resume continues the run with its saved options; drop {names} "
            f"(only --device, --threads, --workers, --data-dir and --quiet may change), "
            f"or start a new run with --out",
            param_hint="--resume",
        )


def make_reporter(console: Console, quiet: bool) -> Reporter:
    """:func:`slimcli.train.make_reporter`, imported when a training command runs."""
    from slimcli.train import make_reporter as make  # lazily: start-up cost, see docs/benchmarks.md

    return make(console, quiet)


def run_training(config: TrainConfig) -> TrainResult:
    """Run the engine with progress on stderr; on Ctrl-C say how to resume and exit 130."""
    # lazily: start-up cost, see docs/benchmarks.md (slimcli.train imports torch)
    from slimcli.train import TrainingInterrupted, train

    try:
        result = train(config, make_reporter(err, config.quiet))
    except TrainingInterrupted as exc:
        text = str(exc)  # "interrupted in epoch …; state saved in …. Resume with: …"
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun: rank 0 speaks for all
            err.print(text[:1].upper() + text[1:], markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    if result.rank == 0:
        render_result(result)
    return result


def render_result(r: TrainResult) -> None:
    """The final summary on stdout."""
    table = Table(title=f"{r.stage} run {r.run_dir}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    last = r.last or {}
    table.add_row("epochs", str(r.epochs))
    if r.best_epoch:
        table.add_row("best test accuracy", f"{r.best_acc:.2%} (epoch {r.best_epoch})")
    if last:
        table.add_row("final test accuracy", f"{last['test_acc']:.2%} (loss {last['test_loss']:.4f})")
        fracs = f"{last['frac_below_1e-2']:.1%} (< 1e-4: {last['frac_below_1e-4']:.1%})"
        table.add_row("BN scales |γ| < 1e-2", fracs)
        table.add_row("throughput", f"{last['images_per_s']:.0f} images/s on {r.device} (amp {r.precision})")
    elif r.best_acc >= 0:
        table.add_row("test accuracy", f"{r.best_acc:.2%}")
    table.add_row("time", f"{r.seconds:.1f} s")
    files = {"best.safetensors": "best.safetensors", "last.safetensors": "last.safetensors (+ .state)",
             "metrics.jsonl": "metrics.jsonl"}  # --epochs 0 writes no metrics line
    table.add_row("files", ", ".join(text for name, text in files.items() if (r.run_dir / name).exists()))
    out.print(table)
    if r.stage == "sparsify":
        out.print(f"next: slim inspect {r.run_dir / 'best.safetensors'}  |  "
                  f"slim prune {r.run_dir / 'best.safetensors'} --ratio 0.5", markup=False, highlight=False)
    else:
        out.print(f"next: slim export {r.run_dir / 'best.safetensors'} model.onnx",
                  markup=False, highlight=False)
