"""The training loop end to end on tiny models and data: files, metadata, resume == uninterrupted,
SIGINT handling, the penalty's effect, non-finite losses, finetune lineage."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from slimcli.checkpoint import file_sha256, load_checkpoint, load_state
from slimcli.errors import TrainingError, UsageError
from slimcli.model import Normalizer, build_model, evaluate_tensors
from slimcli.penalties import Penalty
from slimcli.registry import PENALTIES, Option, register_penalty
from slimcli.train import Reporter, TrainConfig, TrainingInterrupted, train
from slimcli.train import engine as engine_mod
from slimcli.train.device import Precision

ARCH = "vgg11:width=0.125"
DATA = "synthetic:n=512,n_test=128,size=16,channels=1,classes=4"  # 16 steps of 32 per epoch
TIMING = {"images_per_s", "seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"arch": ARCH, "dataset": DATA, "epochs": 2, "batch_size": 32, "lr": 0.1,
                            "lam": 1e-3, "device": "cpu", "out": str(out), "command": "slim test"}
    base.update(kw)
    return TrainConfig(**base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).tensors


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit for bit, as docs/training.md promises for a resumed CPU run (not to a tolerance)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"resumed weights differ from the straight run's in {differ}"


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: Path, b: Path) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [r["epoch"] for r in mb] == [r["epoch"] for r in ma]  # no duplicated or missing lines
    for ra, rb in zip(ma, mb, strict=True):
        for key in ra.keys() - TIMING:
            assert rb[key] == ra[key], key  # the same floats: the same arithmetic in the same order


class SignalAt(Reporter):
    """Sends SIGINT to this process at (epoch, step); step None = at the end of that epoch."""

    def __init__(self, epoch: int, step: int | None = None) -> None:
        self.epoch, self.at, self.current = epoch, step, 0

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.current = epoch

    def step(self, done: int, stats: dict[str, float]) -> None:
        if self.at is not None and self.current == self.epoch and done == self.at:
            os.kill(os.getpid(), signal.SIGINT)

    def epoch_end(self, record: dict[str, Any]) -> None:
        if self.at is None and record["epoch"] == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 2 epochs without interruption."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("straight") / "run"
    train(cfg(run))
    return run


# ---------------------------------------------------------------------------------------
# files and metadata
# ---------------------------------------------------------------------------------------
def test_run_dir_files_metrics_and_metadata(straight: Path) -> None:
    assert {p.name for p in straight.iterdir()} == {  # .prev.state: the previous epoch's
        "best.safetensors", "last.safetensors", "last.state.safetensors", "last.prev.state.safetensors",
        "metrics.jsonl"}
    rows = metrics(straight)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "penalty",
                            "frac_below_1e-2", "frac_below_1e-4", "images_per_s", "seconds"}
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.01])  # milestones 0.5, 0.75 of 2 epochs
    assert all(0 <= r["frac_below_1e-4"] <= r["frac_below_1e-2"] <= 1 for r in rows)

    last = load_checkpoint(straight / "last.safetensors")
    meta = last.meta
    assert meta["stage"] == "sparsify" and meta["arch"] == "vgg:depth=11,width=0.125"
    assert meta["dataset"] == DATA and meta["num_classes"] == 4 and meta["input_shape"] == [1, 16, 16]
    assert meta["classes"] == ["class0", "class1", "class2", "class3"]
    assert set(meta["normalization"]) == {"mean", "std"}
    train_meta = meta["train"]
    assert (train_meta["penalty"], train_meta["lam"], train_meta["update"]) == ("l1", 1e-3, "subgradient")
    assert train_meta["optimizer"]["milestones"] == [1, 2] and train_meta["amp"] == "off"
    assert meta["metrics"]["sparsify"]["epoch"] == 2
    assert meta["metrics"]["sparsify"]["test_acc"] == pytest.approx(rows[-1]["test_acc"])
    assert len(meta["lineage"]) == 1 and meta["lineage"][0]["stage"] == "sparsify"
    assert meta["lineage"][0]["parent"] is None and meta["lineage"][0]["command"] == "slim test"

    # the penalty value is λ·Σ|γ| of the saved model
    gammas = [v for k, v in last.tensors.items() if k.endswith(".weight") and v.ndim == 1]
    assert rows[-1]["penalty"] == pytest.approx(1e-3 * float(sum(g.abs().sum() for g in gammas)), rel=1e-5)
    # best.safetensors is the epoch with the best test accuracy, and re-evaluating it agrees
    best = load_checkpoint(straight / "best.safetensors")
    best_row = max(rows, key=lambda r: r["test_acc"])
    assert best.meta["metrics"]["sparsify"]["epoch"] == best_row["epoch"]
    from slimcli.data import create_dataset

    ds = create_dataset(DATA)
    x, y = ds.load("test")
    loss, acc = evaluate_tensors(build_model(best), x, y, Normalizer(ds.mean, ds.std, torch.device("cpu")),
                                 1000, Precision("off", None, False).dtype)
    assert acc == pytest.approx(best_row["test_acc"])
    assert loss == pytest.approx(best_row["test_loss"], rel=1e-5)
    # the state file pairs with last.safetensors and carries the config
    _, smeta = load_state(straight / "last.safetensors")
    assert smeta["loop"]["epoch"] == 2 and smeta["loop"]["step"] == 0 and smeta["config"]["epochs"] == 2


def test_gamma_init_fills_every_bn_scale(tmp_path: Path) -> None:
    train(cfg(tmp_path / "r", epochs=0, gamma_init=0.25))
    ckpt = load_checkpoint(tmp_path / "r" / "last.safetensors")
    gammas = [v for k, v in ckpt.tensors.items() if k.endswith(".weight") and v.ndim == 1]
    assert len(gammas) == 8 and all(torch.all(g == 0.25) for g in gammas)  # vgg11: 8 BN layers
    assert "sparsify" in ckpt.meta["metrics"] and not (tmp_path / "r" / "metrics.jsonl").exists()


def test_refuses_to_overwrite_a_run(straight: Path) -> None:
    with pytest.raises(UsageError, match="--resume"):
        train(cfg(straight))


# ---------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------
def test_resume_after_an_epoch_equals_straight_run(straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg(run), SignalAt(epoch=1))
    assert info.value.exit_code == 130 and f"slim sparsify-train --resume {run}" in str(info.value)
    assert [r["epoch"] for r in metrics(run)] == [1]
    result = train(TrainConfig(resume=str(run), device="cpu"))
    assert result.epochs == 2
    assert_same_weights(straight / "last.safetensors", run / "last.safetensors")
    assert_same_metrics(straight, run)


def test_resume_mid_epoch_equals_straight_run(straight: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "REPORT_EVERY_S", 0.0)  # a progress call after every step
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="in epoch 2 at step 6/16"):
        train(cfg(run), SignalAt(epoch=2, step=5))  # sent after step 5, seen after step 6
    _, smeta = load_state(run / "last.safetensors")
    assert smeta["loop"]["epoch"] == 1 and smeta["loop"]["step"] == 6  # the running step finished
    train(TrainConfig(resume=str(run), device="cpu"))
    assert_same_weights(straight / "last.safetensors", run / "last.safetensors")
    assert_same_metrics(straight, run)  # the epoch's running loss/accuracy survive the interruption


def test_resume_truncates_metrics_written_after_the_saved_state(straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(cfg(run), SignalAt(epoch=1))
    with open(run / "metrics.jsonl", "a") as f:  # as if a crash hit between the metrics line and the save
        f.write(json.dumps({"epoch": 2, "test_acc": 0.0}) + "\n")
    train(TrainConfig(resume=str(run), device="cpu"))
    assert_same_metrics(straight, run)


def test_resume_of_a_finished_run_trains_nothing(straight: Path) -> None:
    before = file_sha256(straight / "last.safetensors")
    result = train(TrainConfig(resume=str(straight), device="cpu"))
    assert result.epochs == 2 and result.last is not None and result.last["epoch"] == 2
    assert file_sha256(straight / "last.safetensors") == before


def test_thread_count_is_picked_recorded_and_restored(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    train(cfg(tmp_path / "r", dataset="synthetic:n=64,n_test=32,size=16,channels=1,classes=4", epochs=1,
              threads=0))
    assert torch.get_num_threads() == 2  # the caller's setting is restored
    _, smeta = load_state(tmp_path / "r" / "last.safetensors")
    chosen = smeta["config"]["threads"]  # a resume trains with the same count
    assert chosen in (1, 2)
    assert load_checkpoint(tmp_path / "r" / "last.safetensors").meta["train"]["threads"] == chosen


def test_resume_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nothing to resume"):
        train(TrainConfig(resume=str(tmp_path)))


def test_sigint_in_a_subprocess_then_resume(straight: Path, tmp_path: Path) -> None:
    """The real thing: Ctrl-C while `slim sparsify-train` runs, exit 130, resume to the same weights."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    args = [sys.executable, "-m", "slimcli", "sparsify-train", "--arch", ARCH, "--dataset", DATA,
            "--epochs", "2", "--batch-size", "32", "--lr", "0.1", "--lam", "1e-3", "--device", "cpu",
            "--out", str(run), "--quiet"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = proc.stderr.readline()  # printed once the signal handlers are in place
    assert first.startswith("training "), first + proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (very fast machine)")
    assert proc.returncode == 130, stderr
    assert f"slim sparsify-train --resume {run}" in stderr and "Traceback" not in stderr
    assert (run / "last.state.safetensors").exists()
    from slimcli.cli import main

    with pytest.raises(SystemExit) as done:
        main(["sparsify-train", "--resume", str(run), "--quiet", "--device", "cpu"])
    assert done.value.code in (0, None)
    assert_same_weights(straight / "last.safetensors", run / "last.safetensors")
    assert_same_metrics(straight, run)


