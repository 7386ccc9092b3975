"""Exceptions raised by the slim library.

Every error a user can cause is a :class:`SlimError` whose message says how to fix it; the
CLI prints it as one ``Error: …`` line and exits 1 (2 for :class:`UsageError`).
"""

from __future__ import annotations


class SlimError(Exception):
    """Base class of every error slim reports to a user (exit code 1)."""

    exit_code = 1


class UsageError(SlimError):
    """The user asked for something that does not exist or is out of range (exit code 2)."""

    exit_code = 2


class PluginError(SlimError):
    """A plugin is missing, duplicated or broken."""


class CheckpointError(SlimError):
    """A checkpoint file is missing, corrupt, or cannot be rebuilt."""


class DataError(SlimError):
    """A dataset cannot be found, downloaded or read."""


class TrainingError(SlimError):
    """Training cannot start or cannot go on (non-finite loss, device missing, …)."""


class PruneError(SlimError):
    """A pruning request cannot be carried out."""


class ExportError(SlimError):
    """An ONNX export failed or did not match PyTorch."""
