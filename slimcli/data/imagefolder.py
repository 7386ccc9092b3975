"""imagefolder: your own images in the ImageFolder layout, read with Pillow.

``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>`` (``test/`` is accepted for
``val/``); class names are the sorted sub-folder names of ``train/`` and are recorded in the
checkpoint (``slim.classes``) and the ONNX metadata. Common formats (JPEG, PNG, BMP, GIF,
TIFF, WebP, PPM/PGM) are converted to RGB.

Training images get the ImageNet-style augmentation when they stream (random-resized crop,
area 8–100 %, aspect 3/4–4/3, then a random horizontal flip); evaluation resizes the shorter
side to ``size / 0.875`` and takes the centre ``size × size`` crop. A folder small enough for
the device (at most :data:`DEVICE_LIMIT_BYTES` at ``size``) is decoded once with the evaluation
transform and trained on the device (random pad-crop by ``size / 8`` and flip, the fast path);
a larger one streams through DataLoader workers. ``--data-on-device/--no-data-on-device``
overrides the choice. Normalisation statistics are ``mean``/``std`` when given
(``0.485/0.456/0.406`` or ``imagenet``), else measured on ``stats`` training images spread
over the split.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from slimcli.data import Dataset
from slimcli.data._streaming import SampleSource
from slimcli.errors import DataError, UsageError
from slimcli.registry import Option, register_dataset

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
#: decoded uint8 training images above this size stream instead of living on the device
DEVICE_LIMIT_BYTES = 2 * 2**30
#: evaluation resize: shorter side = size / CROP_FRACTION, then a centre crop of ``size``
CROP_FRACTION = 0.875
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError('imagefolder reads images with Pillow: pip install "slim-prune[images]"') from None
    return Image


def _triple(text: str, name: str, default: tuple[float, ...]) -> tuple[float, ...] | None:
    if not text:
        return None
    if text == "imagenet":
        return default
    try:
        values = tuple(float(v) for v in text.split("/"))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 < v < 1 for v in values):
        raise UsageError(f"imagefolder: {name} must be three values in (0, 1) separated by '/' "
                         f"(e.g. {name}={'/'.join(map(str, default))}) or 'imagenet', got {text!r}")
    return values


def _rrc_box(rng: np.random.Generator, w: int, h: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): 10 tries, then the centre."""
    area = w * h
    log_ratio = np.log(RATIO)
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        cw, ch = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return left, top, left + cw, top + ch
    ratio = w / h
    if ratio < RATIO[0]:
        cw, ch = w, round(w / RATIO[0])
    elif ratio > RATIO[1]:
        cw, ch = round(h * RATIO[1]), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return left, top, left + cw, top + ch


class FolderSource(SampleSource):
    """The files of one split, decoded on demand (picklable: DataLoader workers get a copy)."""

    def __init__(self, files: list[str], labels: list[int], size: int) -> None:
        self.files, self.size = files, size
        self.labels = np.asarray(labels, dtype=np.int64)

    def get(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        Image = _pil()
        path, size = self.files[index], self.size
        try:
            with Image.open(path) as img:
                if rng is None:
                    short = round(size / CROP_FRACTION)
                    img.draft("RGB", (short, short))  # JPEG: decode at a reduced scale that still covers it
                    img = img.convert("RGB")
                    w, h = img.size
                    scale = short / min(w, h)
                    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
                    img = img.resize((rw, rh), Image.BILINEAR)
                    left, top = (rw - size) // 2, (rh - size) // 2
                    img = img.crop((left, top, left + size, top + size))
                else:
                    img = img.convert("RGB")
                    box = _rrc_box(rng, *img.size)
                    img = img.resize((size, size), Image.BILINEAR, box=box)
                    if rng.integers(0, 2):
                        img = img.transpose(Image.FLIP_LEFT_RIGHT)
                x = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}; delete or replace the file") from exc
        return np.ascontiguousarray(x.transpose(2, 0, 1))


