"""`slim sparsify-train` and `slim finetune` on the command line: results, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import run_cli

from slimcli.checkpoint import load_checkpoint
from slimcli.cli import _train_options as train_options
from slimcli.train import Reporter

ARCH = "vgg11:width=0.125"
DATA = "synthetic:n=128,n_test=64,size=16,channels=1,classes=4"


pytestmark = pytest.mark.usefixtures("one_thread")


def slim(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["slim", *args])  # the lineage records the process's command line
        return run_cli(list(args), capsys)


def small(out: Path, *extra: str) -> list[str]:
    return ["sparsify-train", "--arch", ARCH, "--dataset", DATA, "--epochs", "1", "--batch-size", "32",
            "--device", "cpu", "--out", str(out), "--quiet", *extra]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("Error")]


def test_sparsify_train_then_finetune(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out, err = slim(capsys, *small(run, "--penalty", "tl1:a=0.5", "--lam", "1e-3"))
    assert code == 0, err
    assert "best test accuracy" in out and str(run) in out and "slim prune" in out  # summary on stdout
    assert "epoch 1/1" in err and "Traceback" not in err  # progress on stderr, plain (not a TTY)
    assert "for 1 epoch: penalty tl1:a=0.5 λ=0.001 (subgradient)," in err
    meta = load_checkpoint(run / "last.safetensors").meta
    assert meta["train"]["penalty"] == "tl1:a=0.5" and meta["train"]["lam"] == 1e-3
    assert meta["lineage"][0]["command"].startswith("slim sparsify-train")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    ft = tmp_path / "ft"
    code, out, err = slim(capsys, "finetune", str(run / "best.safetensors"), "--epochs", "1",
                          "--batch-size", "32", "--device", "cpu", "--out", str(ft), "--quiet")
    assert code == 0, err
    assert "for 1 epoch: no penalty," in err  # not a meaningless "λ=0.0001"
    assert f"next: slim export {ft / 'best.safetensors'} model.onnx" in out
    meta = load_checkpoint(ft / "last.safetensors").meta
    assert meta["stage"] == "finetuned" and meta["train"]["penalty"] == "none" and meta["dataset"] == DATA
    assert meta["lineage"][-1]["command"].startswith("slim finetune")
    assert json.loads((ft / "metrics.jsonl").read_text())["penalty"] == 0.0

    # the same --out again: refused, pointing at --resume
    code, _, err = slim(capsys, *small(run))
    assert code == 2 and f"slim sparsify-train --resume {run}" in err and len(error_lines(err)) == 1
    # --resume takes the saved options; others are refused
    code, _, err = slim(capsys, "sparsify-train", "--resume", str(run), "--lr", "0.5")
    assert code == 2 and "--lr" in err and "saved options" in err
    # a checkpoint file instead of its run folder: the folder to pass
    code, _, err = slim(capsys, "sparsify-train", "--resume", str(run / "best.safetensors"))
    assert code == 2 and err.strip().endswith(f"pass the run folder that holds it: --resume {run}"), err
    code, out, err = slim(capsys, "sparsify-train", "--resume", str(run), "--quiet", "--device", "cpu")
    assert code == 0 and "epochs" in out  # already complete: nothing to do, summary again
    code, _, err = slim(capsys, "finetune", "--device", "cpu")
    assert code == 2 and "checkpoint" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dataset", "cifar11"], "Did you mean 'cifar10'"),
        (["--arch", "vgg12"], "unknown arch 'vgg12'"),
        (["--penalty", "tl2"], "Did you mean 'tl1'"),
        (["--penalty", "lp:p=1.5"], "0 < p < 1"),
        (["--penalty", "tl1:b=1"], "unknown option 'b'"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "-1"], "--epochs"),
        (["--lr", "0"], "--lr"),
        (["--lam", "-1"], "--lam"),
        (["--device", "gpu"], "cuda:N"),
        (["--milestones", "0.5,2"], "fractions of the epochs"),
        (["--amp", "fp8"], "--amp"),
        (["--update", "adam"], "--update"),
        (["--seed", str(2**64)], "torch's seed range"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str],
                             needle: str) -> None:
    code, out, err = slim(capsys, "sparsify-train", "--out", str(tmp_path / "r"), *args)
    assert code == 2 and needle in err, err
    assert len(error_lines(err)) == 1 and "Traceback" not in err and out == ""
    assert not (tmp_path / "r").exists()


def test_runtime_errors_exit_1_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        code, _, err = slim(capsys, *small(tmp_path / "r", "--device", "cuda"))
        assert code == 1
        assert err.strip() == "Error: --device cuda: no CUDA device is available here; use --device cpu"
    # cifar10 files absent and downloads forbidden: the dataset's DataError
    monkeypatch.setenv("SLIM_OFFLINE", "1")
    monkeypatch.setenv("SLIM_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, _, err = slim(capsys, "sparsify-train", "--arch", ARCH, "--dataset", "cifar10", "--device", "cpu",
                        "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not found" in err and "--data-dir" in err
    # a missing checkpoint for finetune
    code, _, err = slim(capsys, "finetune", str(tmp_path / "missing.safetensors"), "--device", "cpu")
    assert code == 1 and "not found" in err and len(err.strip().splitlines()) == 1


def test_proximal_needs_a_prox(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, noprox_penalty: str
) -> None:
    code, _, err = slim(capsys, *small(tmp_path / "r", "--penalty", noprox_penalty, "--update", "proximal"))
    assert code == 2 and "--update subgradient" in err and len(error_lines(err)) == 1


class _CtrlCAfterEpoch(Reporter):
    """Sends SIGINT to this process at the end of epoch 1, as a Ctrl-C in the terminal would."""

    def epoch_end(self, record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)


def test_finetune_interrupted_then_resumed(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = slim(capsys, *small(tmp_path / "run", "--threads", "1"))
    assert code == 0, err
    parent = str(tmp_path / "run" / "best.safetensors")
    args = ["finetune", parent, "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--quiet",
            "--threads", "1"]
    code, _, err = slim(capsys, *args, "--out", str(tmp_path / "straight"))
    assert code == 0, err

    ft = tmp_path / "ft"
    with monkeypatch.context() as mp:
        mp.setattr(train_options, "make_reporter", lambda console, quiet: _CtrlCAfterEpoch())
        code, out, err = slim(capsys, *args, "--out", str(ft))
    assert code == 130 and out == ""
    assert err.startswith(f"Interrupted after epoch 1; state saved in {ft}."), err
    assert f"Resume with: slim finetune --resume {ft}" in err
    # the command the message names works and finishes the run exactly as if never stopped
    code, out, err = slim(capsys, "finetune", "--resume", str(ft), "--quiet")
    assert code == 0, err
    assert "finetuned run" in out and "resuming" in err
    straight = load_checkpoint(tmp_path / "straight" / "last.safetensors").tensors
    resumed = load_checkpoint(ft / "last.safetensors").tensors
    assert straight.keys() == resumed.keys()
    assert [n for n, v in straight.items() if not torch.equal(resumed[n], v)] == []  # bit for bit
    # a finished run resumed again: nothing to do, the summary once more
    code, out, _ = slim(capsys, "finetune", "--resume", str(ft), "--quiet")
    assert code == 0 and "finetuned run" in out
    # the other command is refused, naming the right one
    code, _, err = slim(capsys, "sparsify-train", "--resume", str(ft), "--quiet")
    assert code == 2 and f"resume it with: slim finetune --resume {ft}" in err


def test_zero_epochs_lists_only_the_files_written(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from slimcli.cli._common import out as console

    monkeypatch.setattr(console, "_width", 200)
    run = tmp_path / "r0"
    code, out, err = slim(capsys, *small(run, "--threads", "1", "--epochs", "0"))  # the last --epochs wins
    assert code == 0, err
    row = next(line for line in out.splitlines() if "│ files" in line)
    written = sorted(p.name for p in run.iterdir())
    assert "best.safetensors" in row and "last.safetensors (+ .state)" in row
    assert ("metrics.jsonl" in row) == ("metrics.jsonl" in written)


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 2304000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_a_model_too_big_for_memory_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                failure: BaseException) -> None:
    from slimcli.registry import ARCHS, register_arch

    @register_arch("test-huge")
    class Huge(torch.nn.Module):
        """Fails in its constructor as torch does when the weights do not fit in memory."""

        def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
            raise failure

    try:
        code, out, err = slim(capsys, *small(tmp_path / "r", "--arch", "test-huge"))
    finally:
        ARCHS.unregister("test-huge")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("Error: not enough memory to build test-huge")
    assert "choose a smaller width or depth" in err
    assert ("2,145.8 GiB" in err) == isinstance(failure, RuntimeError)
