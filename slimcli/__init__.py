"""slim: network slimming with nonconvex penalties.

Public API (stable): :func:`create_penalty`, :func:`create_arch`,
:func:`create_dataset`, :class:`Penalty`, :class:`Dataset`, the
registries and their decorators, :class:`SlimError` and its subclasses.
"""

from __future__ import annotations

__version__ = "0.1.0"

from slimcli.archs import create_arch
from slimcli.data import Dataset, create_dataset
from slimcli.errors import (
    CheckpointError,
    DataError,
    ExportError,
    PluginError,
    PruneError,
    SlimError,
    TrainingError,
    UsageError,
)
from slimcli.penalties import Penalty, add_penalty_grad, apply_prox, create_penalty
from slimcli.registry import (
    ARCHS,
    DATASETS,
    PENALTIES,
    Option,
    register_arch,
    register_dataset,
    register_penalty,
)

__all__ = [
    "ARCHS",
    "DATASETS",
    "PENALTIES",
    "CheckpointError",
    "DataError",
    "Dataset",
    "ExportError",
    "Option",
    "Penalty",
    "PluginError",
    "PruneError",
    "SlimError",
    "TrainingError",
    "UsageError",
    "__version__",
    "add_penalty_grad",
    "apply_prox",
    "create_arch",
    "create_dataset",
    "create_penalty",
    "register_arch",
    "register_dataset",
    "register_penalty",
]
