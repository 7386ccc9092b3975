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

from torch import Tensor, nn

from slimcli._fs import atomic_target
from slimcli.checkpoint import (
    STATE_SUFFIX,
    Checkpoint,
    check_finite,
    ensure_folder,
    lineage_entry,
    load_checkpoint,
    save_checkpoint,
)
from slimcli.data import create_dataset
from slimcli.errors import CheckpointError, DataError, PruneError, UsageError
from slimcli.export import ExportReport, check_onnx_destination, export_checkpoint, latest_accuracy
from slimcli.measure import Measurement, measure
from slimcli.model import CALIBRATION_BATCH, build_model, calibration_images, evaluate, normalization_of
from slimcli.model import recalibrate as recalibrate_model
from slimcli.prune.fold import fold_summary
from slimcli.prune.rules import RULE_VALUES, KeepPlan, check_min_channels, check_rule, compute_keep
from slimcli.prune.surgery import PruneReport, encode_keep, prune_model
from slimcli.prune.whatif import meta_twin
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
    accuracy_surgery: float | None = None  # right after surgery, before recalibration (with eval)
    recalibration: dict[str, Any] = field(default_factory=dict)  # see Pruned.recalibration

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
            "accuracy_after_surgery": self.accuracy_surgery,
            "accuracy": self.accuracy,  # of the checkpoint written (after recalibration when it ran)
            "loss": self.loss,
            "recalibration": dict(self.recalibration),
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


def check_out(source: Path, out: Path, force: bool = False, *, default: Path | None = None,
              what: str = "prune") -> None:
    """``--out`` of a command that writes one checkpoint from ``source``: a ``.safetensors`` file
    name (``default`` is the example the message gives), never the input, never an existing file
    without ``force``."""
    default = default or default_out(source)
    if not out.name.endswith(SUFFIX) or out.name.endswith(STATE_SUFFIX):
        raise UsageError(f"--out must be a checkpoint file ending in {SUFFIX} (not {STATE_SUFFIX}), "
                         f"got {out}; e.g. {default}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name ending in {SUFFIX}")
    same = out.resolve() == source.resolve()
    if not same and out.exists():
        with contextlib.suppress(OSError):
            same = os.path.samefile(out, source)
    if same:
        raise UsageError(f"--out {out} is the input checkpoint; slim never overwrites its input, "
                         f"choose another file (default: {default})")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists (an earlier {what}?); pass --force to replace it, or "
                         f"choose another --out")


# ----------------------------------------------------------------------------------------------
# the pipeline


#: Training images used for BatchNorm recalibration by default (``--recalibrate``).
#: Measured on Fashion-MNIST VGG-19 checkpoints (docs/pruning.md): 2048 is within noise of
#: the whole training set and costs about a second on 2 CPU cores.
DEFAULT_RECALIBRATION = 2048


@dataclass
class Pruned:
    """A slim model and its numbers, before anything is written (see :func:`prune_loaded`)."""

    plan: KeepPlan
    report: PruneReport
    model: nn.Module  # CPU, eval mode
    before: Measurement
    after: Measurement
    accuracy_surgery: float | None  # right after surgery (eval only)
    loss_surgery: float | None
    accuracy: float | None  # of ``model`` as returned: after recalibration when it ran
    loss: float | None
    #: {"images": N, "seed", "batch_size", "split"} or {"images": 0, "note": why not}
    recalibration: dict[str, Any] = field(default_factory=dict)
    #: with round_to > 1: {"round_to", "channels_added", "params_unrounded", "flops_unrounded"}
    rounding: dict[str, Any] | None = None


def _rounding(model: nn.Module, plan: KeepPlan, shape: Any, rule: str, value: float, min_channels: int,
              coupling: str) -> dict[str, Any]:
    """What --round-to changed: channels given back, and the params/FLOPs the rule alone reached."""
    plain = compute_keep(model, rule, value, min_channels, input_shape=shape, coupling=coupling,
                         group_score=plan.group_score)
    twin = meta_twin(model)
    unrounded, _ = prune_model(twin, plain.masks, input_shape=shape, coupling=coupling)
    cost = measure(unrounded, shape)
    return {"round_to": plan.round_to, "channels_added": plan.kept_channels - plain.kept_channels,
            "params_unrounded": cost.params, "flops_unrounded": cost.flops}