@register_dataset("imagefolder")
class ImageFolder(Dataset):
    """Images in DIR/train/<class>/ and DIR/val/<class>/ (Pillow), resized to size×size."""

    options = (
        Option("path", str, "", "the folder holding train/ and val/ (recorded as an absolute path)"),
        Option("size", int, 224, "image height and width after cropping",
               check=lambda v: 8 <= v <= 1024, rule="8 to 1024"),
        Option("mean", str, "", "per-channel mean r/g/b in [0, 1] or 'imagenet' [default: measured]"),
        Option("std", str, "", "per-channel std r/g/b in [0, 1] or 'imagenet' [default: measured]"),
        Option("stats", int, 512, "training images the statistics are measured on",
               check=lambda v: v >= 1, rule=">= 1"),
    )
    path: str
    size: int
    stats: int

    def __init__(self, **options: Any) -> None:
        if not options.get("path"):
            raise UsageError("imagefolder needs the folder: --dataset imagefolder:path=DIR[,size=224]")
        folder = Path(os.path.expanduser(str(options["path"]))).resolve()
        options["path"] = str(folder)  # the checkpoint records where the images are
        # 'mean' and 'std' name the statistics attributes too: keep them out of setattr
        super().__init__(**{k: v for k, v in options.items() if k not in ("mean", "std")})
        self.spec_options = options
        self.folder = folder
        self._given = (_triple(options.get("mean", ""), "mean", IMAGENET_MEAN),
                       _triple(options.get("std", ""), "std", IMAGENET_STD))
        self.input_shape = (3, self.size, self.size)
        self.augment = {"crop_pad": self.size // 8, "hflip": True}  # the device-resident fast path
        train = self._split_dir("train")
        self.classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
        if len(self.classes) < 2:
            raise DataError(f"{train} needs one sub-folder per class (at least 2), found {len(self.classes)}")
        self.num_classes = len(self.classes)
        self._files: dict[str, tuple[list[str], list[int]]] = {}

    def _split_dir(self, split: str) -> Path:
        names = ("train",) if split == "train" else ("val", "test")
        for name in names:
            if (self.folder / name).is_dir():
                return self.folder / name
        raise DataError(f"{self.folder} has no {' or '.join(n + '/' for n in names)} folder; the layout is "
                        f"DIR/train/<class>/<image> and DIR/val/<class>/<image>")

    def files(self, split: str) -> tuple[list[str], list[int]]:
        """Sorted image paths of ``split`` and their class indices (scanned once)."""
        self.check_split(split)
        if split not in self._files:
            base = self._split_dir(split)
            index = {c: i for i, c in enumerate(self.classes)}
            paths: list[str] = []
            labels: list[int] = []
            for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if d.name not in index:
                    raise DataError(f"{d} is a class that {base.parent / 'train'} does not have; "
                                    f"every {base.name}/ class needs a train/ folder of the same name")
                names = sorted(e.name for e in os.scandir(d)
                               if e.is_file() and os.path.splitext(e.name)[1].lower() in EXTENSIONS)
                paths += [str(d / n) for n in names]
                labels += [index[d.name]] * len(names)
            if not paths:
                kinds = ", ".join(sorted(EXTENSIONS))
                raise DataError(f"{base} holds no images ({kinds}) in class sub-folders")
            self._files[split] = (paths, labels)
        return self._files[split]

    def source(self, split: str, root: Path | None = None) -> FolderSource:
        """``split`` file by file: training views get the random-resized crop and flip."""
        paths, labels = self.files(split)
        return FolderSource(paths, labels, self.size)

    def too_large_for_device(self, root: Path | None = None) -> bool:
        return len(self.files("train")[0]) * 3 * self.size**2 > DEVICE_LIMIT_BYTES

    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        """The whole split decoded with the evaluation transform (threads: Pillow releases the GIL)."""
        src = self.source(split, root)
        images = np.empty((len(src), *self.input_shape), dtype=np.uint8)

        def read(i: int) -> None:
            images[i] = src.get(i, None)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(read, range(len(src))))
        return self.to_tensors(images, src.labels, self.folder / split)

    @cached_property
    def _moments(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean, std = self._given
        if mean is not None and std is not None:
            return mean, std
        src = self.source("train")
        idx = np.unique(np.linspace(0, len(src) - 1, min(self.stats, len(src))).round().astype(int))
        s1 = np.zeros(3)
        s2 = np.zeros(3)
        for i in idx:
            x = src.get(int(i), None).reshape(3, -1).astype(np.float64) / 255
            s1 += x.mean(1)
            s2 += (x**2).mean(1)
        m = s1 / len(idx)
        sd = np.sqrt(np.maximum(s2 / len(idx) - m**2, 1e-8))
        measured = tuple(float(round(v, 4)) for v in m), tuple(float(round(max(v, 1e-4), 4)) for v in sd)
        return mean or measured[0], std or measured[1]

    @property  # type: ignore[override]
    def mean(self) -> tuple[float, ...]:
        return self._moments[0]

    @property  # type: ignore[override]
    def std(self) -> tuple[float, ...]:
        return self._moments[1]


__all__ = ["CROP_FRACTION", "DEVICE_LIMIT_BYTES", "FolderSource", "ImageFolder"]
