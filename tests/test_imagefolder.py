"""imagefolder: layout, formats, transforms, statistics and errors (tiny generated folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _images import make_image_folder

import slimcli.data.imagefolder as imagefolder
from slimcli.data import TensorSource, create_dataset, sample_rng
from slimcli.errors import DataError, UsageError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs", classes=3, train=8, val=4)


def test_layout_classes_formats_and_eval_view(folder: Path) -> None:
    ds = create_dataset(f"imagefolder:path={folder},size=16")
    assert ds.classes == ["class_a", "class_b", "class_c"] and ds.num_classes == 3  # notes.txt is no class
    assert ds.input_shape == (3, 16, 16)
    x, y = ds.load("train")  # PNG, JPEG and grayscale PNG all decode to RGB
    assert x.shape == (24, 3, 16, 16) and y.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    xt, yt = ds.load("test")  # "test" is the val/ folder
    assert xt.shape == (12, 3, 16, 16) and sorted(set(yt.tolist())) == [0, 1, 2]
    again, _ = ds.load("train")
    assert (again == x).all()  # the evaluation transform is deterministic
    # the class colour survives the resize + centre crop (red, green, blue dominate); the third
    # image of each class is grayscale: three equal channels
    dominant = x.float().mean(dim=(2, 3)).argmax(1)
    colour = [i for i in range(24) if i % 8 != 2]
    assert (dominant[colour] == y[colour]).all()
    assert all((x[i, 0] == x[i, 1]).all() and (x[i, 1] == x[i, 2]).all() for i in (2, 10, 18))
    assert ds.spec == f"imagefolder:path={folder.resolve()},size=16"


def test_training_view_is_a_seeded_random_resized_crop(folder: Path) -> None:
    src = create_dataset(f"imagefolder:path={folder},size=16").source("train")
    a = src.get(3, sample_rng(0, 1, 3))
    assert a.shape == (3, 16, 16) and a.dtype == np.uint8 and a.flags.c_contiguous
    assert (src.get(3, sample_rng(0, 1, 3)) == a).all()  # same (seed, epoch, index): same crop
    views = [src.get(3, sample_rng(0, e, 3)) for e in range(2, 8)]
    assert any((v != a).any() for v in views)  # other epochs: other crops
    boxes = [imagefolder._rrc_box(np.random.default_rng(s), 40, 30) for s in range(200)]
    areas = np.array([(r - left) * (b - t) / 1200 for left, t, r, b in boxes])
    assert all(0 <= left < r <= 40 and 0 <= t < b <= 30 for left, t, r, b in boxes)
    assert areas.min() < 0.3 and areas.max() > 0.8  # scale (0.08, 1)


def test_statistics_measured_or_given(folder: Path) -> None:
    ds = create_dataset(f"imagefolder:path={folder},size=16")
    x, _ = ds.load("train")
    want = (x.double() / 255).mean(dim=(0, 2, 3))
    assert np.allclose(ds.mean, want.numpy(), atol=2e-4)  # all 24 images are within stats=512
    assert all(0 < s < 1 for s in ds.std)
    given = create_dataset(f"imagefolder:path={folder},mean=imagenet,std=0.2/0.25/0.3")
    assert given.mean == (0.485, 0.456, 0.406) and given.std == (0.2, 0.25, 0.3)
    with pytest.raises(UsageError, match="mean must be three values"):
        create_dataset(f"imagefolder:path={folder},mean=0.5/0.5").mean  # noqa: B018


def test_device_residency_threshold(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = create_dataset(f"imagefolder:path={folder},size=16")
    assert not ds.too_large_for_device()
    monkeypatch.setattr(imagefolder, "DEVICE_LIMIT_BYTES", 24 * 3 * 16 * 16 - 1)
    assert ds.too_large_for_device()


def test_errors_say_what_to_do(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(UsageError, match="needs the folder"):
        create_dataset("imagefolder")
    with pytest.raises(DataError, match="no train/ folder"):
        create_dataset(f"imagefolder:path={tmp_path / 'nowhere'}")
    (folder / "val" / "class_z").mkdir()
    with pytest.raises(DataError, match="class_z is a class"):
        create_dataset(f"imagefolder:path={folder}").load("test")
    bad = folder / "train" / "class_a" / "0000.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*0000\.png"):
        create_dataset(f"imagefolder:path={folder}").load("train")


def test_tensor_source_pads_crops_and_flips_like_the_resident_path() -> None:
    import torch

    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    src = TensorSource(images, torch.tensor([0, 1]), crop_pad=1, hflip=True)
    assert (src.get(1, None) == images[1].numpy()).all()
    seen = {src.get(0, np.random.default_rng(s)).tobytes() for s in range(50)}
    assert len(seen) > 9  # 9 offsets × 2 flips
    for s in range(20):
        v = src.get(0, np.random.default_rng(s))
        assert v.shape == (1, 4, 4) and v.sum() > 0
