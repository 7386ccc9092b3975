"""Checkpoints: round trip, atomic writes, clean errors for bad files, rebuilding the model."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from slimcli import _fs as fs
from slimcli import checkpoint as ck
from slimcli.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    file_sha256,
    lineage_entry,
    load_checkpoint,
    load_state,
    save_checkpoint,
    state_path,
)
from slimcli.errors import CheckpointError, SlimError
from slimcli.model import build_model
from slimcli.registry import ARCHS, Option

ARCH = "tinytestnet"


class TinyNet(nn.Module):
    """A conv-BN-ReLU-pool-linear net: the smallest thing with a prunable BN."""

    options = (Option("width", int, 4, "conv channels", check=lambda v: v >= 1, rule=">= 1"),)

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.fixture
def tiny_arch():
    ARCHS.names()  # load the built-ins first, so they are not registered under our name later
    ARCHS.register(ARCH)(TinyNet)
    yield ARCH
    ARCHS.unregister(ARCH)


def full_meta(**over: object) -> dict:
    meta = {
        "arch": f"{ARCH}:width=4",
        "widths": {"bn": 4},
        "num_classes": 3,
        "input_shape": [1, 8, 8],
        "dataset": "synthetic:n=64",
        "classes": ["a", "b", "c"],
        "normalization": {"mean": [0.5], "std": [0.25]},
        "stage": "sparsify",
        "train": {"penalty": "tl1:a=0.5", "lam": 1e-4, "update": "proximal", "epochs": 2, "seed": 0},
        "metrics": {"sparsify": {"test_acc": 0.5, "test_loss": 1.25}},
        "prune": None,
        "lineage": [lineage_entry("sparsify", None, "slim sparsify-train --arch tinytestnet")],
    }
    meta.update(over)
    return meta


def tiny_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet(3, (1, 8, 8))
    with torch.no_grad():  # non-default BN statistics so a forgotten buffer would show
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0, 1)
    return model.eval()


def error_of(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------ round trip
def test_round_trip_tensors_and_every_metadata_key(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 4),
        "half": torch.randn(5).to(torch.bfloat16),
        "idx": torch.arange(7),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 2),
    }
    meta = full_meta()
    path = tmp_path / "a.safetensors"
    sha = save_checkpoint(path, tensors, meta)
    assert sha == file_sha256(path)

    loaded = load_checkpoint(path)
    assert isinstance(loaded, Checkpoint) and loaded.path == path and loaded.sha256 == sha
    assert set(loaded.tensors) == set(tensors)
    for k, t in tensors.items():
        assert loaded.tensors[k].dtype == t.dtype and torch.equal(loaded.tensors[k], t)
    for k, v in meta.items():
        assert loaded.meta[k] == v, k
    assert loaded.meta["format"] == FORMAT_VERSION
    assert isinstance(loaded.meta["version"], str) and loaded.meta["version"]
    assert loaded.arch == f"{ARCH}:width=4" and loaded.widths == {"bn": 4} and loaded.stage == "sparsify"
    assert loaded.num_classes == 3 and loaded.input_shape == (1, 8, 8)
    assert loaded.lineage[0]["stage"] == "sparsify" and loaded.lineage[0]["parent"] is None


def test_raw_metadata_is_prefixed_strings(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"x": torch.ones(1)}, full_meta())
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()
    assert all(k.startswith("slim.") for k in raw)
    assert raw["slim.arch"] == f"{ARCH}:width=4"  # plain strings stay readable
    assert raw["slim.format"] == str(FORMAT_VERSION)
    assert json.loads(raw["slim.widths"]) == {"bn": 4}
    assert json.loads(raw["slim.input_shape"]) == [1, 8, 8]


def test_shared_and_strided_tensors_are_saved(tmp_path: Path) -> None:
    base = torch.randn(6, 4)
    tied = nn.Linear(4, 6, bias=False)
    tensors = {
        "a": base,
        "a_again": base,  # same storage (tied weights)
        "slice": base[2:4],  # a view of part of it
        "transposed": base.t(),  # non-contiguous
        "cl": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "tied": tied.weight,  # a Parameter
    }
    path = tmp_path / "shared.safetensors"
    save_checkpoint(path, tensors, full_meta())
    loaded = load_checkpoint(path).tensors
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t.detach()), k
    assert base.is_contiguous() and tensors["cl"].is_contiguous(memory_format=torch.channels_last)


def test_model_with_tied_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    path = tmp_path / "tied.safetensors"
    save_checkpoint(path, model, full_meta())
    loaded = load_checkpoint(path).tensors
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])
    assert set(loaded) == set(model.state_dict())


def test_missing_required_metadata_is_refused(tmp_path: Path) -> None:
    meta = full_meta()
    del meta["arch"]
    with pytest.raises(CheckpointError, match="arch"):
        save_checkpoint(tmp_path / "x.safetensors", {"x": torch.ones(1)}, meta)
    with pytest.raises(CheckpointError, match="stage"):
        save_checkpoint(tmp_path / "x.safetensors", {"x": torch.ones(1)}, full_meta(stage="pretty"))
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------ training state
def test_state_round_trip_and_pairing(tmp_path: Path) -> None:
    path = tmp_path / "last.safetensors"
    assert state_path(path) == tmp_path / "last.state.safetensors"
    state = {"opt.0.momentum": torch.randn(4), "rng.cpu": torch.get_rng_state()}
    sha = save_checkpoint(path, {"x": torch.ones(2)}, full_meta(), state=state, state_meta={"epoch": 7})
    tensors, meta = load_state(path)
    assert torch.equal(tensors["opt.0.momentum"], state["opt.0.momentum"])
    assert torch.equal(tensors["rng.cpu"], state["rng.cpu"])
    assert meta["epoch"] == 7 and meta["model_sha256"] == sha
    assert load_state(state_path(path))[1]["epoch"] == 7  # the state path itself works too

    # a newer model file next to an older state (a crash between the two writes) is detected
    assert load_state(path, model_sha256=sha)[1]["epoch"] == 7  # a caller's known hash is trusted
    newer = save_checkpoint(path, {"x": torch.zeros(2)}, full_meta())
    with pytest.raises(CheckpointError, match="different checkpoint"):
        load_state(path)
    with pytest.raises(CheckpointError, match="different checkpoint"):
        load_state(path, model_sha256=newer)


def test_missing_state_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, {"x": torch.ones(1)}, full_meta())
    with pytest.raises(CheckpointError, match="not found"):
        load_state(path)


# ------------------------------------------------------------------------------ atomic writes
def _good_old(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"x": torch.full((1000,), 1.0)}, full_meta())
    return path, path.read_bytes()


def _only(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_failed_replace_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, old = _good_old(tmp_path)

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(CheckpointError, match=r"No space left on device.*unchanged"):
        save_checkpoint(path, {"x": torch.full((1000,), 2.0)}, full_meta())
    assert path.read_bytes() == old
    assert _only(path) == ["ck.safetensors"]


def test_write_interrupted_midway_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, old = _good_old(tmp_path)

    def half_then_interrupt(f: object, data: bytes) -> None:
        f.write(data[: len(data) // 2])  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(fs, "_write_all", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"x": torch.full((1000,), 2.0)}, full_meta(), state={"s": torch.ones(3)})
    assert path.read_bytes() == old
    assert _only(path) == ["ck.safetensors"]
    assert torch.equal(load_checkpoint(path).tensors["x"], torch.full((1000,), 1.0))


def test_state_written_first_so_a_crash_before_the_model_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(
        path, {"x": torch.ones(1)}, full_meta(), state={"s": torch.ones(1)}, state_meta={"epoch": 1}
    )
    real = ck._atomic_write
    calls: list[Path] = []

    def crash_on_model(target: Path, data: bytes) -> None:
        calls.append(target)
        if target == path:
            raise OSError(5, "Input/output error")
        real(target, data)

    monkeypatch.setattr(ck, "_atomic_write", crash_on_model)
    with pytest.raises(OSError):
        save_checkpoint(
            path, {"x": torch.zeros(1)}, full_meta(), state={"s": torch.zeros(1)}, state_meta={"epoch": 2}
        )
    assert calls == [state_path(path), path]
    assert load_checkpoint(path).tensors["x"].item() == 1.0  # old model intact
    # new state + old model are never mixed: the previous state, kept beside it, fits the old model
    with pytest.warns(UserWarning, match="previous state"):
        tensors, meta = load_state(path)
    assert tensors["s"].item() == 1.0 and meta["epoch"] == 1
    ck.previous_state_path(path).unlink()  # without the previous state the pair is refused
    with pytest.raises(CheckpointError, match="different checkpoint"):
        load_state(path)


WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from slimcli import _fs as fs, checkpoint as ck

    def slow_write(f, data):  # paced writes, so the kill lands inside a write, not between saves
        for start in range(0, len(data), 1 << 16):
            f.write(data[start : start + (1 << 16)])
            f.flush()
            time.sleep(0.001)

    fs._write_all = slow_write
    path, meta = sys.argv[1], {"arch": "x", "num_classes": 2, "input_shape": [1, 2, 2], "stage": "sparsify"}
    i = 0
    while True:
        tensors = {"a": torch.full((1 << 20,), float(i)), "b": torch.full((1 << 19,), float(i))}
        ck.save_checkpoint(path, tensors, meta)
        if i == 0:
            print("first", flush=True)
        i += 1
    """
)