# ---------------------------------------------------------------------------------------
# the penalty
# ---------------------------------------------------------------------------------------
def _gammas(run: Path) -> torch.Tensor:
    t = load_checkpoint(run / "last.safetensors").tensors
    return torch.cat([v for k, v in t.items() if k.endswith(".weight") and v.ndim == 1])


def test_penalty_drives_gammas_to_zero(tmp_path: Path) -> None:
    none = train(cfg(tmp_path / "a", lam=0.0)).last
    strong = train(cfg(tmp_path / "b", lam=0.5)).last
    assert none is not None and strong is not None
    assert none["frac_below_1e-2"] == 0.0 and none["penalty"] == 0.0
    assert strong["frac_below_1e-2"] > 0.5
    assert _gammas(tmp_path / "b").abs().mean() < 0.1 * _gammas(tmp_path / "a").abs().mean()


def test_proximal_l1_gives_exact_zeros_subgradient_does_not(tmp_path: Path) -> None:
    train(cfg(tmp_path / "prox", lam=1.0, update="proximal", epochs=1))
    train(cfg(tmp_path / "sub", lam=1.0, update="subgradient", epochs=1))
    assert (_gammas(tmp_path / "prox") == 0).float().mean() > 0.5
    assert (_gammas(tmp_path / "sub") == 0).sum() == 0


