"""The model layer shared by training, pruning flows, evaluation and export.

:func:`build_model` turns a loaded checkpoint into the model it describes (registered arch →
recorded widths → strict load); :class:`Normalizer` is the one uint8 → float preprocessing;
:func:`evaluate_tensors` is the one evaluation loop and :func:`evaluate` runs it on a
registered dataset, so an accuracy printed anywhere equals the one training recorded;
:func:`recalibrate` re-estimates BatchNorm statistics on :func:`calibration_images` after
pruning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimcli.archs import create_arch
from slimcli.checkpoint import Checkpoint
from slimcli.data import create_dataset, no_downloads
from slimcli.errors import CheckpointError, DataError, PruneError, UsageError
from slimcli.prune import apply_widths
from slimcli.prune.recalibrate import recalibrate_batchnorm
from slimcli.prune.surgery import decode_keep
from slimcli.registry import ARCHS, is_file_spec

EVAL_BATCH = 1000


# --------------------------------------------------------------------------------------
# rebuilding a checkpoint's model
# --------------------------------------------------------------------------------------
def first_names(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, comma-separated, with a count of the rest (for one-line errors)."""
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")


def fit_problems(wrong: list[str], missing: list[str], unexpected: list[str]) -> list[str]:
    """Why a state dict does not fit a model, one phrase per kind (empty: it fits)."""
    problems = []
    if wrong:
        problems.append(f"shape mismatch: {first_names(wrong)}")
    if missing:
        problems.append(f"missing from the file: {first_names(missing)}")
    if unexpected:
        problems.append(f"not in the model: {first_names(unexpected)}")
    return problems


def dense_model(ckpt: Checkpoint | Mapping[str, Any]) -> nn.Module:
    """The dense architecture a checkpoint (or its metadata) names, freshly initialised."""
    meta = ckpt.meta if isinstance(ckpt, Checkpoint) else ckpt
    path = getattr(ckpt, "path", None)
    spec = str(meta["arch"])
    name = spec.partition(":")[0].strip()
    where = f" ({path})" if path else ""
    if not is_file_spec(spec) and name not in ARCHS:  # a user file's problems are create_arch's errors
        raise CheckpointError(
            f"checkpoint{where} needs architecture '{name}', which is not installed; install the plugin "
            f"that provides it (see 'slim list archs')"
        )
    try:
        return create_arch(spec, int(meta["num_classes"]), tuple(meta["input_shape"]))
    except UsageError as exc:
        raise CheckpointError(f"cannot build architecture '{spec}'{where}: {exc}") from None


