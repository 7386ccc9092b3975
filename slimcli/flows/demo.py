"""``slim demo``: the whole network-slimming chain on the embedded fashion-mini dataset.

sparsify-train (Tℓ1) → inspect → prune → finetune → export → verify, each step through the
same library function its command uses, ending with one table (params, FLOPs, ONNX size,
onnxruntime latency, test accuracy per stage). Everything is written under one folder.

Settings (:class:`DemoSettings`) are chosen so that the chain runs in about three minutes on
two CPU cores: a quarter-width VGG-11 (578,810 parameters at 28×28), batch 64, 15 epochs of
sparsity training and 5 of fine-tuning. The penalty is Tℓ1 (a = 0.5), the paper's choice for
keeping accuracy right after pruning, with λ = 3e-3: the paper's 1e-4 acts over 160 CIFAR
epochs (~125,000 steps); the demo has ~800 steps, so λ is ~30× larger to drive most |γ| to
near zero in that time (measured: 1e-3 leaves only ~21 % of |γ| below 1e-2; 1e-2 costs the
dense model ~7 points of accuracy). See docs/demo.md.

The pruning ratio is read off the trained scales: the fraction of |γ| the penalty drove
below ``dead_below`` (1e-2), rounded down to the paper's 0.05 grid and capped by the largest
ratio of the grid that empties no layer (below :func:`slimcli.prune.safe_below`). ``ratio`` overrides it.
Pruning folds the removed channels' BN shift into the next layers (``--fold-shift``): measured
on this demo's sparsified VGG-11 it keeps 84.7 % instead of 81.2 % right after pruning at ratio 0.7
(docs/pruning.md); after fine-tuning both end within noise.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from slimcli.checkpoint import load_checkpoint
from slimcli.data import create_dataset
from slimcli.errors import UsageError
from slimcli.export import INPUT_NAME, OUTPUT_NAME, export_checkpoint
from slimcli.export.runtimes import interleaved_latency
from slimcli.flows.inspect import inspect_checkpoint
from slimcli.flows.prune import prune_checkpoint
from slimcli.measure import measure, ort_options
from slimcli.model import Normalizer, build_model, evaluate, normalization_of
from slimcli.train import TrainConfig, train
from slimcli.train.device import resolve_device

Log = Callable[[str], None]

STAGES = ("dense", "pruned", "finetuned", "onnx")
SUMMARY = "summary.json"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and how; the defaults are the ≤ 3-minute chain described above."""

    arch: str = "vgg11:width=0.25"
    dataset: str = "fashion-mini"
    penalty: str = "tl1:a=0.5"
    lam: float = 3e-3
    epochs: int = 15
    finetune_epochs: int = 5
    batch_size: int = 64
    lr: float = 0.1
    finetune_lr: float = 0.01  # the slim model starts trained; 0.1 measured about the same
    seed: int = 0
    device: str = "cpu"
    ratio: float | None = None  # None: read off the trained |γ| (see the module docstring)
    dead_below: float = 1e-2
    latency_runs: int = 50

    @classmethod
    def fast(cls) -> DemoSettings:
        """A seconds-long chain for tests: a tiny VGG, 200 training images, one epoch each."""
        return cls(arch="vgg:depth=11,width=0.0625", dataset="fashion-mini:n_train=200", epochs=1,
                   finetune_epochs=1, latency_runs=3)

    def validate(self) -> DemoSettings:
        if self.epochs < 1 or self.finetune_epochs < 0:
            raise UsageError(f"the demo needs --epochs >= 1 and --finetune-epochs >= 0, got "
                             f"{self.epochs} and {self.finetune_epochs}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise UsageError(f"--ratio must be strictly between 0 and 1, got {self.ratio}")
        return self


@dataclass
class StageRow:
    """One row of the final table."""

    stage: str  # dense | pruned | finetuned | onnx
    params: int
    flops: int
    onnx_bytes: int | None
    latency_ms: float | None  # onnxruntime CPU, batch 1, median
    accuracy: float | None  # test accuracy (onnx: measured in onnxruntime)
    file: str


@dataclass
class DemoResult:
    """Everything the demo measured; ``as_dict`` is what ``summary.json`` holds."""

    out: Path
    settings: DemoSettings
    rows: list[StageRow]
    ratio: float
    ratio_reason: str
    threshold: float | None
    gamma_below: dict[str, int]  # |γ| under 1e-4 … 1e-1 after sparsity training, of gamma_count
    gamma_count: int
    what_if: list[dict[str, Any]]  # a few rows of the inspect what-if table
    min_channels_bit: dict[str, list[int]]
    onnx_max_diff: float
    onnx_disagreements: int  # test images where onnxruntime and PyTorch predict differently
    seconds: dict[str, float] = field(default_factory=dict)

    def row(self, stage: str) -> StageRow:
        return next(r for r in self.rows if r.stage == stage)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def default_out(now: _dt.datetime | None = None) -> Path:
    """``runs/demo-<timestamp>``."""
    return Path("runs") / f"demo-{(now or _dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def choose_ratio(fraction_dead: float, safe: float, step: float = 0.05) -> float:
    """The fraction of near-zero |γ| rounded down to the ``step`` grid, at most ``safe``.

    Falls back to one ``step`` when the penalty left (almost) nothing near zero.
    """
    grid = math.floor(round(fraction_dead / step, 9)) * step
    ratio = min(grid, safe) if safe > 0 else grid
    return round(max(ratio, step), 10)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not an empty folder; choose another --out")


def _onnx_accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor, model: torch.nn.Module,
                   mean: list[float], std: list[float]) -> tuple[float, int]:
    """Test accuracy of an ONNX file in onnxruntime, and how many predictions differ from PyTorch."""
    import onnxruntime as ort


    opts = ort_options(ort)
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    normalize = Normalizer(mean, std, torch.device("cpu"))  # the arithmetic training used
    correct = differ = 0
    model.eval()
    for i in range(0, len(labels), 500):
        x = normalize(images[i : i + 500])
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]).argmax(1)
        with torch.no_grad():
            ref = model(x).argmax(1)
        correct += int((got == labels[i : i + 500]).sum())
        differ += int((got != ref).sum())
    return correct / len(labels), differ


