"""torchrun DDP on the CPU (gloo): 2 ranks agree bit for bit, match one process with the same
global batch, write one checkpoint set, and a Ctrl-C'd run resumes to the uninterrupted result.

Each run is a real ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m slimcli``
subprocess (sockets on localhost: outside this process's network guard)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimcli.checkpoint import load_checkpoint
from slimcli.model import build_model
from slimcli.train.distributed import state_digest

DATA = "synthetic:n=1024,n_test=64,size=8"
ARGS = ["sparsify-train", "--arch", "resnet56:depth=8", "--dataset", DATA, "--epochs", "2",
        "--batch-size", "32", "--lr", "0.05", "--device", "cpu", "--threads", "1", "--quiet"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "slimcli"]
#: one process vs 2 ranks with --sync-bn: the same mathematics, other float summation orders
#: (gradient all-reduce, Σx/Σx² BatchNorm statistics); measured max |Δ| = 3.6e-7 after 64 steps
PARAM_ATOL = 1e-4


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _model(run_dir: Path) -> torch.nn.Module:
    return build_model(load_checkpoint(run_dir / "last.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: a 2-rank run with --sync-bn, not interrupted."""
    work = tmp_path_factory.mktemp("ddp")
    _run([*TORCHRUN, *ARGS, "--sync-bn", "--out", "ddp"], work)
    return work / "ddp"


def test_two_ranks_agree_write_one_run_and_record_the_batches(straight: Path) -> None:
    names = {p.name for p in straight.iterdir()}
    assert {"best.safetensors", "last.safetensors", "last.state.safetensors", "metrics.jsonl"} <= names
    assert not any("rank" in n for n in names)  # one checkpoint set, not one per rank
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]  # rank 0 alone writes: no doubled line
    ckpt = load_checkpoint(straight / "last.safetensors")
    train = ckpt.meta["train"]
    assert (train["world_size"], train["batch_per_rank"], train["global_batch"]) == (2, 16, 32)
    assert train["sync_bn"] is True
    # every rank hashed its whole state after the last epoch and all hashes were equal (else the run
    # fails); the one recorded is the saved model's: the ranks agree bit for bit with the checkpoint
    assert train["ranks_sha256"] == state_digest(build_model(ckpt))


def test_matches_one_process_with_the_same_global_batch(straight: Path) -> None:
    work = straight.parent
    _run([sys.executable, "-m", "slimcli", *ARGS, "--out", "single"], work)
    ddp, single = _model(straight).state_dict(), _model(work / "single").state_dict()
    assert ddp.keys() == single.keys()
    diff = max((ddp[k].double() - single[k].double()).abs().max().item() for k in ddp)
    moved = max((single[k].double() - _fresh()[k].double()).abs().max().item() for k in single)
    assert diff <= PARAM_ATOL < moved / 10, (diff, moved)  # far closer than training moved them
    m_ddp = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    m_one = [json.loads(x) for x in (work / "single" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m_ddp, m_one, strict=True):  # gathered evaluation and global training sums
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 64)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def _fresh() -> dict[str, torch.Tensor]:
    from slimcli.archs import create_arch

    torch.manual_seed(0)
    return create_arch("resnet56:depth=8", 10, (3, 8, 8)).state_dict()


def test_ctrl_c_saves_and_resume_under_ddp_continues_exactly(straight: Path) -> None:
    work = straight.parent
    args = [*TORCHRUN, *ARGS, "--sync-bn", "--out", "cut"]
    # a Ctrl-C in a terminal reaches torchrun, which forwards SIGINT to every rank
    proc = subprocess.Popen(args, cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = work / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if "Interrupted" not in err:
        pytest.skip("the run finished before the signal arrived (very fast machine)")
    assert proc.returncode != 0
    assert "Resume with: torchrun --nproc_per_node=2 -m slimcli sparsify-train --resume" in err
    assert err.count("Interrupted") == 1  # rank 0 speaks for both
    _run([*TORCHRUN, "sparsify-train", "--resume", "cut", "--device", "cpu", "--quiet"], work)
    assert state_digest(_model(work / "cut")) == state_digest(_model(straight))
    assert (work / "cut" / "metrics.jsonl").read_text().count("\n") == 2
