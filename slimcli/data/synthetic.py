"""synthetic: seeded class-conditional images generated in memory, for tests and benchmarks.

Each class has a smooth random template (a 4×4 grid of Gaussian values per channel,
upsampled bicubically); an image is ``128 + 40·c·template + b + noise`` with a per-image
contrast c ~ U(0.7, 1.3), brightness b ~ U(−20, 20) and pixel noise N(0, 40²), rounded and
clipped to uint8. The same options always give the same bytes, a small net learns it
quickly, and nothing is read from or written to disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slimcli.data import Dataset
from slimcli.registry import Option, register_dataset

AMPLITUDE = 40.0
NOISE = 40.0
CONTRAST = (0.7, 1.3)
BRIGHTNESS = 20.0
GRID = 4
CHUNK = 4096  # images generated at once: bounds the float32 scratch memory for large n


@register_dataset("synthetic")
class Synthetic(Dataset):
    """Seeded class-conditional images (smooth per-class templates + noise), generated in memory."""

    options = (
        Option("n", int, 1024, "training images", check=lambda v: v >= 1, rule=">= 1"),
        Option("n_test", int, 256, "test images", check=lambda v: v >= 1, rule=">= 1"),
        Option("size", int, 32, "image height and width", check=lambda v: 4 <= v <= 1024, rule="4 to 1024"),
        Option("channels", int, 3, "image channels", check=lambda v: 1 <= v <= 64, rule="1 to 64"),
        Option("classes", int, 10, "number of classes", check=lambda v: 2 <= v <= 10_000, rule="2 to 10000"),
        Option("seed", int, 0, "generator seed", check=lambda v: v >= 0, rule=">= 0"),
    )
    n: int
    n_test: int
    size: int
    channels: int
    seed: int

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # the option 'classes' is a count; the dataset attribute 'classes' is the list of names
        self.num_classes = int(options.get("classes", 10))
        self.classes = [f"class{i}" for i in range(self.num_classes)]
        self.input_shape = (self.channels, self.size, self.size)
        self.augment = {"crop_pad": self.size // 8, "hflip": True}  # CIFAR's pad 4 at size 32
        self._templates = self._make_templates()
        self.mean, self.std = self._moments()

    def _make_templates(self) -> np.ndarray:
        """One smooth zero-mean, unit-variance pattern per class: classes × C × size × size float32."""
        rng = np.random.default_rng([self.seed, 0])
        coarse = torch.from_numpy(rng.standard_normal((self.num_classes, self.channels, GRID, GRID)))
        smooth = F.interpolate(coarse, size=(self.size, self.size), mode="bicubic", align_corners=False)
        smooth = smooth - smooth.mean(dim=(1, 2, 3), keepdim=True)
        smooth = smooth / smooth.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return smooth.to(torch.float32).numpy()

    def _moments(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the generating distribution (classes equally likely, no clipping)."""
        lo, hi = CONTRAST
        c2 = ((lo + hi) / 2) ** 2 + (hi - lo) ** 2 / 12  # E[c²]
        t = self._templates.astype(np.float64)
        m1 = t.mean(axis=(0, 2, 3))
        m2 = (t**2).mean(axis=(0, 2, 3))
        mean = 128 + AMPLITUDE * m1 * (lo + hi) / 2
        var = AMPLITUDE**2 * (c2 * m2 - ((lo + hi) / 2 * m1) ** 2) + BRIGHTNESS**2 / 3 + NOISE**2
        return tuple(float(round(m / 255, 4)) for m in mean), tuple(
            float(round(np.sqrt(v) / 255, 4)) for v in var
        )

    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        """Generate ``split`` (``n`` or ``n_test`` images); ``root`` is ignored."""
        self.check_split(split)
        count = self.n if split == "train" else self.n_test
        rng = np.random.default_rng([self.seed, 1 if split == "train" else 2])
        labels = rng.permutation(np.arange(count) % self.num_classes)  # balanced up to one image per class
        images = np.empty((count, *self.input_shape), dtype=np.uint8)
        for start in range(0, count, CHUNK):
            y = labels[start : start + CHUNK]
            m = len(y)
            contrast = rng.uniform(*CONTRAST, size=(m, 1, 1, 1)).astype(np.float32)
            brightness = rng.uniform(-BRIGHTNESS, BRIGHTNESS, size=(m, 1, 1, 1)).astype(np.float32)
            noise = rng.standard_normal((m, *self.input_shape), dtype=np.float32) * NOISE
            x = 128 + AMPLITUDE * contrast * self._templates[y] + brightness + noise
            np.clip(np.rint(x), 0, 255, out=x)
            images[start : start + m] = x
        return self.to_tensors(images, labels, "synthetic")
