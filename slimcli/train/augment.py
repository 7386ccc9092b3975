"""Batch augmentation on the training device (normalisation is :class:`slimcli.model.Normalizer`).

The dataset stays on the device as uint8 (4× smaller than float, and no host→device copy per
step). A batch is augmented with one indexing operation: pad once, draw a crop offset and a
flip bit per image, and gather every pixel of every crop at once — no per-sample Python, no
DataLoader workers, the same code on CPU and CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(x: Tensor, crop_pad: int, hflip: bool, generator: torch.Generator) -> Tensor:
    """Pad-``crop_pad`` random crop and random horizontal flip of a whole N×C×H×W batch.

    Equivalent to torchvision's ``RandomCrop(H, padding=crop_pad)`` (zero padding) followed by
    ``RandomHorizontalFlip()`` applied to each image; ``generator`` lives on ``x.device``.
    """
    n, c, h, w = x.shape
    dev = x.device
    # Three draws per batch in a fixed order, whatever the options, so the random stream (and
    # a resumed run) does not depend on which augmentations are on.
    oy = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator, device=dev)
    flip = torch.randint(0, 2, (n,), generator=generator, device=dev, dtype=torch.bool)
    if crop_pad == 0 and not hflip:
        return x
    if crop_pad > 0:
        x = F.pad(x, (crop_pad, crop_pad, crop_pad, crop_pad))
    else:
        oy.zero_()
        ox.zero_()
    rows = oy[:, None] + torch.arange(h, device=dev)  # n×h source row of each output row
    cols = ox[:, None] + torch.arange(w, device=dev)  # n×w source column of each output column
    if hflip:
        # a flipped crop reads its columns right to left
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(c, device=dev)[None, :, None, None]
    return x[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]
