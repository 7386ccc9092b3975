"""The streaming loader: a generated image folder trains through DataLoader workers, then prunes
and exports with its class names; streaming and the resident path agree on what they feed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers import run_cli
from _images import make_image_folder

from slimcli.checkpoint import load_checkpoint
from slimcli.data import create_dataset
from slimcli.model import Normalizer
from slimcli.train import TrainConfig, train
from slimcli.train.distributed import Dist
from slimcli.train.loader import ResidentFeeder, StreamFeeder, epoch_steps, rank_slice

pytestmark = pytest.mark.usefixtures("one_thread")


def test_image_folder_streams_trains_prunes_and_exports(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_image_folder(tmp_path / "photos", classes=3, train=70, val=10)  # 210 + 30 PNG/JPEG
    spec = f"imagefolder:path={folder},size=16"
    result = train(TrainConfig(arch="resnet56:depth=8", dataset=spec, epochs=2, batch_size=30, lr=0.05,
                               device="cpu", threads=1, workers=2, out=str(tmp_path / "run")))
    assert result.epochs == 2 and result.best_acc > 0.9  # class colours: easy once it trains at all
    ckpt = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert ckpt.meta["classes"] == ["class_a", "class_b", "class_c"]
    assert ckpt.meta["train"]["data"] == "streamed"  # chosen by the dataset: 'too large' at this limit
    code, _, err = run_cli(["prune", str(tmp_path / "run" / "best.safetensors"), "--ratio", "0.3",
                            "--out", str(tmp_path / "slim.safetensors"), "--eval", "--recalibrate", "60"],
                           capsys)
    assert code == 0, err
    pytest.importorskip("onnx")
    code, _, err = run_cli(["export", str(tmp_path / "slim.safetensors"), str(tmp_path / "m.onnx")], capsys)
    assert code == 0, err
    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert "class_b" in json.dumps(props)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest's guard, but DataLoader workers may hand tensors over local (AF_UNIX) sockets."""
    import socket

    connect = socket.socket.connect

    def guard(self: socket.socket, address: object) -> None:
        if self.family == socket.AF_UNIX:
            return connect(self, address)  # type: ignore[arg-type]
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", guard)


@pytest.fixture(autouse=True)
def _small_device_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import slimcli.data.imagefolder as imagefolder

    monkeypatch.setattr(imagefolder, "DEVICE_LIMIT_BYTES", 1000)  # every test folder 'is too large'


def test_steps_and_rank_slices() -> None:
    assert epoch_steps(100, 32, 1) == 4 and epoch_steps(96, 32, 2) == 3
    assert epoch_steps(97, 32, 2) == 3  # 1 image left: fewer than the 2 ranks, dropped
    idx = torch.arange(10)
    parts = [rank_slice(idx, Dist(2, r, r, 2)) for r in range(2)]
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_streamed_batches_follow_the_permutation_and_are_seeded(tmp_path: Path) -> None:
    ds = create_dataset("synthetic:n=40,n_test=10,size=8")
    norm = Normalizer(ds.mean, ds.std, torch.device("cpu"))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    stream = StreamFeeder(ds, None, torch.device("cpu"), norm, 8, Dist(), seed=3, workers=2)
    res = ResidentFeeder(ds, None, torch.device("cpu"), norm, 8, Dist(), torch.Generator().manual_seed(1))
    a = list(stream.batches(perm, 0, epoch=1))
    b = list(stream.batches(perm, 2, epoch=1))  # a resumed epoch starts at its step, same images
    assert len(a) == 5 and len(b) == 3
    for (xa, ya), (xb, yb) in zip(a[2:], b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    _, y_train = ds.load("train")
    assert torch.equal(torch.cat([y for _, y in a]), y_train[perm])
    c = list(stream.batches(perm, 0, epoch=2))
    assert not torch.equal(a[0][0], c[0][0])  # another epoch: other crops
    # evaluation: the same numbers from both feeders on the same weights
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    assert stream.evaluate(net, 4, None) == pytest.approx(res.evaluate(net, 4, None), rel=1e-6)
