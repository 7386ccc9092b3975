"""Datasets: the plugin contract, the CIFAR pickle and IDX readers on generated files, search
order, downloads (urllib monkeypatched: never the network), fashion-mini and synthetic."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _images import make_image_folder

from slimcli.data import create_dataset
from slimcli.data.cifar import Cifar10, Cifar100, read_batch
from slimcli.data.fashion_mini import embedded_meta
from slimcli.data.mnist import FashionMnist, Mnist, read_idx, read_idx_pair
from slimcli.errors import DataError, UsageError
from slimcli.registry import DATASETS
from slimcli.testing import check_dataset

REAL_HOME = Path.home()
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED = Path(__file__).resolve().parent.parent / "slimcli" / "data" / "_embedded" / "fashion-mini.npz"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real ~/.cache/slim, no $SLIM_DATA, no Debian folder, no downloads unless a test allows them."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SLIM_DATA", raising=False)
    monkeypatch.setenv("SLIM_OFFLINE", "1")
    monkeypatch.setattr(FashionMnist, "system_roots", ())


# ---------------------------------------------------------------------------------------------
# writers of the exact on-disk formats
# ---------------------------------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes and str the way Python 2's cPickle wrote its ``str``: the CIFAR files' dialect."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def write_pickle(path: Path, obj: Any, style: str = "py2") -> None:
    """``py2``: as the official files (protocol 2, Python 2 strings, numpy.core); else Python 3 protocol N."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if style == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        raw = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"numpy._core" not in raw
        path.write_bytes(raw)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(style[-1])))


