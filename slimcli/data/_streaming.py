"""Per-image access for the streaming loader: a split read one sample at a time.

The device-resident path (``Dataset.load``: a whole split as one uint8 tensor) is the fast
path for small sets. A set too large for the device, or one asked to stream
(``--no-data-on-device``), is read through a :class:`SampleSource` instead: ``get(i, rng)``
returns image ``i`` as uint8 C×H×W, augmented with ``rng`` for training (``None``: the
deterministic evaluation view). The training engine calls it from DataLoader worker processes.

Augmentation randomness comes from :func:`sample_rng` — a generator seeded by (run seed,
epoch, image index) — so the images of an epoch are the same whatever the number of workers
or ranks, and a resumed run sees the same crops.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of image ``index`` in ``epoch`` of a run seeded ``seed``."""
    return np.random.default_rng([seed % 2**63, epoch, index])


class SampleSource:
    """One split, image by image: ``len``, ``labels`` (int64, N) and ``get``."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        """Image ``index`` as contiguous uint8 C×H×W; augmented with ``rng`` unless it is ``None``."""
        raise NotImplementedError


class TensorSource(SampleSource):
    """A split already in memory (``Dataset.load``), augmented per image the way the resident
    path augments a batch: random crop after zero-padding by ``crop_pad``, random flip."""

    def __init__(self, images: Tensor, labels: Tensor, crop_pad: int, hflip: bool) -> None:
        self.images = images.cpu().numpy()
        self.labels = labels.cpu().numpy().astype(np.int64, copy=False)
        self.crop_pad, self.hflip = int(crop_pad), bool(hflip)

    def get(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        x = self.images[index]
        if rng is None:
            return np.ascontiguousarray(x)
        p = self.crop_pad
        oy, ox, flip = rng.integers(0, 2 * p + 1), rng.integers(0, 2 * p + 1), rng.integers(0, 2)
        if p:
            c, h, w = x.shape
            padded = np.zeros((c, h + 2 * p, w + 2 * p), dtype=x.dtype)
            padded[:, p : p + h, p : p + w] = x
            x = padded[:, oy : oy + h, ox : ox + w]
        if self.hflip and flip:
            x = x[:, :, ::-1]
        return np.ascontiguousarray(x)


__all__ = ["SampleSource", "TensorSource", "sample_rng"]
