"""Reliability: no traceback on any input, no diverged model kept as best, no silent overwrite (issue 12).

* a table of damaged and tampered checkpoints run through every command that reads one: each
  gives exit 1 with exactly one ``Error:`` line, or works (exit 0);
* a bounded, seeded fuzz of a tiny valid checkpoint (byte flips, truncations, header and
  metadata edits) through the library loader and ``slim inspect`` in-process;
* read-only and full output folders (a small tmpfs where the test may mount one, else a
  chmod-ed folder; skipped as root without mount);
* a diverging run, a crash between the state and the model write, --force, option checks.

``python tests/test_reliability.py [N]`` runs the fuzz with N mutations and prints the
figures quoted in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import run_cli

from slimcli.archs import create_arch
from slimcli.checkpoint import file_sha256, lineage_entry, load_checkpoint, save_checkpoint
from slimcli.data import create_dataset
from slimcli.errors import SlimError
from slimcli.model import build_model

ARCH = "vgg11:width=0.125"
DATA = "synthetic:n=32,n_test=16,size=16,channels=1,classes=4"

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# a tiny valid checkpoint and ways to damage it


def make_checkpoint(path: Path, seed: int = 0, nan: bool = False) -> Path:
    """A tiny sparsify checkpoint of ``ARCH`` on the synthetic dataset."""
    ds = create_dataset(DATA)
    torch.manual_seed(seed)
    model = create_arch(ARCH, ds.num_classes, tuple(ds.input_shape))
    if nan:
        with torch.no_grad():
            next(iter(model.parameters())).fill_(float("nan"))
    meta = {
        "arch": ARCH, "num_classes": ds.num_classes, "input_shape": list(ds.input_shape), "dataset": ds.spec,
        "classes": list(ds.classes), "normalization": {"mean": list(ds.mean), "std": list(ds.std)},
        "stage": "sparsify", "metrics": {"sparsify": {"epoch": 1, "test_acc": 0.25, "test_loss": 1.4}},
        "lineage": [lineage_entry("sparsify", None, "slim sparsify-train (test)")],
        "train": {"penalty": "l1", "lam": 1e-4, "epochs": 1},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, meta)
    return path


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def meta_edit(key: str, value: object) -> Callable[[bytes], bytes]:
    """Set ``slim.<key>`` to ``value`` (JSON-encoded unless a str is given raw), or drop it (None)."""

    def edit(data: bytes) -> bytes:
        header, body = split(data)
        if value is None:
            header["__metadata__"].pop("slim." + key, None)
        else:
            header["__metadata__"]["slim." + key] = value if isinstance(value, str) else json.dumps(value)
        return join(header, body)

    return edit


def tensor_edit(field: str, value: object) -> Callable[[bytes], bytes]:
    """Set ``field`` of the first tensor entry of the header to ``value`` (raw JSON text)."""

    def edit(data: bytes) -> bytes:
        header, body = split(data)
        name = next(k for k in header if k != "__metadata__")
        text = json.dumps(header).replace(json.dumps({name: header[name]})[1:-1],
                                          f'"{name}": ' + json.dumps({**header[name], field: "@@"}))
        raw = text.replace('"@@"', str(value)).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    return edit


def flip(offset: int) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        i = offset if offset >= 0 else len(data) + offset
        return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]

    return edit


#: name → mutation of the valid file's bytes
DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda d: b"",
    "4 bytes": lambda d: d[:4],
    "cut in header": lambda d: d[:40],
    "cut in data": lambda d: d[: len(d) - 100],
    "trailing garbage": lambda d: d + b"\0garbage",
    "data byte flipped": flip(-50),
    "header byte flipped": flip(12),
    "random bytes": lambda d: random.Random(0).randbytes(len(d)),
    "pickle": lambda d: b"PK\x03\x04" + d[4:],
    "header length huge": lambda d: struct.pack("<Q", 1 << 40) + d[8:],
    "header not an object": lambda d: join([1, 2], b""),  # type: ignore[arg-type]
    "metadata not strings": lambda d: join({**split(d)[0], "__metadata__": {"slim.format": 1}}, split(d)[1]),
    "no slim metadata": lambda d: join({k: v for k, v in split(d)[0].items() if k != "__metadata__"},
                                       split(d)[1]),
    "format newer": meta_edit("format", "99"),
    "format junk": meta_edit("format", "one"),
    "format 0": meta_edit("format", "0"),
    "arch missing": meta_edit("arch", None),
    "arch empty": meta_edit("arch", ""),
    "arch unknown": meta_edit("arch", "nosuchnet"),
    "arch bad option": meta_edit("arch", "vgg11:width=-3"),
    "widths a list": meta_edit("widths", [1, 2, 3]),
    "widths negative": meta_edit("widths", {"features.1": -4}),
    "widths unknown layer": meta_edit("widths", {"nolayer": 4}),
    "widths too wide": meta_edit("widths", {"features.1": 4096}),
    "widths text": meta_edit("widths", "{not json"),
    "num_classes text": meta_edit("num_classes", "ten"),
    "num_classes 1": meta_edit("num_classes", 1),
    "num_classes float": meta_edit("num_classes", 2.5),
    "num_classes bool": meta_edit("num_classes", True),
    "num_classes huge": meta_edit("num_classes", 10**30),
    "num_classes other": meta_edit("num_classes", 7),
    "input_shape text": meta_edit("input_shape", "1x16x16"),
    "input_shape dict": meta_edit("input_shape", {"c": 1}),
    "input_shape zero": meta_edit("input_shape", [1, 0, 16]),
    "input_shape huge": meta_edit("input_shape", [1, 100000, 100000]),
    "input_shape 1e999": meta_edit("input_shape", "[1, 1e999, 16]"),
    "input_shape other": meta_edit("input_shape", [3, 16, 16]),
    "metrics a list": meta_edit("metrics", [1, 2]),
    "metrics text": meta_edit("metrics", "great"),
    "metrics nested": meta_edit("metrics", {"sparsify": {"test_acc": [0.5]}}),
    "lineage a dict": meta_edit("lineage", {"stage": "sparsify"}),
    "lineage numbers": meta_edit("lineage", [1, 2]),
    "lineage odd entry": meta_edit("lineage", [{"stage": 5, "parent": ["x"]}]),
    "lineage extra keys": meta_edit("lineage", [{"stage": "sparsify", "note": {"free": "form"}}]),
    "stage bogus": meta_edit("stage", "bogus"),
    "classes wrong count": meta_edit("classes", ["a"]),
    "classes not strings": meta_edit("classes", [1, 2, 3, 4]),
    "normalization text": meta_edit("normalization", "imagenet"),
    "normalization std 0": meta_edit("normalization", {"mean": [0.5], "std": [0.0]}),
    "normalization NaN": meta_edit("normalization", '{"mean": [NaN], "std": [1.0]}'),
    "prune not an object": meta_edit("prune", [0.5]),
    "prune threshold text": meta_edit("prune", {"rule": "ratio", "threshold": "low"}),
    "train not an object": meta_edit("train", 3),
    "dataset a number": meta_edit("dataset", 5),
    "dataset unknown": meta_edit("dataset", "nosuchdata"),
    "data_offsets 1e999": tensor_edit("data_offsets", "[0, 1e999]"),
    "data_offsets negative": tensor_edit("data_offsets", "[-8, 0]"),
    "data_offsets text": tensor_edit("data_offsets", '"0-8"'),
    "dtype unknown": tensor_edit("dtype", '"X99"'),
    "shape huge": tensor_edit("shape", "[100000000000000000000]"),
    "shape text": tensor_edit("shape", '"big"'),
    "valid": lambda d: d,
}


def command_lines(ckpt: Path, work: Path) -> dict[str, list[str]]:
    """Every command that reads a checkpoint, with cheap settings."""
    return {
        "inspect": ["inspect", str(ckpt)],
        "prune": ["prune", str(ckpt), "--ratio", "0.3", "--recalibrate", "0",
                  "--out", str(work / "p.safetensors")],
        "export": ["export", str(ckpt), str(work / "m.onnx"), "--no-real-data", "--latency-runs", "0"],
        "finetune": ["finetune", str(ckpt), "--epochs", "0", "--out", str(work / "ft"), "--device", "cpu",
                     "--threads", "1", "--quiet"],
        "sweep": ["sweep", str(ckpt), "--ratios", "0.3", "--recalibrate", "0", "--out", str(work / "sw"),
                  "--device", "cpu"],
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def run_clean(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``slim ARGV`` in-process; an exception other than SystemExit (a traceback) fails the test."""
    try:
        return run_cli(argv, capsys)
    except BaseException as exc:
        pytest.fail(f"slim {' '.join(argv)} crashed: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_checkpoint(tmp_path_factory.mktemp("valid") / "best.safetensors").read_bytes()


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_in_every_command(
    damage: str, valid_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "best.safetensors"
    ckpt.write_bytes(DAMAGES[damage](valid_bytes))
    before = ckpt.read_bytes()
    outcomes = {}
    for name, argv in command_lines(ckpt, tmp_path).items():
        code, _, err = run_clean(argv, capsys)
        assert "Traceback" not in err, (name, err)
        if code == 0:
            outcomes[name] = "ok"
        else:
            assert code == 1 and len(error_lines(err)) == 1, (name, code, err)
            outcomes[name] = "error"
        for leftover in ("p.safetensors", "m.onnx", "ft", "sw"):  # start every command afresh
            target = tmp_path / leftover
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    assert ckpt.read_bytes() == before  # the input is never touched
    if damage == "valid":
        assert set(outcomes.values()) == {"ok"}
    elif damage not in LOADABLE:
        # a damaged file is refused by all of them alike: the check lives in the loader
        assert set(outcomes.values()) == {"error"}, outcomes


#: valid files with odd contents: free-form extra lineage keys load; an unknown dataset matters only to
#: the commands that need the data (finetune, sweep), which refuse it cleanly
LOADABLE = {"lineage extra keys", "dataset a number", "dataset unknown"}


# ----------------------------------------------------------------------------------------------
# fuzzing

_JUNK = ['[1, 2]', '{"a": 1}', '"text"', "1e999", "-1", "0", "2.5", "true", "null", "[[]]", '{"x": [1]}',
         "[1e999]", "NaN", "{", "", '"' + "a" * 300 + '"', "[-5, 0]", '{"features.1": 0}']


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random damage: byte flips, a cut, inserted bytes, a header character or a metadata value."""
    kind = rng.randrange(6)
    n = struct.unpack("<Q", data[:8])[0]
    if kind == 0:  # flip 1-4 random bytes anywhere
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:  # truncate
        return data[: rng.randrange(len(data))]
    if kind == 2:  # a byte flip inside the header
        i = rng.randrange(8, 8 + n)
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    if kind == 3:  # a digit in the header replaced (offsets, shapes, numbers in metadata)
        digits = [i for i in range(8, 8 + n) if chr(data[i]).isdigit()]
        i = rng.choice(digits)
        return data[:i] + rng.choice(b"0123456789").to_bytes(1, "little") + data[i + 1 :]
    header, body = split(data)
    if kind == 4:  # a metadata value replaced by junk
        key = rng.choice(sorted(header["__metadata__"]))
        header["__metadata__"][key] = rng.choice(_JUNK)
        return join(header, body)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))  # a tensor entry edited
    field = rng.choice(["dtype", "shape", "data_offsets"])
    header[name][field] = json.loads(rng.choice([j for j in _JUNK if j not in ("NaN", "{", "")]))
    return join(header, body)


def fuzz(valid: bytes, work: Path, n: int, seed: int = 0, cli_every: int = 20) -> dict[str, int]:
    """``n`` mutations through load_checkpoint + build_model; every ``cli_every``-th also through
    ``slim inspect`` via typer's CliRunner. Returns the counts (crashes must be 0)."""
    from typer.testing import CliRunner

    from slimcli.cli import app

    rng = random.Random(seed)
    runner = CliRunner()
    counts = {"inputs": 0, "loaded": 0, "clean_errors": 0, "crashes": 0, "cli_runs": 0, "cli_clean": 0,
              "cli_crashes": 0}
    path = work / "fuzz.safetensors"
    crashes: list[str] = []
    for i in range(n):
        path.write_bytes(mutate(valid, rng))
        counts["inputs"] += 1
        try:
            build_model(load_checkpoint(path))
            counts["loaded"] += 1
        except SlimError:
            counts["clean_errors"] += 1
        except Exception as exc:
            counts["crashes"] += 1
            crashes.append(f"{i}: {type(exc).__name__}: {exc}")
        if i % cli_every == 0:
            counts["cli_runs"] += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = runner.invoke(app, ["inspect", str(path), "--json"])
            if result.exception is None or isinstance(result.exception, (SlimError, SystemExit)):
                counts["cli_clean"] += 1
            else:
                counts["cli_crashes"] += 1
                crashes.append(f"{i} (inspect): {type(result.exception).__name__}: {result.exception}")
    counts["crash_list"] = crashes  # type: ignore[assignment]
    return counts


def test_fuzz_a_valid_checkpoint(valid_bytes: bytes, tmp_path: Path) -> None:
    counts = fuzz(valid_bytes, tmp_path, 300)
    assert counts["crashes"] == 0 and counts["cli_crashes"] == 0, counts["crash_list"]
    assert counts["clean_errors"] > 150  # the mutations do damage: most are refused, cleanly
    assert counts["loaded"] + counts["clean_errors"] == counts["inputs"] == 300


# ----------------------------------------------------------------------------------------------
# unwritable and full output folders


@contextlib.contextmanager
def small_mount(tmp_path: Path, options: str) -> Iterator[Path | None]:
    """A small tmpfs mounted at ``tmp_path/mnt`` (None where this process may not mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@contextlib.contextmanager
def unwritable_folder(tmp_path: Path, kind: str) -> Iterator[Path]:
    """A read-only or a full folder: a tmpfs where possible, else chmod 0o555 (read-only only)."""
    with small_mount(tmp_path, "size=256k" + (",ro" if kind == "read-only" else "")) as mnt:
        if mnt is not None:
            if kind == "full":
                with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
            yield mnt
            return
        if kind == "full" or os.geteuid() == 0:
            pytest.skip("cannot mount a tmpfs here, and chmod does not stop root / cannot fill a disk")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_unwritable_output_folders_fail_before_any_work(
    kind: str, valid_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "best.safetensors"
    ckpt.write_bytes(valid_bytes)
    with unwritable_folder(tmp_path, kind) as folder:
        cases = {
            "sparsify-train": ["sparsify-train", "--arch", ARCH, "--dataset", DATA, "--epochs", "1",
                               "--out", str(folder / "run"), "--device", "cpu", "--threads", "1", "--quiet"],
            "finetune": ["finetune", str(ckpt), "--epochs", "1", "--out", str(folder / "ft"),
                         "--device", "cpu",
                         "--threads", "1", "--quiet"],
            "prune --out": ["prune", str(ckpt), "--ratio", "0.3", "--recalibrate", "0",
                            "--out", str(folder / "p.safetensors")],
            "prune --export": ["prune", str(ckpt), "--ratio", "0.3", "--recalibrate", "0",
                               "--out", str(tmp_path / "p.safetensors"), "--export", str(folder / "p.onnx")],
            "export": ["export", str(ckpt), str(folder / "m.onnx"), "--no-real-data", "--latency-runs", "0"],
            "sweep": ["sweep", str(ckpt), "--ratios", "0.3", "--recalibrate", "0",
                      "--out", str(folder / "sw")],
        }
        for name, argv in cases.items():
            code, _, err = run_clean(argv, capsys)
            assert code == 1 and len(error_lines(err)) == 1 and "Traceback" not in err, (name, err)
            assert "training" not in err and "pruning" not in err, (name, err)  # no work was started
        assert not (tmp_path / "p.safetensors").exists()  # prune --export: nothing half-written


# ----------------------------------------------------------------------------------------------
# a diverging run, a crash between the state and the model write


def test_a_diverging_run_stops_and_keeps_no_nan_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code, _, err = run_clean(["sparsify-train", "--arch", ARCH, "--dataset", DATA, "--epochs", "1",
                              "--lr", "1e6", "--out", str(run), "--device", "cpu", "--threads", "1", "-q"],
                             capsys)
    assert code == 1 and len(error_lines(err)) == 1 and ("diverged" in err or "became" in err), err
    for name in ("best.safetensors", "last.safetensors"):
        if (run / name).exists():  # whatever was kept is finite
            assert all(torch.isfinite(t).all() for t in load_checkpoint(run / name).tensors.values()
                       if t.is_floating_point())
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    nan = make_checkpoint(tmp_path / "nan.safetensors", nan=True)
    code, _, err = run_clean(["prune", str(nan), "--ratio", "0.3", "--recalibrate", "0"], capsys)
    assert code == 1 and len(error_lines(err)) == 1 and "non-finite" in err and err.count("NaN") == 1, err


def test_a_crash_between_state_and_model_write_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimcli import checkpoint as ck
    from slimcli.train import TrainConfig, train

    run = tmp_path / "run"
    cfg = TrainConfig(arch=ARCH, dataset=DATA, epochs=2, batch_size=16, device="cpu", threads=1, out=str(run),
                      quiet=True)
    straight = train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "straight")}))
    real, writes = ck._atomic_write, []

    def crash_on_second_model_write(target: Path, data: bytes) -> None:
        writes.append(target.name)
        if writes.count("last.safetensors") == 2 and target.name == "last.safetensors":
            raise KeyboardInterrupt  # the process dies after the state write, before the model write
        real(target, data)

    monkeypatch.setattr(ck, "_atomic_write", crash_on_second_model_write)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(ck, "_atomic_write", real)
    with pytest.warns(UserWarning, match="previous state"):
        resumed = train(TrainConfig(resume=str(run), stage="sparsify", device="cpu", threads=1, quiet=True))
    assert resumed.epochs == 2
    mine, other = (load_checkpoint(d / "last.safetensors").tensors for d in (run, tmp_path / "straight"))
    assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)
    assert straight.epochs == 2


# ----------------------------------------------------------------------------------------------
# no silent overwrite; nonsense options


def test_outputs_are_never_replaced_without_force(
    valid_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "best.safetensors"
    ckpt.write_bytes(valid_bytes)
    prune = ["prune", str(ckpt), "--recalibrate", "0", "--export", str(tmp_path / "p.onnx")]
    assert run_clean([*prune, "--ratio", "0.3"], capsys)[0] == 0
    first = {p: file_sha256(tmp_path / p) for p in ("best-pruned.safetensors", "p.onnx")}
    code, _, err = run_clean([*prune, "--ratio", "0.5"], capsys)
    assert code == 2 and "--force" in err and len(error_lines(err)) == 1
    assert {p: file_sha256(tmp_path / p) for p in first} == first
    assert run_clean([*prune, "--ratio", "0.5", "--force"], capsys)[0] == 0
    assert file_sha256(tmp_path / "best-pruned.safetensors") != first["best-pruned.safetensors"]

    export = ["export", str(ckpt), str(tmp_path / "p.onnx"), "--no-real-data", "--latency-runs", "0"]
    before = file_sha256(tmp_path / "p.onnx")
    code, _, err = run_clean(export, capsys)
    assert code == 2 and "--force" in err and file_sha256(tmp_path / "p.onnx") == before
    assert run_clean([*export, "--force"], capsys)[0] == 0

    # a file output into a missing folder: one rule for --out and --export (the folder must exist)
    for flag, name in (("--out", "x.safetensors"), ("--export", "x.onnx")):
        missing = tmp_path / "missing" / name  # (a second --out wins over the first)
        code, _, err = run_clean(["prune", str(ckpt), "--ratio", "0.3", "--recalibrate", "0",
                                  "--out", str(tmp_path / "y.safetensors"), flag, str(missing)], capsys)
        assert code == 1 and "does not exist" in err and not (tmp_path / "missing").exists(), err

    ft = ["finetune", str(ckpt), "--epochs", "0", "--out", str(tmp_path / "ft"), "--device", "cpu",
          "--threads", "1", "--quiet"]
    assert run_clean(ft, capsys)[0] == 0
    best = file_sha256(tmp_path / "ft" / "best.safetensors")
    code, _, err = run_clean(ft, capsys)
    assert code == 2 and "--force" in err and file_sha256(tmp_path / "ft" / "best.safetensors") == best
    assert run_clean([*ft, "--force"], capsys)[0] == 0


def test_nonsense_options_are_refused_or_warned(
    valid_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "best.safetensors"
    ckpt.write_bytes(valid_bytes)
    code, _, err = run_clean(["prune", str(ckpt), "--ratio", "0.3", "--recalibrate", "0", "--min-channels",
                              "1000"], capsys)
    assert code == 1 and "widest prunable layer has" in err
    assert not (tmp_path / "best-pruned.safetensors").exists()
    for momentum in ("1", "2", "-0.1", "nan"):
        code, _, err = run_clean(["sparsify-train", "--momentum", momentum, "--epochs", "0"], capsys)
        assert code == 2 and "[0, 1)" in err, err
    code, _, err = run_clean(["finetune", str(ckpt), "--epochs", "0", "--out", str(tmp_path / "ft"),
                              "--device", "cpu", "--amp", "fp16", "--threads", "1", "--quiet"], capsys)
    assert code == 0 and "warning: --amp fp16 on the CPU" in err and "--amp off" in err


def test_thread_probe_is_bounded_and_says_what_it_does() -> None:
    from slimcli.train.threads import PROBE_BATCH, pick_threads

    torch.manual_seed(0)
    model = create_arch(ARCH, 4, (1, 16, 16))
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 4, (64,))
    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chosen, timings = pick_threads(model, x, y, contextlib.nullcontext, budget_s=0.0, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert chosen in timings and set(timings) == {2, 1}
    assert len(lines) == 2 and "timing 2 thread counts" in lines[0] and f"{PROBE_BATCH} images" in lines[0]
    assert f"using {chosen} thread" in lines[1]


def test_progress_lines_and_eta_without_a_terminal() -> None:
    import io

    from rich.console import Console

    from slimcli.train.progress import PLAIN_EVERY_S, Eta, PlainReporter, clock_text, make_reporter

    now = [0.0]
    buf = io.StringIO()
    rep = make_reporter(Console(file=buf, width=200), quiet=False)
    assert isinstance(rep, PlainReporter) and rep.every_s == PLAIN_EVERY_S
    rep.eta = Eta(clock=lambda: now[0])
    rep.epochs = 3
    rep.epoch_start(1, 3, 100, 0)
    stats = {"loss": 1.0, "acc": 0.5, "lr": 0.1, "images_per_s": 10.0, "frac_below_1e-2": 0.0}
    now[0] = 1.0
    rep.step(10, stats)  # too soon for a line
    now[0] = PLAIN_EVERY_S + 1
    rep.step(20, stats)
    lines = buf.getvalue().splitlines()
    per_step = (PLAIN_EVERY_S + 1) / 20
    assert len(lines) == 1 and "step 20/100" in lines[0]
    assert f"ETA {clock_text(80 * per_step)} (run {clock_text(80 * per_step + 200 * per_step)})" in lines[0]
    quiet = make_reporter(Console(file=io.StringIO()), quiet=True)
    assert isinstance(quiet, PlainReporter) and quiet.every_s is None


if __name__ == "__main__":
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    with tempfile.TemporaryDirectory() as tmp:
        data = make_checkpoint(Path(tmp) / "valid.safetensors").read_bytes()
        result = fuzz(data, Path(tmp), n)
    print(json.dumps({k: v for k, v in result.items() if k != "crash_list"}))
    for line in result["crash_list"]:  # type: ignore[union-attr]
        print("crash", line)
