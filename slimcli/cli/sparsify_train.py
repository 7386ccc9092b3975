"""``slim sparsify-train``: train a model with a sparsity penalty on every BatchNorm scale γ."""

from __future__ import annotations

import typer

from slimcli.cli import _train_options as o
from slimcli.cli.app import app


@app.command("sparsify-train", short_help="Train with a sparsity penalty on BN scales γ.")
def sparsify_train(
    ctx: typer.Context,
    arch: o.ArchOpt = "vgg19",
    dataset: o.DatasetOpt = "cifar10",
    penalty: o.PenaltyOpt = "l1",
    lam: o.LamOpt = 1e-4,
    update: o.UpdateOpt = o.Update.subgradient,
    epochs: o.EpochsOpt = 160,
    batch_size: o.BatchOpt = 64,
    lr: o.LrOpt = 0.1,
    momentum: o.MomentumOpt = 0.9,
    nesterov: o.NesterovOpt = True,
    weight_decay: o.WdOpt = 1e-4,
    milestones: o.MilestonesOpt = "0.5,0.75",
    gamma_init: o.GammaInitOpt = 0.5,
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
    """Train with a sparsity penalty on BN scales (the paper's protocol by default).

    Writes best/last checkpoints and metrics.jsonl into the run folder every epoch; Ctrl-C
    saves and exits, --resume RUN_DIR continues exactly.
    """
    # lazily: start-up cost, see docs/benchmarks.md (slimcli.train imports torch)
    from slimcli.train import TrainConfig
    from slimcli.train.config import parse_milestones

    o.check_resume_alone(ctx, resume)
    config = TrainConfig(
        arch=arch, dataset=dataset, penalty=penalty, lam=lam, update=update.value, epochs=epochs,
        batch_size=batch_size, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
        milestones=parse_milestones(milestones), gamma_init=gamma_init, seed=seed, device=device,
        amp=amp.value, channels_last=channels_last, compile=compile, threads=threads,
        data_on_device=data_on_device, workers=workers, sync_bn=sync_bn,
        data_dir=str(data_dir) if data_dir else None, out=str(out) if out else None,
        resume=str(resume) if resume else None, quiet=quiet, force=force, stage="sparsify",
    )
    o.run_training(config)
