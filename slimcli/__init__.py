"""slim: network slimming with nonconvex penalties.

Public API (stable): :func:`create_penalty`, :func:`create_arch`,
:func:`create_dataset`, :class:`Penalty`, :class:`Dataset`, the
registries and their decorators, :class:`SlimError` and its subclasses.

The names are imported on first use (PEP 562), so ``import slimcli`` — and ``slim --help``
or ``slim --version`` — does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from slimcli._version import __version__

#: public name → the module that defines it
_EXPORTS = {
    **dict.fromkeys(("create_arch",), "slimcli.archs"),
    **dict.fromkeys(("Dataset", "create_dataset"), "slimcli.data"),
    **dict.fromkeys(
        ("CheckpointError", "DataError", "ExportError", "PluginError", "PruneError", "SlimError",
         "TrainingError", "UsageError"),
        "slimcli.errors",
    ),
    **dict.fromkeys(("Penalty", "add_penalty_grad", "apply_prox", "create_penalty"), "slimcli.penalties"),
    **dict.fromkeys(
        ("ARCHS", "DATASETS", "PENALTIES", "Option", "register_arch", "register_dataset", "register_penalty"),
        "slimcli.registry",
    ),
}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slimcli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


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