def test_killed_writer_never_leaves_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "k.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "first"
        time.sleep(0.3)  # several more saves, then SIGKILL lands somewhere inside one
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    loaded = load_checkpoint(path)
    a, b = loaded.tensors["a"], loaded.tensors["b"]
    assert a.numel() == 1 << 20 and b.numel() == 1 << 19
    assert torch.all(a == a[0]) and torch.all(b == a[0])  # one complete save, never a mix
    assert loaded.sha256 == file_sha256(path)


# ------------------------------------------------------------------------------ bad files
def test_missing_file_and_folder(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "nope.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "best.safetensors", {"x": torch.ones(1)}, full_meta())
    msg = error_of(run)
    assert "folder" in msg and "best.safetensors" in msg
    assert "best.safetensors" in error_of(run / "bets.safetensors")  # lists what is there


def test_empty_random_and_pickle_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "empty" in error_of(empty)

    rnd = tmp_path / "random.safetensors"
    rnd.write_bytes(random.Random(1).randbytes(4096))
    assert "not a safetensors file" in error_of(rnd)

    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    assert "not a safetensors file" in error_of(short)

    pth = tmp_path / "model.pth"
    torch.save(nn.Linear(2, 2).state_dict(), pth)
    msg = error_of(pth)
    assert "pickle" in msg and "import_pth" in msg

    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=2))
    assert "pickle" in error_of(legacy)


