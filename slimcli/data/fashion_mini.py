"""fashion-mini: a small class-balanced subset of Fashion-MNIST shipped inside the package.

It needs no download, so ``slim demo`` and quick experiments run anywhere. The file
``_embedded/fashion-mini.npz`` (uint8 arrays, < 2 MB) is built by
``scripts/build_fashion_mini.py``: the first 350 training and the first 100 test images of
each class, in the order of the official files. Its ``meta`` entry (JSON bytes) records the
rule and the sha256 of the source files.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from slimcli.data import Dataset
from slimcli.data.mnist import FashionMnist
from slimcli.errors import DataError
from slimcli.registry import Option, register_dataset

TRAIN_PER_CLASS = 350


def _embedded() -> Any:
    return resources.files("slimcli.data") / "_embedded" / "fashion-mini.npz"


def read_embedded() -> dict[str, np.ndarray]:
    """Every array of the embedded file (``meta`` still as bytes)."""
    try:
        with _embedded().open("rb") as f, np.load(f, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"the embedded fashion-mini file is missing or damaged ({exc}); reinstall slim-prune"
        ) from exc


def embedded_meta() -> dict[str, Any]:
    """The provenance record stored in the embedded file."""
    return json.loads(read_embedded()["meta"].tobytes())


@register_dataset("fashion-mini")
class FashionMini(Dataset):
    """Fashion-MNIST subset shipped with slim: 28×28 grey, 10 classes, 3,500 train / 1,000 test."""

    options = (
        Option(
            "n_train",
            int,
            0,
            "train on a class-balanced prefix of this many images (0 = all 3,500)",
            check=lambda v: v == 0 or (v % 10 == 0 and 10 <= v <= 10 * TRAIN_PER_CLASS),
            rule=f"0, or a multiple of 10 in [10, {10 * TRAIN_PER_CLASS}]",
        ),
    )
    n_train: int

    num_classes = 10
    input_shape = (1, 28, 28)
    classes: ClassVar[list[str]] = list(FashionMnist.classes)
    # computed from the 3,500 embedded training images (tests/test_data.py recomputes them)
    mean = (0.2866,)
    std = (0.3539,)
    augment: ClassVar[dict[str, Any]] = dict(FashionMnist.augment)

    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        """The embedded images of ``split``; ``root`` is ignored (nothing is read from disk folders)."""
        self.check_split(split)
        arrays = read_embedded()
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if split == "train" and self.n_train:
            per_class = self.n_train // self.num_classes
            keep = np.sort(
                np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(self.num_classes)])
            )
            images, labels = images[keep], labels[keep]
        return self.to_tensors(images[:, None], labels, "the embedded fashion-mini file")