def structure_coupling(ckpt: Checkpoint, coupling: str | None) -> str:
    """The coupling to prune ``ckpt`` with: ``coupling`` (None: ``auto``), or a slim checkpoint's own.

    A slim checkpoint's structure (selections or coupled groups) was built with one coupling;
    re-pruning it with another would describe a structure no rebuild can reproduce.
    """
    if not ckpt.widths or "widths" not in ckpt.meta:
        return coupling or "auto"
    recorded = str(ckpt.meta.get("coupling") or "select")  # before coupled groups: one BN at a time
    if coupling is not None and coupling != recorded:
        raise PruneError(f"this checkpoint was pruned with --coupling {recorded}; re-prune it with "
                         f"--coupling {recorded} (or prune its dense parent with --coupling {coupling})")
    return recorded


def prune_loaded(
    ckpt: Checkpoint,
    model: nn.Module,
    rule: str,
    value: float,
    min_channels: int = 1,
    *,
    fold_shift: bool = False,
    recalibrate: int = 0,
    seed: int = 0,
    eval: bool = False,
    device: str = "cpu",
    data_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    test_data: tuple[Tensor, Tensor] | None = None,
    calibration: Tensor | None = None,
    dense: Measurement | None = None,
    coupling: str | None = None,
    round_to: int = 1,
    selections: str = "gather",
    group_score: str = "mean",
) -> Pruned:
    """Prune ``model`` (the dense model ``ckpt`` describes, left untouched) and measure it.

    The steps of ``slim prune`` and of every ``slim sweep`` cell: keep rule → surgery
    (optionally folding β) → BatchNorm recalibration on ``recalibrate`` training images drawn
    with ``seed`` (skipped with a note when the dataset is not on disk) → test accuracy when
    ``eval``, after surgery and after recalibration. ``test_data`` and ``calibration`` (uint8
    images) are preloaded data, and ``dense`` the dense model's measurement, which spare a
    sweep reading the dataset and counting the dense model again for every ratio.
    """
    say = log or (lambda _msg: None)
    if isinstance(recalibrate, bool) or not isinstance(recalibrate, int) or recalibrate < 0:
        raise UsageError(f"recalibrate must be an integer >= 0 (images; 0 = off), got {recalibrate!r}")
    shape = ckpt.input_shape
    coupling = structure_coupling(ckpt, coupling)
    plan = compute_keep(model, rule, value, min_channels, input_shape=shape, coupling=coupling,
                        round_to=round_to, group_score=group_score)
    widest = max((m.numel() for m in plan.masks.values()), default=0)
    if widest and min_channels >= widest:
        raise PruneError(f"--min-channels {min_channels} keeps every channel: the widest prunable layer has "
                         f"{widest}, so nothing would be pruned; use fewer than {widest} (default 1)")
    slim, report = prune_model(model, plan, input_shape=shape, fold_shift=fold_shift, selections=selections)
    slim.eval()
    rounding = None
    if round_to > 1:
        rounding = _rounding(model, plan, shape, rule, value, min_channels, coupling)
    before, after = dense or measure(model, shape), measure(slim, shape)
    dataset = str(ckpt.meta.get("dataset") or "")
    norm = normalization_of(ckpt.meta)
    dev = resolve_device(device) if (eval or recalibrate) else None

    def test() -> tuple[float, float]:
        say(f"evaluating the pruned model on {dataset} (test split, {dev})")
        return evaluate(slim, dataset, data_dir, dev, normalization=norm, data=test_data)

    acc_surgery = loss_surgery = None
    if eval:
        loss_surgery, acc_surgery = test()
    recal: dict[str, Any] = {"images": 0, "note": "off (--recalibrate 0)"}
    if recalibrate > 0:
        images = calibration
        if images is None:
            try:
                if not dataset:
                    raise DataError("the checkpoint records no dataset")
                images = calibration_images(dataset, recalibrate, seed=seed, data_dir=data_dir)
            except DataError as exc:
                recal = {"images": 0, "note": f"skipped: {exc}"}
                say(f"note: no BatchNorm recalibration, the training data is not readable ({exc}); "
                    f"pass --data-dir, or --recalibrate 0 to silence this")
        if images is not None:
            say(f"recalibrating BatchNorm statistics on {len(images)} training images ({dev})")
            used = recalibrate_model(slim, images, norm or _dataset_norm(dataset), dev)
            recal = {"images": used, "seed": seed, "batch_size": CALIBRATION_BATCH, "split": "train"}
    accuracy, loss = acc_surgery, loss_surgery
    if eval and recal["images"]:
        loss, accuracy = test()
    slim.to("cpu").eval()
    return Pruned(plan, report, slim, before, after, acc_surgery, loss_surgery, accuracy, loss, recal,
                  rounding)


def _dataset_norm(spec: str) -> tuple[list[float], list[float]]:
    ds = create_dataset(spec)
    return list(ds.mean), list(ds.std)