def test_truncated_at_many_offsets(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"w": torch.randn(64, 64), "b": torch.randn(64)}, full_meta())
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    cuts = [1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) // 2, len(data) - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        msg = error_of(bad)
        assert "truncated" in msg or "not a safetensors file" in msg, (cut, msg)
    # every cut past the first 9 bytes is recognisably a cut, not "some other format"
    for cut in cuts[3:]:
        assert "truncated" in error_of(tmp_path / f"cut{cut}.safetensors"), cut


def test_corrupt_header_and_trailing_garbage(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"w": torch.randn(8)}, full_meta())
    data = bytearray(good.read_bytes())
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(data) + b"\0" * 5)
    assert "corrupt" in error_of(garbage)
    data[10] = ord("~")  # break the JSON
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bytes(data))
    assert "corrupt" in error_of(broken)


def test_header_with_absurd_offsets_is_corrupt_not_a_crash(tmp_path: Path) -> None:
    """data_offsets of 1e999 (inf after json.loads), negative or non-numeric: one clear error."""
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"w": torch.randn(8)}, full_meta())
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].decode()
    for bad in ("1e999", '"x"', "null"):
        text = header.replace('"data_offsets":[0,32]', f'"data_offsets":[0,{bad}]')
        assert text != header
        raw = text.encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
        message = error_of(path)
        assert "corrupt" in message or "truncated" in message, (bad, message)


def _rewrite_meta(src: Path, dst: Path, edit: dict[str, str | None]) -> None:
    from safetensors.torch import load, save

    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    for k, v in edit.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    dst.write_bytes(save(load(data), metadata=meta or None))


def test_newer_format_asks_to_upgrade(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"w": torch.randn(8)}, full_meta())
    newer = tmp_path / "newer.safetensors"
    _rewrite_meta(good, newer, {"slim.format": str(FORMAT_VERSION + 1), "slim.version": "9.0"})
    msg = error_of(newer)
    assert "upgrade slim" in msg and "9.0" in msg


def test_foreign_safetensors_is_not_a_slim_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    plain = tmp_path / "hf.safetensors"
    save_file({"w": torch.randn(3)}, str(plain))
    msg = error_of(plain)
    assert "not a slim checkpoint" in msg and "import_pth" in msg
    nometa = tmp_path / "nometa.safetensors"
    save_file({"w": torch.randn(3)}, str(nometa), metadata={"format": "pt"})
    assert "not a slim checkpoint" in error_of(nometa)


def test_errors_reach_the_cli_as_one_line(tmp_path: Path) -> None:
    assert issubclass(CheckpointError, SlimError) and CheckpointError.exit_code == 1


# ------------------------------------------------------------------------------ .pth import
def test_import_pth_uses_weights_only(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    pth = tmp_path / "m.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, pth)
    tensors = ck.import_pth(pth)
    assert set(tensors) == {"weight", "bias"} and torch.equal(tensors["weight"], model.weight.detach())

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="plain weights"):
        ck.import_pth(evil)


# ------------------------------------------------------------------------------ build_model
def test_build_model_round_trip(tmp_path: Path, tiny_arch: str) -> None:
    model = tiny_model()
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model, full_meta())
    rebuilt = build_model(load_checkpoint(path))
    assert isinstance(rebuilt, TinyNet) and not rebuilt.training
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k


