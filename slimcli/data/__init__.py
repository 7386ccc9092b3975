"""Datasets: the :class:`Dataset` base class and :func:`create_dataset`.

Each dataset is a plugin class (one module per family in this package) registered with
``@register_dataset``. A dataset describes itself (``num_classes``, ``input_shape``,
``classes``, ``mean``, ``std``, ``augment``) and ``load`` returns a whole split as a uint8
image tensor N×C×H×W and int64 labels: the training engine keeps both on the device and
normalises and augments there, so nothing here is per-sample Python. Files are searched for
in ``root``, ``$SLIM_DATA``, ``~/.cache/slim`` and system folders; missing files are
downloaded (md5-checked) unless ``SLIM_OFFLINE=1``. See docs/datasets.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from slimcli.data._paths import OFFLINE_ENV
from slimcli.data._streaming import SampleSource, TensorSource, sample_rng
from slimcli.errors import DataError, UsageError
from slimcli.registry import DATASETS, Option, Spec

SPLITS = ("train", "test")


class Dataset:
    """Base class: a labelled image dataset with a train and a test split.

    Subclasses set the class attributes (or set them in ``__init__`` when they depend on
    options) and implement ``load``. Options declared in ``options`` arrive as attributes.
    """

    name: ClassVar[str] = "?"
    options: ClassVar[tuple[Option, ...]] = ()
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    classes: list[str]
    #: per-channel mean and std of the training images, in [0, 1] pixel units
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: training augmentation the engine applies: random crop after zero-padding by ``crop_pad``
    #: pixels (0 = none) and random horizontal flips
    augment: dict[str, Any]

    def __init__(self, **options: Any) -> None:
        self.spec_options = options
        for key, value in options.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"

    @property
    def spec(self) -> str:
        """The canonical spec string of this dataset (its name and non-default options)."""
        return str(DATASETS.parse(self.name, **self.spec_options))

    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        """The whole ``split`` ("train" or "test"): uint8 images N×C×H×W and int64 labels N."""
        raise NotImplementedError

    def too_large_for_device(self, root: Path | None = None) -> bool:
        """Whether the training split is too large to keep on the device (then it streams
        through DataLoader workers, see :class:`SampleSource`). Default: no."""
        return False

    def source(self, split: str, root: Path | None = None) -> SampleSource:
        """``split`` image by image for the streaming loader; default: :meth:`load` held in
        memory, augmented per image like the resident path (pad-crop, flip)."""
        images, labels = self.load(split, root)
        aug = getattr(self, "augment", {}) or {}
        return TensorSource(images, labels, int(aug.get("crop_pad", 0)), bool(aug.get("hflip", False)))

    # helpers for subclasses -----------------------------------------------------------
    def check_split(self, split: str) -> None:
        """Raise a usage error unless ``split`` is "train" or "test"."""
        if split not in SPLITS:
            raise UsageError(f"{self.name}: unknown split {split!r}; use 'train' or 'test'")

    def to_tensors(self, images: np.ndarray, labels: np.ndarray, source: object) -> tuple[Tensor, Tensor]:
        """Check shapes, dtypes and label range of arrays read from ``source`` and wrap them as tensors."""
        n = len(labels)
        shape = (n, *self.input_shape)
        if images.dtype != np.uint8 or tuple(images.shape) != shape:
            raise DataError(
                f"{source}: expected uint8 images of shape {shape}, "
                f"found {images.dtype} {tuple(images.shape)}"
            )
        labels = np.asarray(labels)
        if labels.ndim != 1 or (n and (labels.min() < 0 or labels.max() >= self.num_classes)):
            raise DataError(
                f"{source}: labels must be integers in [0, {self.num_classes}); the file is corrupt"
            )
        # torch wants writable memory; arrays straight from np.frombuffer are read-only
        return (
            torch.from_numpy(np.require(images, requirements=["C", "W"])),
            torch.from_numpy(labels.astype(np.int64, copy=False)),
        )


def create_dataset(spec: str | Spec) -> Dataset:
    """Build the dataset named by ``spec`` (``NAME[:k=v,…]``, e.g. ``synthetic:n=512``)."""
    return DATASETS.create(spec)


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Forbid dataset downloads meanwhile (as ``SLIM_OFFLINE=1`` does), e.g. to read a split
    only if it is already on disk."""
    old = os.environ.get(OFFLINE_ENV)
    os.environ[OFFLINE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(OFFLINE_ENV, None)
        else:
            os.environ[OFFLINE_ENV] = old


__all__ = ["SPLITS", "Dataset", "SampleSource", "TensorSource", "create_dataset", "no_downloads",
           "sample_rng"]
