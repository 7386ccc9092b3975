"""Test accuracy of a model on a registered dataset, normalised as in training.

Used by ``slim prune --eval`` (the paper's "accuracy before fine-tuning") and ``slim demo``;
the arithmetic is the training engine's own :func:`slimcli.train.engine.evaluate`, so a
number printed here equals the one the engine records for the same weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimcli.errors import DataError

EVAL_BATCH = 1000


def normalization_of(meta: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` recorded in a checkpoint's ``slim.normalization``, or None."""
    norm = meta.get("normalization")
    if isinstance(norm, Mapping) and norm.get("mean") and norm.get("std"):
        return [float(m) for m in norm["mean"]], [float(s) for s in norm["std"]]
    return None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset_spec: str,
    data_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    split: str = "test",
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    batch_size: int = EVAL_BATCH,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (a fraction) of ``model`` on a dataset split.

    Images are normalised with ``normalization`` (mean, std in [0, 1] pixel units; default the
    dataset's own, which is what training used). The model is moved to ``device`` and put in
    eval mode; its BatchNorm statistics are not touched. ``data`` is the split already loaded
    (uint8 images, labels), so that several models can be evaluated on one read of it.
    """
    from slimcli.data import create_dataset
    from slimcli.train.augment import Normalizer
    from slimcli.train.device import Precision
    from slimcli.train.engine import evaluate as _engine_evaluate

    dataset = create_dataset(dataset_spec)
    images, labels = data if data is not None else dataset.load(split, Path(data_dir) if data_dir else None)
    if len(labels) == 0:
        raise DataError(f"dataset {dataset.spec} has an empty {split} split; nothing to evaluate")
    dev = torch.device(device)
    mean, std = normalization if normalization is not None else (dataset.mean, dataset.std)
    model.to(dev)
    return _engine_evaluate(
        model, images.to(dev), labels.to(dev), Normalizer(mean, std, dev), batch_size,
        Precision("off", None, False),
    )


__all__ = ["EVAL_BATCH", "evaluate", "normalization_of"]
