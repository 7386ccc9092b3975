"""The training engine shared by ``slim sparsify-train`` and ``slim finetune``.

:func:`train` runs (or resumes) a :class:`TrainConfig`; see docs/training.md.
"""

from __future__ import annotations

from slimcli.train.config import TrainConfig
from slimcli.train.engine import TrainingInterrupted, TrainResult, optimizer_step, train
from slimcli.train.progress import PlainReporter, Reporter, RichReporter, make_reporter

__all__ = [
    "PlainReporter",
    "Reporter",
    "RichReporter",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "make_reporter",
    "optimizer_step",
    "train",
]
