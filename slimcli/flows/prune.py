"""Prune a checkpoint into a slim checkpoint: the library behind ``slim prune``.

:func:`prune_checkpoint` loads a checkpoint, chooses the channels under one rule
(:func:`~slimcli.prune.compute_keep`), rebuilds the slim model
(:func:`~slimcli.prune.prune_model`), optionally measures its test accuracy right away (the
paper's "before fine-tuning" number) and exports it to ONNX with the code of ``slim export``,
and writes a checkpoint of stage ``pruned`` whose ``slim.widths`` let
:func:`slimcli.model.build_model` rebuild it from the dense architecture.

Nothing is half-written: every input is checked first (rule, value and min_channels by
:func:`slimcli.prune.check_rule` / :func:`~slimcli.prune.check_min_channels`, output paths,
the ONNX folder), the checkpoint goes to a temporary file, the ONNX export (itself atomic) follows,
and only then is the checkpoint renamed into place. A failure at any step leaves neither
file. The input checkpoint is never overwritten.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimcli._fs import atomic_target
from slimcli.checkpoint import STATE_SUFFIX, ensure_folder, lineage_entry, load_checkpoint, save_checkpoint
from slimcli.errors import CheckpointError, DataError, UsageError
from slimcli.export import ExportReport, check_onnx_destination, export_checkpoint, latest_accuracy
from slimcli.measure import Measurement, measure
from slimcli.model import build_model, evaluate, normalization_of
from slimcli.prune.fold import fold_summary
from slimcli.prune.rules import RULE_VALUES, KeepPlan, check_min_channels, check_rule, compute_keep
from slimcli.prune.surgery import PruneReport, prune_model
from slimcli.train.device import resolve_device

SUFFIX = ".safetensors"


@dataclass
class PruneResult:
    """What :func:`prune_checkpoint` did and wrote."""

    source: Path
    source_sha256: str
    out: Path
    sha256: str
    plan: KeepPlan
    report: PruneReport
    before: Measurement  # the input checkpoint's model
    after: Measurement  # the slim model
    meta: dict[str, Any]  # the metadata written (decoded, without the slim. prefix)
    accuracy_before: float | None  # the latest test accuracy recorded in the input checkpoint
    accuracy: float | None = None  # test accuracy right after pruning (with eval)
    loss: float | None = None
    export: ExportReport | None = None
    model: nn.Module | None = field(default=None, repr=False)  # the slim model (CPU, eval mode)

    @property
    def flops_pruned_ratio(self) -> float:
        return 1.0 - self.after.flops / self.before.flops if self.before.flops else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``slim prune --json``)."""
        d: dict[str, Any] = {
            "source": str(self.source),
            "source_sha256": self.source_sha256,
            "out": str(self.out),
            "sha256": self.sha256,
            "prune": self.meta.get("prune"),
            "widths": dict(self.report.widths),
            "layers": [r.as_dict() for r in self.report.layers],
            "accuracy_before": self.accuracy_before,
            "accuracy": self.accuracy,
            "loss": self.loss,
        }
        if self.export is not None:
            e = self.export
            d["export"] = {
                "path": str(e.path), "size_bytes": e.size_bytes, "opset": e.opset, "exporter": e.exporter,
                "max_abs_diff": e.max_abs_diff, "rel_diff": e.rel_diff, "latency_ms": e.latency_ms,
                "input_shape": list(e.input_shape), "output_shape": list(e.output_shape),
                "notes": list(e.notes),
            }
        return d


# ----------------------------------------------------------------------------------------------
# inputs


def default_out(ckpt_path: str | os.PathLike[str]) -> Path:
    """``<stem>-pruned.safetensors`` next to the input: ``best.safetensors`` → ``best-pruned.safetensors``."""
    p = Path(ckpt_path)
    stem = p.name[: -len(SUFFIX)] if p.name.endswith(SUFFIX) else p.stem
    return p.with_name(f"{stem}-pruned{SUFFIX}")


def newest_checkpoint(root: str | os.PathLike[str] = "runs") -> Path:
    """The checkpoint ``slim prune`` takes when none is given: the newest training checkpoint
    under ``root``, preferring its run's ``best.safetensors`` over ``last.safetensors``.

    Training-state files, temporary files and prune outputs (``*-pruned.safetensors``) are
    skipped, so running ``slim prune`` twice does not prune its own output. A
    :class:`UsageError` when there is none.
    """
    base = Path(root)
    found = [
        p for p in base.rglob(f"*{SUFFIX}")
        if p.is_file() and not p.name.endswith(STATE_SUFFIX) and not p.name.startswith(".")
        and not p.name.endswith(f"-pruned{SUFFIX}")
    ] if base.is_dir() else []
    if not found:
        raise UsageError(f"no checkpoint given and none found under ./{base.as_posix()}; pass CKPT "
                         f"(a .safetensors file written by slim sparsify-train or finetune)")
    newest = max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))
    best = newest.with_name("best" + SUFFIX)
    return best if newest.name == "last" + SUFFIX and best.is_file() else newest


def _check_out(source: Path, out: Path) -> None:
    if not out.name.endswith(SUFFIX) or out.name.endswith(STATE_SUFFIX):
        raise UsageError(f"--out must be a checkpoint file ending in {SUFFIX} (not {STATE_SUFFIX}), "
                         f"got {out}; e.g. {default_out(source)}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name ending in {SUFFIX}")
    same = out.resolve() == source.resolve()
    if not same and out.exists():
        with contextlib.suppress(OSError):
            same = os.path.samefile(out, source)
    if same:
        raise UsageError(f"--out {out} is the input checkpoint; pruning never overwrites its input, "
                         f"choose another file (default: {default_out(source)})")


# ----------------------------------------------------------------------------------------------
# the pipeline