def test_proximal_without_prox_is_refused_before_training(tmp_path: Path, noprox_penalty: str) -> None:
    with pytest.raises(UsageError, match="no closed-form proximal map"):
        train(cfg(tmp_path / "r", penalty=noprox_penalty, update="proximal", dataset="cifar10"))
    assert not (tmp_path / "r").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    @register_penalty("test-nan-after")
    class NanAfter(Penalty):
        """Poisons γ after ``after`` steps."""

        options = (Option("after", int, 20),)
        calls = 0

        def value(self, x: torch.Tensor) -> torch.Tensor:
            return x.abs().sum()

        def subgradient(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return torch.full_like(x, math.nan) if self.calls > self.after else torch.sign(x)

    run = tmp_path / "r"
    try:
        kept = r"became nan in epoch 2.*last.safetensors \(epoch 1\) is kept"
        with pytest.raises(TrainingError, match=kept):
            train(cfg(run, penalty="test-nan-after"))
    finally:
        PENALTIES.unregister("test-nan-after")
    assert [r["epoch"] for r in metrics(run)] == [1]
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.meta["metrics"]["sparsify"]["epoch"] == 1
    assert all(torch.isfinite(t.float()).all() for t in ckpt.tensors.values())


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_autocast_paths_run_on_cpu(tmp_path: Path, amp: str) -> None:
    # λ = 1 moves γ from 0.5 to ≈ −0.33 in 4 steps; under fp16 the penalty must act on unscaled
    # gradients, so γ matches the fp32 run (added to 65536×-scaled gradients it would not move)
    small = "synthetic:n=128,n_test=64,size=16,channels=1,classes=4"
    r = train(cfg(tmp_path / "r", dataset=small, amp=amp, epochs=1, lam=1.0))
    train(cfg(tmp_path / "fp32", dataset=small, amp="off", epochs=1, lam=1.0))
    assert r.precision == amp and r.last is not None and math.isfinite(r.last["train_loss"])
    mixed, full = _gammas(tmp_path / "r"), _gammas(tmp_path / "fp32")
    assert (mixed - full).abs().max() < 0.05 and (full - 0.5).abs().min() > 0.5
    assert load_checkpoint(tmp_path / "r" / "last.safetensors").meta["train"]["amp"] == amp


# ---------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------
def test_finetune_keeps_model_and_records_lineage(straight: Path, tmp_path: Path) -> None:
    parent = straight / "best.safetensors"
    run = tmp_path / "ft"
    result = train(cfg(run, stage="finetuned", parent=str(parent), arch="ignored", dataset=None,
                       penalty="none", epochs=1, gamma_init=None))
    assert result.stage == "finetuned"
    meta = load_checkpoint(run / "best.safetensors").meta
    pmeta = load_checkpoint(parent).meta
    assert meta["stage"] == "finetuned" and meta["arch"] == pmeta["arch"] and meta["dataset"] == DATA
    assert [e["stage"] for e in meta["lineage"]] == ["sparsify", "finetuned"]
    assert meta["lineage"][-1]["parent"] == file_sha256(parent)
    assert set(meta["metrics"]) == {"sparsify", "finetuned"}
    assert meta["train"]["penalty"] == "none" and metrics(run)[0]["penalty"] == 0.0
    # the run continues from the parent's weights, not from a fresh init
    with pytest.raises(TrainingInterrupted, match="slim finetune --resume"):
        train(cfg(tmp_path / "ft2", stage="finetuned", parent=str(parent), dataset=None, penalty="none",
                  epochs=1), SignalAt(epoch=1))


def test_finetune_of_a_pruned_checkpoint(straight: Path, tmp_path: Path) -> None:
    from slimcli.checkpoint import save_checkpoint
    from slimcli.prune import compute_keep, prune_model

    parent = load_checkpoint(straight / "best.safetensors")
    dense = build_model(parent)
    slim_model, report = prune_model(dense, compute_keep(dense, "ratio", 0.3))
    widths = dict(report.widths)
    path = tmp_path / "pruned.safetensors"
    save_checkpoint(path, slim_model, {**parent.meta, "stage": "pruned", "widths": widths})
    train(cfg(tmp_path / "ft", stage="finetuned", parent=str(path), dataset=None, penalty="none", epochs=1))
    ckpt = load_checkpoint(tmp_path / "ft" / "last.safetensors")
    assert ckpt.meta["widths"] == widths and ckpt.meta["stage"] == "finetuned"
    rebuilt = build_model(ckpt)
    assert sum(p.numel() for p in rebuilt.parameters()) == report.params_after < report.params_before
    assert metrics(tmp_path / "ft")[0]["test_acc"] > 0.25  # it trains (4 classes: chance is 0.25)


def test_finetune_dataset_must_fit_the_model(straight: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="classes"):
        train(cfg(tmp_path / "ft", stage="finetuned", parent=str(straight / "best.safetensors"),
                  dataset="synthetic:n=64,size=16,channels=1,classes=3"))


def test_rich_progress_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from slimcli.train import RichReporter, make_reporter

    monkeypatch.setattr(engine_mod, "REPORT_EVERY_S", 0.0)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    reporter = make_reporter(console, quiet=False)
    assert isinstance(reporter, RichReporter)
    assert not isinstance(make_reporter(console, quiet=True), RichReporter)
    assert not isinstance(make_reporter(Console(file=io.StringIO()), quiet=False), RichReporter)  # not a TTY
    train(cfg(tmp_path / "r", dataset="synthetic:n=64,n_test=32,size=16,channels=1,classes=4", epochs=1),
          reporter)
    text = buf.getvalue()
    assert "epoch 1/1" in text and "img/s" in text and "γ<1e-2" in text
