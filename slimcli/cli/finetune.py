"""``slim finetune``: retrain a checkpoint (typically a pruned one), without a penalty by default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimcli.cli import _train_options as o
from slimcli.cli.app import app
from slimcli.registry import DATASETS


@app.command("finetune", short_help="Retrain a (pruned) checkpoint, no penalty by default.")
def finetune(
    ctx: typer.Context,
    ckpt: Annotated[Path | None, typer.Argument(
        help="Checkpoint to train (its arch, widths and dataset are kept).", metavar="CKPT",
        show_default=False)] = None,
    dataset: Annotated[str | None, o._opt(
        "--dataset", help="Dataset spec [default: the checkpoint's].", callback=o.spec_callback(DATASETS),
        show_default=False)] = None,
    penalty: o.PenaltyOpt = "none",
    lam: o.LamOpt = 1e-4,
    update: o.UpdateOpt = o.Update.subgradient,
    epochs: o.EpochsOpt = 160,
    batch_size: o.BatchOpt = 64,
    lr: o.LrOpt = 0.1,
    momentum: o.MomentumOpt = 0.9,
    nesterov: o.NesterovOpt = True,
    weight_decay: o.WdOpt = 1e-4,
    milestones: o.MilestonesOpt = "0.5,0.75",
    seed: o.SeedOpt = 0,
    device: o.DeviceOpt = "auto",
    amp: o.AmpOpt = o.Amp.auto,
    channels_last: o.ChannelsLastOpt = True,
    compile: o.CompileOpt = False,
    threads: o.ThreadsOpt = 0,
    data_on_device: o.DataOnDeviceOpt = None,
    workers: o.WorkersOpt = None,
    sync_bn: o.SyncBnOpt = False,
    data_dir: o.DataDirOpt = None,
    out: o.OutOpt = None,
    resume: o.ResumeOpt = None,
    quiet: o.QuietOpt = False,
    force: o.ForceOpt = False,
) -> None:
    """Fine-tune a checkpoint (no penalty by default; same options as sparsify-train).

    The result is stage "finetuned" with the parent's sha256 in its lineage.
    """
    # lazily: start-up cost, see docs/benchmarks.md (slimcli.train imports torch)
    from slimcli.train import TrainConfig
    from slimcli.train.config import parse_milestones

    o.check_resume_alone(ctx, resume)
    if resume is None and ckpt is None:
        raise typer.BadParameter("give the checkpoint to fine-tune, or --resume RUN_DIR", param_hint="CKPT")
    if resume is not None and ckpt is not None:
        raise typer.BadParameter("give either CKPT or --resume RUN_DIR, not both", param_hint="CKPT")
    config = TrainConfig(
        dataset=dataset, penalty=penalty, lam=lam, update=update.value, epochs=epochs,
        batch_size=batch_size, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
        milestones=parse_milestones(milestones), gamma_init=None, seed=seed, device=device,
        amp=amp.value, channels_last=channels_last, compile=compile, threads=threads,
        data_on_device=data_on_device, workers=workers, sync_bn=sync_bn,
        data_dir=str(data_dir) if data_dir else None, out=str(out) if out else None,
        resume=str(resume) if resume else None, quiet=quiet, force=force, stage="finetuned",
        parent=str(ckpt) if ckpt else None,
    )
    o.run_training(config)
