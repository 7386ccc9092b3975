"""MNIST and Fashion-MNIST from their official gzipped IDX files.

IDX (LeCun's format): two zero bytes, a type byte (0x08 = unsigned byte), the number of
dimensions, each dimension as a big-endian uint32, then the values in row-major order.
Images have magic number 2051 (N×28×28), labels 2049 (N). Files are found gzipped or
already decompressed (torchvision's ``raw/`` folders keep both), in ``fashion-mnist/`` or
``FashionMNIST/raw/`` (``mnist/`` or ``MNIST/raw/``) under each search root, and, for
Fashion-MNIST, in Debian's ``/usr/share/datasets/fashion-mnist`` (package
``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from slimcli.data import Dataset
from slimcli.data._download import download_file
from slimcli.data._paths import candidate_dirs, download_root, find_dir, one_of, show, user_roots
from slimcli.errors import DataError
from slimcli.registry import register_dataset

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _gunzip(raw: bytes) -> bytes:
    # zlib in one call is faster than gzip.decompress; the latter handles multi-member files
    z = zlib.decompressobj(wbits=31)
    out = z.decompress(raw)
    if not z.eof:
        raise EOFError("compressed data ended before the end-of-stream marker")
    return out if not z.unused_data else gzip.decompress(raw)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array stored in an IDX file (gzipped or not), after checking its header and size."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by file name
        try:
            raw = _gunzip(raw)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise DataError(
                f"{path} is a damaged gzip file ({exc}); delete it and download it again"
            ) from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataError(f"{path} is not an IDX file with magic number {magic} (found {found})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; delete it and download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        what = "truncated" if len(raw) - header < size else "longer than its header says"
        raise DataError(
            f"{path} is {what} ({len(raw) - header} data bytes for shape {dims}); "
            "delete it and download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(dims)


def _locate(folder: Path, stem: str) -> Path | None:
    """``stem.gz`` or ``stem`` in ``folder``, whichever exists (gzipped preferred: it is the original)."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×28×28) and labels (N) of ``split`` from the IDX files in ``folder``."""
    images_stem, labels_stem = SPLIT_FILES[split]
    images_path, labels_path = _locate(folder, images_stem), _locate(folder, labels_stem)
    if images_path is None or labels_path is None:
        raise DataError(f"{folder} lacks {images_stem}.gz or {labels_stem}.gz")
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
        raise DataError(
            f"{images_path}: expected N×28×28 images and N labels, found {images.shape} and {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} files")
    return images, labels


class _Idx(Dataset):
    """Shared reader and downloader of the 28×28 grey-level IDX datasets."""

    folders: ClassVar[tuple[str, ...]]  # sub-folders of each search root, ours first
    system_roots: ClassVar[tuple[Path, ...]] = ()  # read-only roots searched after the user's ones
    base_url: ClassVar[str]
    md5s: ClassVar[dict[str, str]]  # file name (.gz) -> md5 published by the authors

    num_classes = 10
    input_shape = (1, 28, 28)

    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        """The official train (60,000) or test (10,000) images, downloading them if missing."""
        self.check_split(split)
        stems = SPLIT_FILES[split]
        roots = user_roots(root)
        dirs = candidate_dirs([*roots, *self.system_roots], self.folders)
        folder = find_dir(dirs, lambda d: all(_locate(d, s) is not None for s in stems))
        if folder is None:
            folder = self._fetch(roots, dirs, stems)
        images, labels = read_idx_pair(folder, split)
        return self.to_tensors(images[:, None], labels, folder)

    def _fetch(self, roots: list[Path], dirs: list[Path], stems: tuple[str, ...]) -> Path:
        files = ", ".join(s + ".gz" for s in stems)
        hint = (
            f"Download {files} from {self.base_url} into "
            f"{one_of(r / self.folders[0] for r in roots)}, or pass --data-dir DIR"
        )
        missing = f"{self.name}: {files} not found in any of {show(dirs)}"
        target = download_root(roots, missing, hint)
        folder = target / self.folders[0]
        for stem in stems:
            if _locate(folder, stem) is None:
                name = stem + ".gz"
                download_file(self.base_url + name, folder / name, self.md5s[name], hint=hint)
        return folder


@register_dataset("mnist")
class Mnist(_Idx):
    """MNIST: 28×28 grey handwritten digits, 60,000 train / 10,000 test (downloaded if missing)."""

    folders = ("mnist", "MNIST/raw")
    base_url = "https://ossci-datasets.s3.amazonaws.com/mnist/"
    md5s: ClassVar[dict[str, str]] = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    classes: ClassVar[list[str]] = [str(d) for d in range(10)]
    mean = (0.1307,)
    std = (0.3081,)
    # digits are not mirror-symmetric (a flipped 2 is no 2): small shifts only
    augment: ClassVar[dict[str, Any]] = {"crop_pad": 2, "hflip": False}


@register_dataset("fashion-mnist")
class FashionMnist(_Idx):
    """Fashion-MNIST (Zalando): 28×28 grey clothing images, 10 classes, 60,000 train / 10,000 test."""

    folders = ("fashion-mnist", "FashionMNIST/raw")
    system_roots = (Path("/usr/share/datasets"),)  # Debian: apt-get install dataset-fashion-mnist
    base_url = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    md5s: ClassVar[dict[str, str]] = {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    classes: ClassVar[list[str]] = [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip
    # computed from the 60,000 training images (tests/test_data.py recomputes them)
    mean = (0.2860,)
    std = (0.3530,)
    # clothes are roughly mirror-symmetric, so flips are label-preserving
    augment: ClassVar[dict[str, Any]] = {"crop_pad": 2, "hflip": True}