def make_cifar10(root: Path, per_batch: int = 3, style: str = "py2", seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    out: dict[str, Any] = {}
    for split, names in Cifar10.split_files.items():
        data, labels = [], []
        for i, name in enumerate(names):
            x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            y = [int(v) for v in rng.integers(0, 10, per_batch)]
            batch = {
                b"batch_label": f"batch {i}".encode(),
                b"labels": y,
                b"data": x,
                b"filenames": [f"img{j}.png".encode() for j in range(per_batch)],
            }
            write_pickle(folder / name, batch, style)
            data.append(x)
            labels += y
        out[split] = (np.concatenate(data), np.array(labels))
    meta = {
        b"label_names": [c.encode() for c in Cifar10.classes],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    write_pickle(folder / "batches.meta", meta, style)
    return out


def make_cifar100(root: Path, n: int = 5, style: str = "py2", seed: int = 1) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    out: dict[str, Any] = {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        batch = {
            b"filenames": [b"a.png"] * n,
            b"batch_label": split.encode(),
            b"fine_labels": fine,
            b"coarse_labels": [v // 5 for v in fine],
            b"data": x,
        }
        write_pickle(folder / split, batch, style)
        out[split] = (x, np.array(fine))
    meta = {
        b"fine_label_names": [c.encode() for c in Cifar100.classes],
        b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
    }
    write_pickle(folder / "meta", meta, style)
    return out


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = idx_bytes(array)
    (path.with_name(path.name + ".gz") if gz else path).write_bytes(gzip.compress(raw) if gz else raw)


def make_idx(
    folder: Path, n_train: int = 7, n_test: int = 4, gz: bool = True, seed: int = 2
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


# files a built-in dataset needs, generated under a root (None: needs no files)
MAKERS: dict[str, Callable[[Path], object] | None] = {
    "cifar10": make_cifar10,
    "cifar100": make_cifar100,
    "mnist": lambda root: make_idx(root / "mnist"),
    "fashion-mnist": lambda root: make_idx(root / "fashion-mnist"),
    "fashion-mini": None,
    "synthetic": None,
    "imagefolder": lambda root: make_image_folder(root / "folder"),  # tests/_images.py
}
BUILTINS = sorted(info.name for info in DATASETS if info.cls.__module__.startswith("slimcli.data."))
SMALL = {"synthetic": "synthetic:n=40,n_test=20,size=8", "fashion-mini": "fashion-mini:n_train=50",
         "imagefolder": "imagefolder:path={root}/folder,size=16"}


# ---------------------------------------------------------------------------------------------
# the contract
# ---------------------------------------------------------------------------------------------
def test_every_builtin_has_contract_fixtures() -> None:
    assert set(BUILTINS) == set(MAKERS), "add a file generator to MAKERS for a new built-in dataset"


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_dataset_satisfies_contract(name: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    maker = MAKERS[name]
    if maker is not None:
        maker(root)
    spec = SMALL.get(name, name).format(root=root)
    assert create_dataset(spec).name == name
    check_dataset(spec, root)  # slimcli.testing: the checks plugins run too


def test_unknown_dataset_is_usage_error_with_suggestion() -> None:
    with pytest.raises(UsageError, match=r"unknown dataset 'cifar-10'.*Did you mean 'cifar10'"):
        create_dataset("cifar-10")
    with pytest.raises(UsageError, match=r"unknown option 'sead'.*'seed'"):
        create_dataset("synthetic:sead=1")
    with pytest.raises(UsageError, match="n_train"):
        create_dataset("fashion-mini:n_train=15")


# ---------------------------------------------------------------------------------------------
# CIFAR pickle reader
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["py2", "py3-protocol2", "py3-protocol4"])
def test_cifar10_reads_the_pickle_layout(style: str, tmp_path: Path) -> None:
    want = make_cifar10(tmp_path, style=style)
    ds = create_dataset("cifar10")
    for split in ("train", "test"):
        x, y = ds.load(split, tmp_path)
        data, labels = want[split]
        assert x.shape == (len(data), 3, 32, 32)
        np.testing.assert_array_equal(y.numpy(), labels)
        # a row is 1024 red, 1024 green, 1024 blue values, each plane row-major
        i, r, c = len(data) - 1, 5, 17
        assert [int(x[i, ch, r, c]) for ch in range(3)] == [
            int(data[i, ch * 1024 + r * 32 + c]) for ch in range(3)
        ]
        np.testing.assert_array_equal(x.reshape(len(x), -1).numpy(), data)


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    want = make_cifar100(tmp_path)
    x, y = create_dataset("cifar100").load("test", tmp_path)
    np.testing.assert_array_equal(y.numpy(), want["test"][1])
    np.testing.assert_array_equal(x.reshape(len(x), -1).numpy(), want["test"][0])
    assert len(Cifar100.classes) == 100 == len(set(Cifar100.classes))


def test_cifar_folder_itself_as_root(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    x, _ = create_dataset("cifar10").load("test", tmp_path / "cifar-10-batches-py")
    assert len(x) == 3


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_cifar_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load (posix|os)\.mkdir"):
        create_dataset("cifar10").load("test", tmp_path)
    assert not marker.exists()


def test_cifar_corrupt_files_are_data_errors(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    ds = create_dataset("cifar10")
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="not a CIFAR batch"):
        ds.load("test", tmp_path)
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="N×3072 uint8"):
        ds.load("test", tmp_path)
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DataError, match="2 images but 1 labels"):
        ds.load("test", tmp_path)
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DataError, match=r"labels must be integers in \[0, 10\)"):
        ds.load("test", tmp_path)
    write_pickle(folder / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]})
    write_pickle(folder / "batches.meta", {b"label_names": [b"x"] * 10})
    with pytest.raises(DataError, match="not the cifar10 classes"):
        ds.load("test", tmp_path)
    assert read_batch(folder / "test_batch")["labels"] == [3]


# ---------------------------------------------------------------------------------------------
# IDX reader
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["mnist", "MNIST/raw"])
def test_idx_roundtrip(gz: bool, layout: str, tmp_path: Path) -> None:
    want = make_idx(tmp_path / layout, gz=gz)
    for split in ("train", "test"):
        x, y = create_dataset("mnist").load(split, tmp_path)
        np.testing.assert_array_equal(x[:, 0].numpy(), want[split][0])
        np.testing.assert_array_equal(y.numpy(), want[split][1])


