"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from the official "python version" files.

The layout is the one in the official archives and the one torchvision writes, so
existing downloads are found: ``cifar-10-batches-py/{data_batch_1..5, test_batch,
batches.meta}`` and ``cifar-100-python/{train, test, meta}``. Each batch is a pickled dict
whose ``data`` is an N×3072 uint8 array (1024 red, 1024 green, 1024 blue values, each
plane row-major) and whose ``labels`` (``fine_labels`` for CIFAR-100) is a list of ints.
The pickles are read with an unpickler that can build only dicts, lists, strings, bytes,
numbers and numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from slimcli.data import Dataset
from slimcli.data._download import download_file, extract_tar
from slimcli.data._paths import candidate_dirs, download_root, find_dir, one_of, show, user_roots
from slimcli.errors import DataError
from slimcli.registry import register_dataset

# the function numpy's ndarray.__reduce__ names, whatever numpy module it lives in this version
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # files written with numpy < 2 (all CIFAR)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # files re-pickled with numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes in protocol-2 pickles
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the few globals a CIFAR batch needs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_batch(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict with ``str`` keys (the files were written by Python 2)."""
    try:
        with open(path, "rb") as f:
            # latin1 is numpy's documented way to read Python 2 pickles of arrays
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise DataError(
            f"{path} is not a CIFAR batch ({type(exc).__name__}: {exc}); delete it and retry"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch (it holds a {type(obj).__name__}, not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise DataError(f"{path} has no '{key}' entry; it is not a {path.parent.name} file")
    return batch[key]


class _Cifar(Dataset):
    """Shared reader and downloader of the two CIFAR datasets."""

    folder: ClassVar[str]
    url: ClassVar[str]
    md5: ClassVar[str]
    split_files: ClassVar[dict[str, tuple[str, ...]]]
    label_key: ClassVar[str]
    meta_file: ClassVar[str]
    meta_key: ClassVar[str]

    num_classes: int
    input_shape = (3, 32, 32)
    augment: ClassVar[dict[str, Any]] = {"crop_pad": 4, "hflip": True}  # the paper's augmentation

    def load(self, split: str, root: Path | None = None) -> tuple[Tensor, Tensor]:
        """The official train (50,000) or test (10,000) images, downloading them if missing."""
        self.check_split(split)
        need = self.split_files[split]
        roots = user_roots(root)
        folder = find_dir(
            candidate_dirs(roots, (self.folder,)), lambda d: all((d / f).is_file() for f in need)
        )
        if folder is None:
            folder = self._fetch(roots, need)
        self._check_meta(folder)
        data, labels = [], []
        for name in need:
            path = folder / name
            batch = read_batch(path)
            x = _field(batch, "data", path)
            y = np.asarray(_field(batch, self.label_key, path))
            if (
                not isinstance(x, np.ndarray)
                or x.dtype != np.uint8
                or x.ndim != 2
                or x.shape[1] != 3 * 32 * 32
            ):
                got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
                raise DataError(f"{path}: 'data' must be an N×3072 uint8 array, found {got}")
            if y.shape != (len(x),):
                raise DataError(f"{path}: {len(x)} images but {y.size} labels; the file is corrupt")
            data.append(x)
            labels.append(y)
        images = np.concatenate(data).reshape(-1, 3, 32, 32)
        return self.to_tensors(images, np.concatenate(labels), folder)

    def _check_meta(self, folder: Path) -> None:
        """If the meta file is there, its class names must be ours (catches swapped folders)."""
        path = folder / self.meta_file
        if not path.is_file():
            return
        names = [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in _field(read_batch(path), self.meta_key, path)
        ]
        if names != self.classes:
            raise DataError(f"{path} lists classes {names[:4]}…, not the {self.name} classes; wrong folder?")

    def _fetch(self, roots: list[Path], need: tuple[str, ...]) -> Path:
        archive = self.url.rsplit("/", 1)[-1]
        files = ", ".join(need)
        hint = (
            f"Download {self.url} and extract it into {one_of(roots)} "
            f"(it makes {self.folder}/ with {files}), or pass --data-dir DIR"
        )
        missing = f"{self.name}: {files} not found in any of {show(candidate_dirs(roots, (self.folder,)))}"
        target = download_root(roots, missing, hint)
        download_file(self.url, target / archive, self.md5, hint=hint)
        extract_tar(target / archive, self.folder, target / self.folder)
        (target / archive).unlink(missing_ok=True)  # the extracted folder is the download we keep
        folder = target / self.folder
        absent = [f for f in need if not (folder / f).is_file()]
        if absent:
            raise DataError(f"{self.url} did not contain {', '.join(absent)}; it is not the official archive")
        return folder


@register_dataset("cifar10")
class Cifar10(_Cifar):
    """CIFAR-10: 32×32 colour images, 10 classes, 50,000 train / 10,000 test (downloaded if missing)."""

    folder = "cifar-10-batches-py"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    md5 = "c58f30108f718f92721af3b95e74349a"
    split_files: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    }
    label_key = "labels"
    meta_file = "batches.meta"
    meta_key = "label_names"
    num_classes = 10
    classes: ClassVar[list[str]] = [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]  # fmt: skip
    # the paper's normalisation (its reference code's constants; std is the mean per-image std)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2023, 0.1994, 0.2010)


@register_dataset("cifar100")
class Cifar100(_Cifar):
    """CIFAR-100: 32×32 colour images, 100 classes, 50,000 train / 10,000 test (downloaded if missing)."""

    folder = "cifar-100-python"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    split_files: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("train",), "test": ("test",)}
    label_key = "fine_labels"
    meta_file = "meta"
    meta_key = "fine_label_names"
    num_classes = 100
    classes: ClassVar[list[str]] = [
        "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
        "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
        "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
        "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
        "kangaroo", "keyboard",
        "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
        "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
        "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
        "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
        "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
        "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
        "willow_tree", "wolf", "woman", "worm",
    ]  # fmt: skip
    # per-channel mean and pixel std of the 50,000 training images
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