def run_demo(
    settings: DemoSettings | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    log: Log | None = None,
    reporter: Any = None,
) -> DemoResult:
    """Run the chain into ``out`` (default :func:`default_out`); see the module docstring.

    ``log`` receives one line per step (and the reasons for the choices); ``reporter`` is the
    training engine's progress reporter (default: silent).
    """
    settings = (settings or DemoSettings()).validate()
    device = resolve_device(settings.device)  # a missing CUDA fails here, before any training
    say = log or (lambda _msg: None)
    root = Path(out) if out is not None else default_out()
    _check_out(root)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def lap(step: str, t0: float) -> None:
        seconds[step] = round(time.perf_counter() - t0, 2)

    # 1. sparsity training ------------------------------------------------------------------
    t0 = time.perf_counter()
    say(f"1/6 sparsify-train: {settings.arch} on {settings.dataset}, penalty {settings.penalty} "
        f"λ={settings.lam:g}, {settings.epochs} epochs")
    base = TrainConfig(
        arch=settings.arch, dataset=settings.dataset, penalty=settings.penalty, lam=settings.lam,
        epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
        device=settings.device, amp="off", out=str(root / "sparsify"), quiet=True, stage="sparsify",
        command=f"slim sparsify-train --arch {settings.arch} --dataset {settings.dataset} "
                f"--penalty {settings.penalty} --lam {settings.lam:g} --epochs {settings.epochs} (slim demo)",
    )
    train(base, reporter)
    dense_path = root / "sparsify" / "last.safetensors"
    lap("sparsify-train", t0)

    # 2. inspect: how sparse did γ get, what would each ratio do --------------------------------
    t0 = time.perf_counter()
    say("2/6 inspect: |γ| distribution and the what-if table")
    dense_ckpt = load_checkpoint(dense_path)  # read once: inspect and export use it too
    doc = inspect_checkpoint(dense_ckpt, ratios=[0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    gamma = doc["gamma"]
    below = {k: int(v) for k, v in gamma["below"].items()}
    dead = below.get(f"{settings.dead_below:g}")
    if dead is None:  # a cut-off inspect does not report: count it here
        model = build_model(dense_ckpt)
        dead = sum(int((m.weight.detach().abs() < settings.dead_below).sum()) for m in model.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None)
    count = int(gamma["count"])
    bound = doc["safe_below"]  # ratio R empties no layer iff R < bound: the largest such R of the grid
    safe = max((k / 20 for k in range(1, 20) if k / 20 < bound), default=0.0) if bound is not None else 0.0
    if settings.ratio is not None:
        ratio, reason = settings.ratio, "given with --ratio"
    else:
        ratio = choose_ratio(dead / count if count else 0.0, safe)
        reason = (f"{dead / count:.1%} of |γ| < {settings.dead_below:g} after sparsity training, rounded "
                  f"down to the 0.05 grid; the largest ratio that empties no layer is {safe:g}")
    what_if = [
        {k: row[k] for k in ("ratio", "threshold", "channels_kept", "channels_total", "params_kept",
                             "flops_kept", "emptied")}
        for row in doc["what_if"]
    ]
    lap("inspect", t0)

    # 3. prune (+ accuracy right after pruning, + ONNX of the pruned model) ---------------------
    t0 = time.perf_counter()
    say(f"3/6 prune: ratio {ratio:g} ({reason}); the removed channels' BN shift β is folded into "
        f"the next layers (--fold-shift)")
    export_opts = {"latency_runs": settings.latency_runs}
    pruned = prune_checkpoint(
        dense_path, "ratio", ratio, 1, root / "pruned.safetensors", eval=True, export=root / "pruned.onnx",
        device=settings.device, command=f"slim prune {dense_path} --ratio {ratio:g} --fold-shift --eval "
                                        f"--export {root / 'pruned.onnx'} (slim demo)",
        export_options=export_opts, fold_shift=True,
    )
    lap("prune", t0)

    # 4. fine-tune the slim model ---------------------------------------------------------------
    t0 = time.perf_counter()
    say(f"4/6 finetune: {settings.finetune_epochs} epochs, no penalty, lr {settings.finetune_lr:g}")
    ft = replace(
        base, penalty="none", lam=0.0, epochs=settings.finetune_epochs, lr=settings.finetune_lr,
        out=str(root / "finetune"), stage="finetuned", parent=str(pruned.out), gamma_init=None, dataset=None,
        command=f"slim finetune {pruned.out} --epochs {settings.finetune_epochs} "
                f"--lr {settings.finetune_lr:g} (slim demo)",
    )
    train(ft, reporter)
    finetuned_path = root / "finetune" / "last.safetensors"
    lap("finetune", t0)

    # 5. export the dense and the fine-tuned model (the pruned one was exported by prune) --------
    t0 = time.perf_counter()
    say("5/6 export: ONNX of the dense and the fine-tuned model, checked against PyTorch")
    final_ckpt = load_checkpoint(finetuned_path)
    dense_onnx = export_checkpoint(dense_ckpt, root / "dense.onnx", **export_opts)
    final_onnx = export_checkpoint(final_ckpt, root / "model.onnx", **export_opts)
    # dense and slim timed in one interleaved measurement, so that their ratio means something
    latency = interleaved_latency(
        {"dense": dense_onnx.path.read_bytes(), "onnx": final_onnx.path.read_bytes()},
        tuple(final_ckpt.input_shape), runs=settings.latency_runs, warmup=5,
    ) if settings.latency_runs else {}
    lap("export", t0)

    # 6. verify: the ONNX file on the whole test set in onnxruntime -------------------------------
    t0 = time.perf_counter()
    say("6/6 verify: model.onnx on the whole test set in onnxruntime")
    dataset = create_dataset(str(final_ckpt.meta["dataset"]))
    images, labels = dataset.load("test")
    final_model = build_model(final_ckpt)
    mean, std = normalization_of(final_ckpt.meta) or (list(dataset.mean), list(dataset.std))
    onnx_acc, differ = _onnx_accuracy(root / "model.onnx", images, labels, final_model, mean, std)
    dense_model = build_model(dense_ckpt)
    test = (images, labels)  # one read of the test split for all three accuracies
    _, dense_acc = evaluate(dense_model, dataset.spec, device=device, normalization=(mean, std), data=test)
    _, final_acc = evaluate(final_model, dataset.spec, device=device, normalization=(mean, std), data=test)
    lap("verify", t0)

    shape = final_ckpt.input_shape
    dense_m, final_m = measure(dense_model.cpu(), shape), measure(final_model.cpu(), shape)
    pe = pruned.export
    rows = [
        StageRow("dense", dense_m.params, dense_m.flops, dense_onnx.size_bytes,
                 latency.get("dense", dense_onnx.latency_ms), dense_acc, str(dense_path)),
        StageRow("pruned", pruned.after.params, pruned.after.flops, pe.size_bytes if pe else None,
                 pe.latency_ms if pe else None, pruned.accuracy, str(pruned.out)),
        StageRow("finetuned", final_m.params, final_m.flops, final_onnx.size_bytes, final_onnx.latency_ms,
                 final_acc, str(finetuned_path)),
        StageRow("onnx", final_onnx.params, 2 * final_onnx.macs, final_onnx.size_bytes,
                 latency.get("onnx", final_onnx.latency_ms), onnx_acc, str(final_onnx.path)),
    ]
    seconds["total"] = round(time.perf_counter() - started, 2)
    result = DemoResult(
        out=root, settings=settings, rows=rows, ratio=ratio, ratio_reason=reason,
        threshold=pruned.plan.threshold, gamma_below=below, gamma_count=count, what_if=what_if,
        min_channels_bit={k: list(v) for k, v in pruned.plan.min_channels_bit.items()},
        onnx_max_diff=final_onnx.max_abs_diff, onnx_disagreements=differ, seconds=seconds,
    )
    (root / SUMMARY).write_text(json.dumps(result.as_dict(), indent=2, ensure_ascii=False) + "\n")
    return result


__all__ = ["STAGES", "DemoResult", "DemoSettings", "StageRow", "choose_ratio", "default_out", "run_demo"]