def test_idx_header_and_size_checks(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(2, 28, 28)
    good = idx_bytes(images)
    path = tmp_path / "f"
    cases = {
        "truncated": gzip.compress(good[:-5]),
        "longer than its header": gzip.compress(good + b"\0"),
        "magic number 2051 .found 2049": gzip.compress(idx_bytes(np.zeros(3, np.uint8))),
        "truncated inside its header": gzip.compress(good[:9]),
        "damaged gzip": gzip.compress(good)[:-40],
        r"magic number 2051 \(found None": b"\0\0",
    }
    for message, raw in cases.items():
        path.write_bytes(raw)
        with pytest.raises(DataError, match=message):
            read_idx(path, 2051)
    path.write_bytes(gzip.compress(good))
    np.testing.assert_array_equal(read_idx(path, 2051), images)


def test_idx_pair_checks(tmp_path: Path) -> None:
    folder = tmp_path / "fashion-mnist"
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        read_idx_pair(folder, "test")
    write_idx(folder / "t10k-labels-idx1-ubyte", np.array([0, 1, 10], np.uint8))
    with pytest.raises(DataError, match=r"labels must be integers in \[0, 10\)"):
        create_dataset("fashion-mnist").load("test", tmp_path)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(DataError, match="N×28×28"):
        read_idx_pair(folder, "test")


# ---------------------------------------------------------------------------------------------
# search order and offline errors
# ---------------------------------------------------------------------------------------------
def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ds = create_dataset("fashion-mnist")
    system = tmp_path / "system"
    monkeypatch.setattr(FashionMnist, "system_roots", (system,))
    sizes = {"system": 1, "home": 2, "env": 3, "root": 4}
    make_idx(system / "fashion-mnist", n_test=sizes["system"])
    assert len(ds.load("test")[0]) == 1
    make_idx(tmp_path / "home" / ".cache" / "slim" / "FashionMNIST" / "raw", n_test=sizes["home"])
    assert len(ds.load("test")[0]) == 2
    monkeypatch.setenv("SLIM_DATA", str(tmp_path / "env"))
    make_idx(tmp_path / "env" / "fashion-mnist", n_test=sizes["env"])
    assert len(ds.load("test")[0]) == 3
    make_idx(tmp_path / "root" / "fashion-mnist", n_test=sizes["root"])
    assert len(ds.load("test", tmp_path / "root")[0]) == 4
    # mnist does not pick up fashion-mnist files (same file names, different folders)
    with pytest.raises(DataError):
        create_dataset("mnist").load("test", tmp_path / "root")


@pytest.mark.parametrize(
    ("name", "folder", "files"),
    [
        ("mnist", "mnist", ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
        ("fashion-mnist", "fashion-mnist", ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
        ("cifar10", "cifar-10-batches-py", ["test_batch", "cifar-10-python.tar.gz"]),
        ("cifar100", "cifar-100-python", ["test", "cifar-100-python.tar.gz"]),
    ],
)
def test_missing_files_offline(name: str, folder: str, files: list[str], tmp_path: Path) -> None:
    root = tmp_path / "mydata"
    with pytest.raises(DataError) as info:
        create_dataset(name).load("test", root)
    message = str(info.value)
    assert "\n" not in message and "SLIM_OFFLINE=1" in message and "--data-dir" in message
    assert str(root / folder) in message and str(tmp_path / "home" / ".cache" / "slim") in message
    for f in files:
        assert f in message


@pytest.mark.parametrize(("name", "into"), [("mnist", "mnist"), ("cifar10", "")])
def test_download_hint_names_one_folder_plainly(name: str, into: str, tmp_path: Path) -> None:
    # one place to put the files: "into X", not "into one of X"; several: "into one of X, Y"
    cache = tmp_path / "home" / ".cache" / "slim"
    single = str(cache / into) if into else str(cache)
    with pytest.raises(DataError) as info:
        create_dataset(name).load("test")
    assert f"into {single}" in str(info.value) and "one of" not in str(info.value).split("Download")[1]
    with pytest.raises(DataError) as info:
        create_dataset(name).load("test", tmp_path / "mine")
    assert f"into one of {tmp_path / 'mine' / into if into else tmp_path / 'mine'}, " in str(info.value)


# ---------------------------------------------------------------------------------------------
# downloads, served from memory
# ---------------------------------------------------------------------------------------------
class _Response(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> list[str]:
    """Make urllib serve ``files`` (url -> bytes); other URLs fail like an offline machine."""
    calls: list[str] = []

    def urlopen(url: str, timeout: float | None = None) -> _Response:
        calls.append(url)
        if url not in files:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return _Response(files[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.delenv("SLIM_OFFLINE")
    return calls


def tar_gz(folder: Path, arcname: str, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{arcname}/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return buf.getvalue()


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.endswith(".part") or p.name.startswith(".slim-"))


def test_cifar_download_success(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    want = make_cifar10(tmp_path / "src")
    archive = tar_gz(tmp_path / "src" / "cifar-10-batches-py", "cifar-10-batches-py", {"../evil": b"x"})
    monkeypatch.setattr(Cifar10, "md5", hashlib.md5(archive).hexdigest())
    calls = serve(monkeypatch, {Cifar10.url: archive})
    root = tmp_path / "data"
    x, _ = create_dataset("cifar10").load("train", root)
    np.testing.assert_array_equal(x.reshape(len(x), -1).numpy(), want["train"][0])
    assert calls == [Cifar10.url]
    folder = root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*Cifar10.split_files["train"], "test_batch", "batches.meta"]
    )
    assert not (root / "cifar-10-python.tar.gz").exists() and not (tmp_path / "evil").exists()
    assert _leftovers(root) == []
    create_dataset("cifar10").load("test", root)  # found on disk now: no second download
    assert calls == [Cifar10.url]


def test_cifar_download_md5_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_cifar10(tmp_path / "src")
    archive = tar_gz(tmp_path / "src" / "cifar-10-batches-py", "cifar-10-batches-py")
    serve(monkeypatch, {Cifar10.url: archive})  # the real md5 cannot match this archive
    root = tmp_path / "data"
    with pytest.raises(
        DataError, match=f"corrupt .md5 {hashlib.md5(archive).hexdigest()}, expected {Cifar10.md5}"
    ):
        create_dataset("cifar10").load("test", root)
    assert not (root / "cifar-10-batches-py").exists() and list(root.iterdir()) == []


def test_download_network_failure_says_where_to_put_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    serve(monkeypatch, {})
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        create_dataset("cifar100").load("train", root)
    message = str(info.value)
    assert "cannot download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
    assert "name resolution" in message and str(root) in message and "cifar-100-python/" in message
    assert _leftovers(root) == []


def test_idx_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    want = make_idx(tmp_path / "src")
    files, md5s = {}, {}
    for path in (tmp_path / "src").iterdir():
        files[Mnist.base_url + path.name] = path.read_bytes()
        md5s[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setattr(Mnist, "md5s", md5s)
    calls = serve(monkeypatch, files)
    monkeypatch.setenv("SLIM_DATA", str(tmp_path / "env"))  # the first writable root is --data-dir's
    _, y = create_dataset("mnist").load("test", tmp_path / "data")
    np.testing.assert_array_equal(y.numpy(), want["test"][1])
    assert sorted(calls) == sorted(
        Mnist.base_url + f for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    )
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(md5s)[:2]
    assert not (tmp_path / "env").exists()


def test_download_goes_to_first_writable_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_idx(tmp_path / "src")
    files = {Mnist.base_url + p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    monkeypatch.setattr(
        Mnist, "md5s", {u.rsplit("/", 1)[1]: hashlib.md5(b).hexdigest() for u, b in files.items()}
    )
    serve(monkeypatch, files)
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")  # a root that cannot be created: downloads fall through to ~/.cache/slim
    create_dataset("mnist").load("train", blocked)
    assert (tmp_path / "home" / ".cache" / "slim" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


# ---------------------------------------------------------------------------------------------
# fashion-mini
# ---------------------------------------------------------------------------------------------
def test_fashion_mini_embedded_file() -> None:
    assert EMBEDDED.stat().st_size <= 2_000_000
    ds = create_dataset("fashion-mini")
    assert ds.classes == FashionMnist.classes and ds.input_shape == (1, 28, 28)
    for split, per_class in (("train", 350), ("test", 100)):
        x, y = ds.load(split)
        assert x.dtype == torch.uint8 and x.shape == (10 * per_class, 1, 28, 28)
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    x, _ = ds.load("train")
    pixels = x.double() / 255
    assert (
        abs(pixels.mean().item() - ds.mean[0]) < 6e-5
        and abs(pixels.std(unbiased=False).item() - ds.std[0]) < 6e-5
    )
    meta = embedded_meta()
    assert meta["train_per_class"] == 350 and meta["test_per_class"] == 100
    assert set(meta["source_idx_sha256"]) == {
        f"{split}-{kind}-idx{dim}-ubyte"
        for split in ("train", "t10k")
        for kind, dim in (("images", 3), ("labels", 1))
    }


def test_fashion_mini_n_train_is_a_balanced_prefix() -> None:
    full_x, full_y = create_dataset("fashion-mini").load("train")
    x, y = create_dataset("fashion-mini:n_train=40").load("train")
    assert torch.bincount(y, minlength=10).tolist() == [4] * 10
    for c in range(10):
        assert torch.equal(x[y == c], full_x[full_y == c][:4])


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mini_is_the_documented_subset_of_fashion_mnist() -> None:
    npz = np.load(EMBEDDED, allow_pickle=False)
    meta = json.loads(npz["meta"].tobytes())
    for split, k in (("train", meta["train_per_class"]), ("test", meta["test_per_class"])):
        images, labels = read_idx_pair(DEBIAN_FASHION, split)
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(10)]))
        np.testing.assert_array_equal(npz[f"{split}_images"], images[keep])
        np.testing.assert_array_equal(npz[f"{split}_labels"], labels[keep])
    for stem, sha in meta["source_idx_sha256"].items():
        assert (
            hashlib.sha256(gzip.decompress((DEBIAN_FASHION / f"{stem}.gz").read_bytes())).hexdigest() == sha
        )


# ---------------------------------------------------------------------------------------------
# declared normalisation = statistics of the real training data, where the data is here
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10", "cifar100"])
def test_declared_moments_match_real_data(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(REAL_HOME))
    for var in ("SLIM_DATA",):
        if os.environ.get(f"REAL_{var}"):
            monkeypatch.setenv(var, os.environ[f"REAL_{var}"])
    monkeypatch.setattr(FashionMnist, "system_roots", (DEBIAN_FASHION.parent,))
    ds = create_dataset(name)
    try:
        x, _ = ds.load("train")
    except DataError:
        pytest.skip(f"no {name} files on this machine")
    # exact pixel moments per channel from a 256-bin histogram (fast on tens of millions of pixels)
    hist = torch.stack([torch.bincount(x[:, c].flatten(), minlength=256) for c in range(x.shape[1])])
    levels = torch.arange(256, dtype=torch.float64) / 255
    counts = hist.to(torch.float64) / hist.sum(dim=1, keepdim=True)
    mean = counts @ levels
    std = (counts @ levels**2 - mean**2).sqrt()
    if name == "cifar10":  # the paper's constants: std is the mean of per-image per-channel stds
        std = (x.float() / 255).std(dim=(2, 3), unbiased=False).mean(dim=0).double()
    assert torch.allclose(mean, torch.tensor(ds.mean, dtype=torch.float64), atol=6e-4)
    assert torch.allclose(std, torch.tensor(ds.std, dtype=torch.float64), atol=6e-4)


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic() -> None:
    a = create_dataset("synthetic:n=64,n_test=32,size=12,channels=2,classes=4,seed=3")
    b = create_dataset("synthetic:n=64,n_test=32,size=12,channels=2,classes=4,seed=3")
    assert a.input_shape == (2, 12, 12) and a.num_classes == 4 and len(a.classes) == 4
    for split in ("train", "test"):
        (xa, ya), (xb, yb) = a.load(split), b.load(split)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.bincount(a.load("train")[1]).tolist() == [16] * 4
    assert not torch.equal(a.load("train")[0][:32], a.load("test")[0])
    other = create_dataset("synthetic:n=64,n_test=32,size=12,channels=2,classes=4,seed=4")
    assert not torch.equal(a.load("train")[0], other.load("train")[0])


def test_synthetic_declared_moments_match_its_data() -> None:
    ds = create_dataset("synthetic:n=2000,size=16")
    x = ds.load("train")[0].to(torch.float64) / 255
    mean = x.mean(dim=(0, 2, 3))
    std = x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1)
    # declared values are those of the generator before rounding and clipping
    assert torch.allclose(mean, torch.tensor(ds.mean, dtype=torch.float64), atol=0.01)
    assert torch.allclose(std, torch.tensor(ds.std, dtype=torch.float64), atol=0.015)


def test_synthetic_is_learnable() -> None:
    ds = create_dataset("synthetic:n=256,n_test=256,size=8")

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = ds.load(split)
        x = (x.double() / 255).flatten(1)
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y

    xtr, ytr = features("train")
    xte, yte = features("test")

    def ridge_accuracy(labels: torch.Tensor) -> float:
        """Test accuracy of a least-squares linear classifier fitted to ``labels`` (closed form)."""
        targets = torch.nn.functional.one_hot(labels, ds.num_classes).double()
        gram = xtr.T @ xtr + torch.eye(xtr.shape[1], dtype=xtr.dtype)
        weights = torch.linalg.solve(gram, xtr.T @ targets)
        return (xte @ weights).argmax(1).eq(yte).double().mean().item()

    assert ridge_accuracy(ytr) > 0.9  # chance is 0.1
    # control: with shuffled training labels nothing generalises, so the check above is not vacuous
    assert ridge_accuracy(ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))]) < 0.3
