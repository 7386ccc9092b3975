#!/usr/bin/env python3
"""Build slimcli/data/_embedded/fashion-mini.npz, the `fashion-mini` dataset shipped with slim.

Selection (deterministic, no randomness): the first TRAIN_PER_CLASS images of each class
of the Fashion-MNIST training file and the first TEST_PER_CLASS of each class of its test
file, in file order (the files are already shuffled), kept in file order. The npz holds
uint8 arrays only: train_images (N×28×28), train_labels, test_images, test_labels, and
``meta``, the UTF-8 bytes of a JSON document recording the rule, the counts and the
sha256 of the source files (of the .gz files and of their decompressed IDX content, which
is what identifies the data: Debian recompresses the archives).

Usage:
    python scripts/build_fashion_mini.py                  # from /usr/share/datasets/fashion-mnist
    python scripts/build_fashion_mini.py --source DIR     # a folder with the four official .gz files
    python scripts/build_fashion_mini.py --check          # rebuild in memory, compare with the shipped file
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from slimcli.data.mnist import SPLIT_FILES, FashionMnist, read_idx_pair

TRAIN_PER_CLASS = 350  # 3,500 training images: as many as fit in 2 MB with the test set
TEST_PER_CLASS = 100  # 1,000 test images: accuracy to 0.1 %
MAX_BYTES = 2_000_000
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "slimcli" / "data" / "_embedded" / "fashion-mini.npz"


def first_per_class(labels: np.ndarray, k: int, num_classes: int = 10) -> np.ndarray:
    """Indices of the first ``k`` items of every class, in file order."""
    picked = [np.flatnonzero(labels == c)[:k] for c in range(num_classes)]
    if any(len(p) < k for p in picked):
        raise SystemExit(f"the source has fewer than {k} images of some class")
    return np.sort(np.concatenate(picked))


def build(source: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    sha_gz: dict[str, str] = {}
    sha_idx: dict[str, str] = {}
    for split, k in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for stem in SPLIT_FILES[split]:
            gz = source / (stem + ".gz")
            sha_gz[gz.name] = hashlib.sha256(gz.read_bytes()).hexdigest()
            sha_idx[stem] = hashlib.sha256(gzip.decompress(gz.read_bytes())).hexdigest()
        images, labels = read_idx_pair(source, split)
        keep = first_per_class(labels, k)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[keep])
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[keep])
    train = arrays["train_images"].astype(np.float64) / 255
    meta = {
        "dataset": "fashion-mini",
        "source": "Fashion-MNIST (Zalando Research, MIT licence), https://github.com/zalandoresearch/fashion-mnist",
        "selection": "first k images of each class in file order, kept in file order",
        "train_per_class": TRAIN_PER_CLASS,
        "test_per_class": TEST_PER_CLASS,
        "classes": FashionMnist.classes,
        "source_gz_sha256": sha_gz,
        "source_idx_sha256": sha_idx,
        "train_mean": round(float(train.mean()), 4),
        "train_std": round(float(train.std()), 4),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta, indent=1).encode(), dtype=np.uint8)
    return arrays


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=Path("/usr/share/datasets/fashion-mnist"),
        help="folder with the four Fashion-MNIST .gz files",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--check", action="store_true", help="compare a fresh build with --out; write nothing"
    )
    args = parser.parse_args()
    arrays = build(args.source)
    meta = json.loads(arrays["meta"].tobytes())
    if args.check:
        with np.load(args.out, allow_pickle=False) as shipped:
            same = set(shipped.files) == set(arrays) and all(
                np.array_equal(shipped[k], v) and shipped[k].dtype == v.dtype for k, v in arrays.items()
            )
        print(f"{args.out}: {'identical to' if same else 'DIFFERS from'} a fresh build from {args.source}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".part.npz")
    np.savez_compressed(tmp, **arrays)
    size = tmp.stat().st_size
    if size > MAX_BYTES:
        tmp.unlink()
        raise SystemExit(f"{size} bytes is over the {MAX_BYTES}-byte budget; lower TRAIN_PER_CLASS")
    tmp.replace(args.out)
    print(
        f"wrote {args.out} ({size:,} bytes): {len(arrays['train_labels'])} train, "
        f"{len(arrays['test_labels'])} test; mean {meta['train_mean']}, std {meta['train_std']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