def pruned_meta(ckpt: Checkpoint, pruned: Pruned, command: str | None = None) -> dict[str, Any]:
    """The metadata of the slim checkpoint: the parent's, plus widths, stage, ``prune``, metrics, lineage."""
    plan, report, before, after = pruned.plan, pruned.report, pruned.before, pruned.after
    prune = {
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
        "source_sha256": ckpt.sha256,
        "fold_shift": report.fold_shift,
        "recalibration": dict(pruned.recalibration),
        "coupling": report.coupling,
        "groups": report.groups,
        "forms": {r.name: r.form for r in report.layers if r.form and r.form != "narrow"},
    }
    if pruned.rounding is not None:
        prune["rounding"] = dict(pruned.rounding)
    if report.fold_shift:
        prune["fold"] = fold_summary(report.folds)
    if pruned.accuracy is not None:
        prune["accuracy"] = pruned.accuracy
        prune["loss"] = pruned.loss
        prune["accuracy_after_surgery"] = pruned.accuracy_surgery
        prune["loss_after_surgery"] = pruned.loss_surgery
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "version")}
    meta["widths"] = dict(report.widths)
    meta["coupling"] = report.coupling
    meta["keep"] = encode_keep(report.keep)
    meta["stage"] = "pruned"
    meta["prune"] = prune
    metrics = dict(meta.get("metrics") or {})
    metrics.pop("pruned", None)  # a re-pruned checkpoint's old number no longer applies
    if pruned.accuracy is not None:
        metrics["pruned"] = {"test_acc": pruned.accuracy, "test_loss": pruned.loss}
    meta["metrics"] = metrics
    meta["lineage"] = [*ckpt.lineage, lineage_entry("pruned", ckpt.sha256, command)]
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
    recalibrate: int = 0,
    seed: int = 0,
    force: bool = False,
    coupling: str | None = None,
    round_to: int = 1,
    selections: str = "gather",
    group_score: str = "mean",
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
    the next layers (:mod:`slimcli.prune.fold`) instead of dropping them; ``recalibrate``
    re-estimates BatchNorm statistics on that many training images (``seed`` draws them;
    ``slim prune`` passes :data:`DEFAULT_RECALIBRATION`, the library default is off). The
    input checkpoint is only read; an existing ``out`` or ``export`` file is replaced only with
    ``force``, and their folders must exist (checked writable before any work).
    """
    say = log or (lambda _msg: None)
    value = check_rule(rule, value)  # a ratio strictly in (0, 1): 0 would prune nothing
    check_min_channels(min_channels)
    source = Path(ckpt_path)
    target = Path(out) if out is not None else default_out(source)
    check_out(source, target, force)
    onnx_path = Path(export) if export is not None else None
    if onnx_path is not None:
        if onnx_path.exists() and not onnx_path.is_dir() and not force:
            raise UsageError(f"{onnx_path} already exists; pass --force to replace it, or choose "
                             f"another --export")
        check_onnx_destination(onnx_path)
    size = source.stat().st_size if source.is_file() else 0
    ensure_folder(target.parent, needed=size, create=False)  # the same rule as --export's folder
    if onnx_path is not None:  # a full disk too, before any work
        ensure_folder(onnx_path.parent, needed=size, create=False, option="--export")

    ckpt = load_checkpoint(source)
    check_finite(ckpt, "prune")
    model = build_model(ckpt)
    if eval and not ckpt.meta.get("dataset"):
        raise DataError(f"{source} records no dataset, so --eval cannot know what to test on; drop --eval")

    say(f"pruning {source} ({ckpt.arch}, stage {ckpt.stage or '?'}) with {rule.replace('_', '-')} {value:g}")
    pruned = prune_loaded(ckpt, model, rule, value, min_channels, fold_shift=fold_shift,
                          recalibrate=recalibrate, seed=seed, eval=eval, device=device,
                          data_dir=data_dir, log=say, coupling=coupling, round_to=round_to,
                          selections=selections, group_score=group_score)
    slim = pruned.model
    meta = pruned_meta(ckpt, pruned, command)

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
        source=source, source_sha256=ckpt.sha256, out=target, sha256=sha, plan=pruned.plan,
        report=pruned.report, before=pruned.before, after=pruned.after, meta=meta,
        accuracy_before=latest_accuracy(ckpt.meta), accuracy=pruned.accuracy, loss=pruned.loss,
        export=report_onnx, model=slim, accuracy_surgery=pruned.accuracy_surgery,
        recalibration=dict(pruned.recalibration),
    )


__all__ = [
    "DEFAULT_RECALIBRATION",
    "RULE_VALUES",
    "PruneResult",
    "Pruned",  # re-exported from slimcli.prune.rules
    "check_rule",  # re-exported from slimcli.prune.rules
    "default_out",
    "newest_checkpoint",
    "prune_checkpoint",
    "prune_loaded",
    "pruned_meta",
]
