"""The options of one training run (``slim sparsify-train`` and ``slim finetune``)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimcli.errors import UsageError

UPDATES = ("subgradient", "proximal")
AMPS = ("auto", "off", "bf16", "fp16")
STAGES = ("sparsify", "finetuned")


@dataclass
class TrainConfig:
    """Everything that defines a run; defaults are the paper's protocol (design §2, §7).

    ``parent`` is the checkpoint that ``finetune`` starts from (``None``: a fresh model of
    ``arch``). ``milestones`` are fractions of ``epochs`` where the learning rate drops ÷10.
    ``channels_last`` (NHWC) is on by default: faster with cuDNN and with oneDNN on the CPU
    (measured 1.3–1.6× per step for VGG, ResNet and DenseNet on CPU, see docs/training.md).
    """

    arch: str = "vgg19"
    dataset: str | None = "cifar10"
    penalty: str = "l1"
    lam: float = 1e-4
    update: str = "subgradient"
    epochs: int = 160
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma_init: float | None = 0.5
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    #: CPU threads; 0 = time a few passes at torch's default, half of it and 1, keep the fastest
    threads: int = 0
    #: keep the dataset on the device (True), stream it through DataLoader workers (False), or
    #: ask the dataset (None: it streams when it declares itself too large for the device)
    data_on_device: bool | None = None
    #: DataLoader worker processes per rank when streaming (None: the node's CPUs / ranks − 1, ≤ 8)
    workers: int | None = None
    #: under torchrun: BatchNorm statistics over the global batch instead of each rank's slice
    sync_bn: bool = False
    data_dir: str | None = None
    out: str | None = None
    resume: str | None = None
    quiet: bool = False
    #: start a new run in an ``out`` folder that already holds one, replacing its files
    force: bool = False
    stage: str = "sparsify"
    parent: str | None = None
    #: the command line recorded in the checkpoint lineage (defaults to this process's argv)
    command: str | None = field(default=None, compare=False)

    def validate(self) -> TrainConfig:
        """Check ranges and choices; raise :class:`UsageError` naming the option and the fix."""
        if self.update not in UPDATES:
            raise UsageError(f"--update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if self.amp not in AMPS:
            raise UsageError(f"--amp must be one of {', '.join(AMPS)}, got {self.amp!r}")
        if self.stage not in STAGES:
            raise UsageError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.epochs < 0:
            raise UsageError(f"--epochs must be >= 0, got {self.epochs}")
        if self.threads < 0:
            raise UsageError(f"--threads must be >= 0 (0 = pick automatically), got {self.threads}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be >= 0 (0 = read in the training process), got {self.workers}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1) (SGD diverges at 1 and above; 0.9 is usual), "
                             f"got {self.momentum}")
        for name in ("lr", "lam", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                rule = "> 0" if name == "lr" else ">= 0"
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number {rule}, got {value}")
        if self.nesterov and self.momentum == 0:
            raise UsageError("--nesterov needs --momentum > 0; add --no-nesterov or set a momentum")
        for m in self.milestones:
            if not 0 < m <= 1:
                raise UsageError(
                    f"--milestones must be fractions of the epochs in (0, 1], got {m}; "
                    f"e.g. --milestones 0.5,0.75"
                )
        if self.gamma_init is not None and not math.isfinite(self.gamma_init):
            raise UsageError(f"--gamma-init must be a finite number, got {self.gamma_init}")
        # a resumed run takes its parent from the saved config
        if self.stage == "finetuned" and not self.parent and not self.resume:
            raise UsageError("finetune needs the checkpoint to start from")
        return self

    def milestone_epochs(self) -> list[int]:
        """Milestone fractions turned into epoch numbers (0.5·160 = 80), rounded half up."""
        return sorted({math.floor(m * self.epochs + 0.5) for m in self.milestones})

    def default_out(self, arch: str, dataset: str, now: _dt.datetime | None = None) -> Path:
        """``runs/<arch>-<dataset>-<penalty>-<timestamp>`` with shell-friendly characters only."""
        stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
        parts = [_slug(arch), _slug(dataset), _slug(self.penalty), stamp]
        return Path("runs") / "-".join(parts)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (stored in the training state so ``--resume`` rebuilds the run)."""
        data = dataclasses.asdict(self)
        data["milestones"] = list(self.milestones)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "milestones" in values:
            values["milestones"] = tuple(float(m) for m in values["milestones"])
        return cls(**values)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+_-]+", "_", text).strip("_") or "x"


def parse_milestones(text: str) -> tuple[float, ...]:
    """``"0.5,0.75"`` → ``(0.5, 0.75)``; an empty string means no learning-rate drops."""
    if not text.strip():
        return ()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(
            f"--milestones must be comma-separated fractions of the epochs, e.g. 0.5,0.75; got {text!r}"
        ) from None