def build_model(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the model a checkpoint describes: registered arch → recorded widths → strict load.

    The model is returned on the CPU in eval mode.
    """
    spec = str(ckpt.meta["arch"])
    where = f" ({ckpt.path})" if ckpt.path else ""
    model = dense_model(ckpt)
    widths = ckpt.widths or {}
    narrower = False
    for bn_name, kept in widths.items():
        try:
            bn = model.get_submodule(bn_name)
        except AttributeError:
            raise CheckpointError(
                f"checkpoint{where} records a width for '{bn_name}', which architecture '{spec}' does not "
                f"have; the arch plugin changed since it was written"
            ) from None
        full = getattr(bn, "num_features", None)
        if full is None or int(kept) > full:
            raise CheckpointError(
                f"checkpoint{where} keeps {kept} channels of '{bn_name}', which has {full}; "
                f"the arch plugin changed since it was written"
            )
        narrower |= int(kept) < full
    if narrower:
        shape = tuple(int(d) for d in ckpt.meta["input_shape"])
        coupling = str(ckpt.meta.get("coupling") or "select")  # before coupled groups: one BN at a time
        keep = ckpt.meta.get("keep")
        if keep is not None and not isinstance(keep, dict):
            raise CheckpointError(f"slim.keep of checkpoint{where} must be a dict of BN name → channel mask, "
                                  f"got {type(keep).__name__}; the file was edited or damaged")
        try:
            masks = decode_keep(keep) if isinstance(keep, dict) else None
            rebuilt = apply_widths(model, {k: int(v) for k, v in widths.items()}, input_shape=shape,
                                   keep=masks, coupling=coupling)
        except PruneError as exc:
            raise CheckpointError(f"cannot rebuild the slim structure of checkpoint{where}: {exc}") from None
        model = rebuilt if isinstance(rebuilt, nn.Module) else model

    expected = model.state_dict()
    missing = [k for k in expected if k not in ckpt.tensors]
    unexpected = [k for k in ckpt.tensors if k not in expected]
    wrong = [
        f"{k} {tuple(ckpt.tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in ckpt.tensors and ckpt.tensors[k].shape != v.shape
    ]
    problems = fit_problems(wrong, missing, unexpected)
    if problems:
        raise CheckpointError(
            f"checkpoint{where} does not fit architecture '{spec}' ({'; '.join(problems)}); "
            f"it was written by a different version of that arch"
        )
    model.load_state_dict(ckpt.tensors, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------
# preprocessing and evaluation
# --------------------------------------------------------------------------------------
class Normalizer:
    """uint8 images → float32 ``(x/255 − mean)/std``, as one fused multiply-add per batch."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool = False) -> None:
        m = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        s = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * s)
        self.shift = -m / s
        self.channels_last = channels_last

    def __call__(self, x: Tensor) -> Tensor:
        out = torch.addcmul(self.shift, x.to(torch.float32), self.scale)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def normalization_of(meta: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` recorded in a checkpoint's ``slim.normalization``, or None."""
    norm = meta.get("normalization")
    if isinstance(norm, Mapping) and norm.get("mean") and norm.get("std"):
        return [float(m) for m in norm["mean"]], [float(s) for s in norm["std"]]
    return None


@torch.no_grad()
def evaluate_tensors(
    net: nn.Module, images: Tensor, labels: Tensor, normalize: Normalizer, batch_size: int = EVAL_BATCH,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split (one host sync at the end).

    The one evaluation loop: the training engine calls it every epoch and :func:`evaluate`
    for ``slim prune --eval`` and the demo, so their numbers agree for the same weights.
    ``amp_dtype`` is the autocast dtype (None: float32).
    """
    net.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for i in range(0, len(labels), batch_size):
        x, y = normalize(images[i : i + batch_size]), labels[i : i + batch_size]
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = max(len(labels), 1)
    return loss_sum.item() / n, correct.item() / n


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
    dataset = create_dataset(dataset_spec)
    images, labels = data if data is not None else dataset.load(split, Path(data_dir) if data_dir else None)
    if len(labels) == 0:
        raise DataError(f"dataset {dataset.spec} has an empty {split} split; nothing to evaluate")
    dev = torch.device(device)
    mean, std = normalization if normalization is not None else (dataset.mean, dataset.std)
    model.to(dev)
    return evaluate_tensors(model, images.to(dev), labels.to(dev), Normalizer(mean, std, dev), batch_size)


# --------------------------------------------------------------------------------------
# BatchNorm recalibration data
# --------------------------------------------------------------------------------------
#: Batch size of the recalibration passes (the cumulative average weights batches equally).
CALIBRATION_BATCH = 256


def calibration_images(
    dataset_spec: str, n: int, *, seed: int = 0, data_dir: str | os.PathLike[str] | None = None
) -> Tensor:
    """``n`` training images (uint8) of a dataset: a random subset drawn with ``seed``, no
    augmentation (the test-time view of the data). Never downloads; a dataset that is not on
    disk is a :class:`DataError`. Fewer images than ``n`` in the split: all of them."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"the number of recalibration images must be an integer >= 1, got {n!r}")
    dataset = create_dataset(dataset_spec)
    with no_downloads():
        images, _ = dataset.load("train", Path(data_dir) if data_dir else None)
    if len(images) == 0:
        raise DataError(f"dataset {dataset.spec} has an empty train split; nothing to recalibrate on")
    if n >= len(images):
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:n]]


def recalibrate(
    model: nn.Module, images: Tensor, normalization: tuple[Sequence[float], Sequence[float]],
    device: str | torch.device = "cpu", batch_size: int = CALIBRATION_BATCH,
) -> int:
    """Re-estimate ``model``'s BatchNorm statistics in place on uint8 ``images`` normalised with
    ``normalization`` (mean, std), in batches of ``batch_size``; see
    :func:`slimcli.prune.recalibrate_batchnorm`. Returns the number of images used."""
    dev = torch.device(device)
    model.to(dev)
    normalize = Normalizer(*normalization, dev)
    batches = (normalize(images[i : i + batch_size].to(dev)) for i in range(0, len(images), batch_size))
    return recalibrate_batchnorm(model, batches)


__all__ = [
    "CALIBRATION_BATCH",
    "EVAL_BATCH",
    "Normalizer",
    "build_model",
    "calibration_images",
    "dense_model",
    "evaluate",
    "evaluate_tensors",
    "normalization_of",
    "recalibrate",
]