def _prune_meta(
    plan: KeepPlan, report: PruneReport, before: Measurement, after: Measurement,
    accuracy: float | None, loss: float | None, source_sha: str,
) -> dict[str, Any]:
    meta = {
        **plan.summary(),
        "kept": {r.name: r.kept for r in report.layers if r.prunable},
        "channels": {r.name: r.channels for r in report.layers if r.prunable},
        "not_prunable": {r.name: r.reason for r in report.layers if not r.prunable},
        "params_before": before.params,
        "params_after": after.params,
        "params_pruned_ratio": 1.0 - after.params / before.params if before.params else 0.0,
        "flops_before": before.flops,
        "flops_after": after.flops,
        "flops_pruned_ratio": 1.0 - after.flops / before.flops if before.flops else 0.0,
        "source_sha256": source_sha,
        "fold_shift": report.fold_shift,
    }
    if report.fold_shift:
        meta["fold"] = fold_summary(report.folds)
    if accuracy is not None:
        meta["accuracy"] = accuracy
        meta["loss"] = loss
    return meta


def prune_checkpoint(
    ckpt_path: str | os.PathLike[str],
    rule: str,
    value: float,
    min_channels: int = 1,
    out: str | os.PathLike[str] | None = None,
    *,
    eval: bool = False,
    export: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    command: str | None = None,
    export_options: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    fold_shift: bool = False,
) -> PruneResult:
    """Prune the checkpoint at ``ckpt_path`` under ``rule`` and write the slim checkpoint.

    ``rule`` is one of ``ratio``, ``threshold``, ``target_params``, ``target_flops`` (see
    :mod:`slimcli.prune.rules`); ``min_channels`` keeps at least that many channels per
    layer (0: a layer the rule empties is a :class:`PruneError` naming it). ``out`` defaults
    to :func:`default_out`. ``eval`` measures test accuracy of the slim model on the
    checkpoint's dataset (on ``device``, ``auto`` allowed); ``export`` writes a verified ONNX
    file via :func:`slimcli.export.export_checkpoint` (``export_options`` are passed on).
    ``command`` is recorded in the lineage (default: this process's command line); ``log``
    receives progress lines. ``fold_shift`` folds the removed channels' BatchNorm shifts into
    the next layers (:mod:`slimcli.prune.fold`) instead of dropping them.
    """
    say = log or (lambda _msg: None)
    value = check_rule(rule, value)  # a ratio strictly in (0, 1): 0 would prune nothing
    check_min_channels(min_channels)
    source = Path(ckpt_path)
    target = Path(out) if out is not None else default_out(source)
    _check_out(source, target)
    onnx_path = Path(export) if export is not None else None
    if onnx_path is not None:
        check_onnx_destination(onnx_path)

    ckpt = load_checkpoint(source)
    model = build_model(ckpt)
    shape = ckpt.input_shape
    if eval and not ckpt.meta.get("dataset"):
        raise DataError(f"{source} records no dataset, so --eval cannot know what to test on; drop --eval")

    say(f"pruning {source} ({ckpt.arch}, stage {ckpt.stage or '?'}) with {rule.replace('_', '-')} {value:g}")
    plan = compute_keep(model, rule, value, min_channels, input_shape=shape)
    slim, report = prune_model(model, plan, input_shape=shape, fold_shift=fold_shift)
    slim.eval()
    before, after = measure(model, shape), measure(slim, shape)

    accuracy = loss = None
    if eval:
        dev = resolve_device(device)
        say(f"evaluating the pruned model on {ckpt.meta['dataset']} (test split, {dev})")
        loss, accuracy = evaluate(slim, str(ckpt.meta["dataset"]), data_dir, dev,
                                  normalization=normalization_of(ckpt.meta))
        slim.to("cpu")

    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "version")}
    meta["widths"] = dict(report.widths)
    meta["stage"] = "pruned"
    meta["prune"] = _prune_meta(plan, report, before, after, accuracy, loss, ckpt.sha256)
    metrics = dict(meta.get("metrics") or {})
    metrics.pop("pruned", None)  # a re-pruned checkpoint's old number no longer applies
    if accuracy is not None:
        metrics["pruned"] = {"test_acc": accuracy, "test_loss": loss}
    meta["metrics"] = metrics
    meta["lineage"] = [*ckpt.lineage, lineage_entry("pruned", ckpt.sha256, command)]

    # checkpoint → temporary file, ONNX → its place (atomic), then the checkpoint → its place
    ensure_folder(target.parent)
    report_onnx = None
    renaming = False
    try:
        with atomic_target(target, suffix=SUFFIX) as tmp:
            sha = save_checkpoint(tmp, slim, meta)
            if onnx_path is not None:
                say(f"exporting {onnx_path} …")
                report_onnx = export_checkpoint(meta, onnx_path, model=slim, sha256=sha, data_dir=data_dir,
                                                **dict(export_options or {}))
            renaming = True  # from here on only the rename can fail
    except OSError as exc:
        if not renaming:
            raise
        if onnx_path is not None:  # the pair goes together or not at all
            with contextlib.suppress(OSError):
                os.unlink(onnx_path)
        raise CheckpointError(f"could not write {target}: {exc.strerror or exc}; nothing written") from None

    return PruneResult(
        source=source, source_sha256=ckpt.sha256, out=target, sha256=sha, plan=plan, report=report,
        before=before, after=after, meta=meta, accuracy_before=latest_accuracy(ckpt.meta),
        accuracy=accuracy, loss=loss, export=report_onnx, model=slim,
    )


__all__ = [
    "RULE_VALUES",  # re-exported from slimcli.prune.rules
    "PruneResult",
    "check_rule",  # re-exported from slimcli.prune.rules
    "default_out",
    "newest_checkpoint",
    "prune_checkpoint",
]
