"""Everything the loop needs before the first step: config (fresh, finetune or resume), device,
penalty, dataset, model and the checkpoint metadata every epoch will write.

All user errors surface here, before any data is loaded or any epoch is run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimcli.archs import create_arch
from slimcli.checkpoint import ensure_folder, lineage_entry, load_checkpoint, load_state
from slimcli.data import create_dataset
from slimcli.errors import CheckpointError, UsageError
from slimcli.model import build_model
from slimcli.penalties import Penalty, create_penalty
from slimcli.registry import ARCHS, DATASETS
from slimcli.train.config import TrainConfig
from slimcli.train.device import Precision, resolve_amp, resolve_device
from slimcli.train.state import LAST, check_new_run_dir

COMMANDS = {"sparsify": "sparsify-train", "finetuned": "finetune"}


@dataclass
class Run:
    """A run ready to train."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    precision: Precision
    channels_last: bool
    penalty: Penalty
    dataset: Any  # a slimcli.data.Dataset
    model: nn.Module
    base_meta: dict[str, Any]  # checkpoint metadata except the per-epoch metrics
    resume: tuple[dict[str, Tensor], dict[str, Any]] | None  # saved training state

    @property
    def command(self) -> str:
        return COMMANDS[self.config.stage]


def bn_scales(model: nn.Module) -> list[Tensor]:
    """γ of every BatchNorm: what the penalty acts on and what the sparsity figures count."""
    return [
        m.weight for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]


def _resumed_config(config: TrainConfig) -> tuple[TrainConfig, Path, Any, tuple[dict, dict]]:
    """The saved config of ``--resume RUN_DIR``; only where-to-run options may change."""
    run_dir = Path(config.resume)  # type: ignore[arg-type]
    if run_dir.is_file():
        raise UsageError(f"--resume {run_dir} is a file; pass the run folder that holds it: "
                         f"--resume {run_dir.parent}")
    if not (run_dir / LAST).is_file():
        raise UsageError(
            f"--resume {run_dir}: no {LAST} there (nothing to resume); pass the folder of a run "
            f"started with --out"
        )
    ckpt = load_checkpoint(run_dir / LAST)
    tensors, smeta = load_state(run_dir / LAST, model_sha256=ckpt.sha256)  # no second read of the model
    try:
        saved = TrainConfig.from_json(smeta["config"])
        saved.validate()
    except (KeyError, TypeError, ValueError, AttributeError, UsageError) as exc:
        raise CheckpointError(f"the training state in {run_dir} is damaged (its config: {exc}); it cannot "
                              f"be resumed: start a new run from {run_dir / LAST} (slim finetune)") from None
    if saved.stage != config.stage:
        right = "finetune" if saved.stage == "finetuned" else "sparsify-train"
        raise UsageError(
            f"{run_dir} is a 'slim {right}' run; resume it with: slim {right} --resume {run_dir}"
        )
    saved = dataclasses.replace(
        saved, resume=str(run_dir), out=str(run_dir), device=config.device, quiet=config.quiet,
        data_dir=config.data_dir or saved.data_dir, threads=config.threads or saved.threads,
        workers=config.workers if config.workers is not None else saved.workers,
    )
    return saved.validate(), run_dir, ckpt, (tensors, smeta)


def prepare(config: TrainConfig) -> Run:
    """Validate ``config`` and build the run (model on the device, dataset object, metadata)."""
    config.validate()
    resume = None
    ckpt = parent = None
    if config.resume:
        config, run_dir, ckpt, resume = _resumed_config(config)
    penalty = create_penalty(config.penalty, config.lam)
    if config.update == "proximal" and not penalty.is_zero and not penalty.has_prox:
        raise UsageError(
            f"--update proximal: penalty '{penalty.name}' has no closed-form proximal map; use "
            f"--update subgradient or one of l1, lp:p=0.5, tl1, mcp, scad, l1-l2"
        )
    device = resolve_device(config.device)
    precision = resolve_amp(config.amp, device)
    channels_last = config.channels_last

    if config.stage == "finetuned" and ckpt is None:
        parent = load_checkpoint(config.parent)  # type: ignore[arg-type]
    source = ckpt or parent
    dataset_spec = config.dataset or (source.meta.get("dataset") if source else None)
    if not dataset_spec:
        raise UsageError("the checkpoint records no dataset; pass --dataset")
    try:
        dataset = create_dataset(str(DATASETS.parse(dataset_spec)))
    except UsageError as exc:
        if config.dataset or source is None:
            raise
        raise CheckpointError(f"{source.path} records dataset {dataset_spec!r}, which slim cannot make "
                              f"({exc}); pass --dataset") from None
    if source is not None and (
        dataset.num_classes != source.num_classes or tuple(dataset.input_shape) != source.input_shape
    ):
        raise UsageError(
            f"--dataset {dataset.spec} has {dataset.num_classes} classes of shape "
            f"{tuple(dataset.input_shape)}, "
            f"but the checkpoint's model takes {source.num_classes} classes of shape {source.input_shape}; "
            f"use a dataset of the same kind"
        )

    torch.manual_seed(config.seed)  # weight init of a fresh model is part of the run's seed
    if source is not None:
        model = build_model(source)
    else:
        model = create_arch(str(ARCHS.parse(config.arch)), dataset.num_classes, tuple(dataset.input_shape))
        if config.gamma_init is not None:
            with torch.no_grad():
                for g in bn_scales(model):
                    g.fill_(config.gamma_init)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)

    if ckpt is not None:  # resume: the run's own metadata, lineage included
        base_meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "version")}
    else:
        run_dir = Path(config.out) if config.out else config.default_out(
            source.meta["arch"] if source else config.arch, dataset.spec
        )
        check_new_run_dir(run_dir, COMMANDS[config.stage], force=config.force)
        parent_meta = parent.meta if parent is not None else {}
        lineage = [*(parent.lineage if parent else []),
                   lineage_entry(config.stage, parent.sha256 if parent else None, config.command)]
        base_meta = {
            "arch": parent_meta["arch"] if parent is not None else str(ARCHS.parse(config.arch)),
            "widths": parent_meta.get("widths"),
            "num_classes": dataset.num_classes,
            "input_shape": list(dataset.input_shape),
            "dataset": dataset.spec,
            "classes": list(dataset.classes),
            "normalization": {"mean": list(dataset.mean), "std": list(dataset.std)},
            "stage": config.stage,
            "metrics": dict(parent_meta.get("metrics") or {}),
            "lineage": lineage,
        }
        if "prune" in parent_meta:
            base_meta["prune"] = parent_meta["prune"]  # how the parent was pruned stays on record
        if base_meta["widths"] is None:
            del base_meta["widths"]
        config = dataclasses.replace(config, out=str(run_dir), dataset=dataset.spec)
    base_meta["train"] = {
        "penalty": penalty.spec, "lam": config.lam, "update": config.update, "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": {"name": "sgd", "lr": config.lr, "momentum": config.momentum,
                      "nesterov": config.nesterov, "weight_decay": config.weight_decay,
                      "milestones": config.milestone_epochs(), "gamma": 0.1},
        "gamma_init": config.gamma_init if config.stage == "sparsify" else None,
        "seed": config.seed, "device": str(device), "amp": precision.name,
    }
    # best, last, its state (≈ the weights again) and a temporary copy while one is written
    needed = 5 * sum(t.nbytes for t in model.state_dict().values())
    ensure_folder(run_dir, needed=needed, option="--resume" if resume is not None else "--out")
    return Run(config, run_dir, device, precision, channels_last, penalty, dataset, model, base_meta, resume)