def test_build_model_applies_narrower_widths(
    tmp_path: Path, tiny_arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Widths narrower than the dense arch go through slimcli.prune.apply_widths before loading."""
    seen: list[dict[str, int]] = []

    def apply_widths(
        model: TinyNet, widths: dict[str, int], input_shape: tuple[int, ...], **_: object
    ) -> TinyNet:
        assert input_shape == (1, 8, 8)
        seen.append(widths)
        k = widths["bn"]
        model.conv = nn.Conv2d(model.conv.in_channels, k, 3, padding=1, bias=False)
        model.bn = nn.BatchNorm2d(k)
        model.fc = nn.Linear(k, model.fc.out_features)
        return model

    monkeypatch.setattr("slimcli.model.apply_widths", apply_widths)
    slim = TinyNet(3, (1, 8, 8), width=2)
    path = tmp_path / "pruned.safetensors"
    save_checkpoint(path, slim, full_meta(widths={"bn": 2}, stage="pruned"))
    rebuilt = build_model(load_checkpoint(path))
    assert seen == [{"bn": 2}]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), slim.eval()(x))

    # full widths: the dense model is loaded as is, apply_widths is not called
    save_checkpoint(path, tiny_model(), full_meta(widths={"bn": 4}))
    build_model(load_checkpoint(path))
    assert len(seen) == 1


def test_build_model_rebuilds_a_really_pruned_model(tmp_path: Path, tiny_arch: str) -> None:
    """With the real surgery: a slim model saved with its widths comes back identical."""
    from slimcli.prune import apply_widths

    slim = apply_widths(tiny_model(), {"bn": 3}, input_shape=(1, 8, 8))
    with torch.no_grad():
        for t in slim.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)  # weights unlike any fresh model's
    path = tmp_path / "slim.safetensors"
    save_checkpoint(path, slim, full_meta(widths={"bn": 3}, stage="pruned"))
    rebuilt = build_model(load_checkpoint(path))
    assert rebuilt.state_dict()["bn.weight"].shape == (3,)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), slim.eval()(x), rtol=0, atol=0)


def test_build_model_missing_arch_names_it(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_checkpoint(path, {"w": torch.ones(1)}, full_meta(arch="fancynet:depth=3"))
    with pytest.raises(CheckpointError) as info:
        build_model(load_checkpoint(path))
    msg = str(info.value)
    assert "'fancynet'" in msg and "install the plugin" in msg


def test_build_model_shape_and_key_mismatch(tmp_path: Path, tiny_arch: str) -> None:
    wide = TinyNet(3, (1, 8, 8), width=6)
    path = tmp_path / "wide.safetensors"
    save_checkpoint(path, wide, full_meta(widths=None))  # claims width=4 but holds width-6 tensors
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: conv\.weight \(6, 1, 3, 3\) vs model \(4, 1, 3, 3\)"
    ):
        build_model(load_checkpoint(path))

    sd = tiny_model().state_dict()
    sd["extra.weight"] = torch.ones(1)
    del sd["fc.bias"]
    save_checkpoint(path, sd, full_meta())
    with pytest.raises(CheckpointError) as info:
        build_model(load_checkpoint(path))
    assert "fc.bias" in str(info.value) and "extra.weight" in str(info.value)


def test_build_model_rejects_widths_the_arch_cannot_have(tmp_path: Path, tiny_arch: str) -> None:
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, tiny_model(), full_meta(widths={"bn": 9}))
    with pytest.raises(CheckpointError, match="keeps 9 channels of 'bn'"):
        build_model(load_checkpoint(path))
    save_checkpoint(path, tiny_model(), full_meta(widths={"ghost": 1}))
    with pytest.raises(CheckpointError, match="'ghost'"):
        build_model(load_checkpoint(path))


def test_lineage_entry() -> None:
    entry = lineage_entry("pruned", "ab" * 32, "slim prune x --ratio 0.5")
    assert entry["stage"] == "pruned" and entry["parent"] == "ab" * 32
    assert entry["command"] == "slim prune x --ratio 0.5" and entry["time"].endswith("+00:00")
    assert lineage_entry("sparsify", None)["command"].startswith("slim")


def test_damage_inside_the_tensor_data_is_caught(tmp_path: Path) -> None:
    """A flipped byte in the data (not a cut, not the header) fails the saved data checksum."""
    path = tmp_path / "m.safetensors"
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    save_checkpoint(
        path, model, {"arch": "x", "num_classes": 10, "input_shape": [3, 8, 8]}, state={"s": torch.ones(4)}
    )
    ck.load_checkpoint(path)  # intact: loads
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        ck.load_checkpoint(path)
