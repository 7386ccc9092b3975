"""The training loop shared by ``slim sparsify-train`` and ``slim finetune`` (design §7).

One loop for CPU and CUDA: the dataset sits on the device as uint8, each batch is gathered,
augmented and normalised there; the penalty acts on every BatchNorm γ after backward
(subgradient, the paper's rule) or after the optimizer step (proximal). Every epoch ends with
an evaluation, a metrics line and atomic checkpoints, so a run can stop at any point and
``--resume`` continues it bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from slimcli.checkpoint import save_checkpoint
from slimcli.errors import TrainingError, UsageError
from slimcli.model import Normalizer
from slimcli.penalties import Penalty, add_penalty_grad, apply_prox
from slimcli.train.config import TrainConfig
from slimcli.train.distributed import (
    STOP_CHECK_EVERY,
    Dist,
    init_from_env,
    is_lost_rank,
    shutdown,
    sync_batchnorm,
    wrap,
)
from slimcli.train.loader import make_feeder
from slimcli.train.progress import Reporter
from slimcli.train.setup import bn_scales, prepare
from slimcli.train.state import (
    BEST,
    LAST,
    LoopState,
    append_metrics,
    catch_stop_signals,
    clear_run_dir,
    pack_state,
    read_metrics,
    truncate_metrics,
    unpack_state,
)
from slimcli.train.threads import pick_threads

REPORT_EVERY_S = 0.5  # progress refresh; also how often the loss is synced to the host


@dataclass
class TrainResult:
    """What a finished run reports (the files are in ``run_dir``)."""

    run_dir: Path
    stage: str
    epochs: int  # completed epochs
    best_acc: float
    best_epoch: int
    last: dict[str, Any] | None  # the last metrics record
    seconds: float
    device: str
    precision: str
    rank: int = 0  # under torchrun: this process's rank (only rank 0 writes files)


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM stopped the run after its state was saved; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int, run_dir: Path, resume_command: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
        self.run_dir = run_dir
        self.resume_command = resume_command


def optimizer_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   penalty: Penalty, gammas: list[Tensor], update: str) -> None:
    """Backward, penalty and step in the order that keeps the penalty's strength exact.

    Under fp16 the gradients are scaled by the GradScaler's factor; the subgradient must be
    added to *unscaled* gradients, or it is 2^16 times too weak (sparsity training silently
    doing nothing under AMP). With the scaler disabled every scaler call is a no-op. When the
    scaler skips a step (fp16 overflow), the proximal update is skipped with it.
    """
    scaler.scale(loss).backward()
    if update == "subgradient":
        scaler.unscale_(optimizer)
        add_penalty_grad(penalty, gammas)
    scale = scaler.get_scale()  # 1.0 when the scaler is disabled
    scaler.step(optimizer)  # skipped when fp16 gradients overflowed
    scaler.update()  # ... and then the scale backs off: that is how a skipped step shows
    if update == "proximal" and not scaler.get_scale() < scale:
        # the prox belongs to the gradient step: without the step, shrinking γ alone would
        # strengthen the penalty by one extra lr·λ every time fp16 overflows
        apply_prox(penalty, gammas, optimizer.param_groups[0]["lr"])


def gamma_fractions(gammas: list[Tensor]) -> tuple[float, float]:
    """Fractions of |γ| below 1e-2 and below 1e-4 over all BatchNorm layers."""
    if not gammas:
        return 0.0, 0.0
    a = torch.cat([g.detach().abs().flatten() for g in gammas])
    return (a < 1e-2).float().mean().item(), (a < 1e-4).float().mean().item()


def _check_finite(loss_sum: float, epoch: int, step: int, run_dir: Path, done: int) -> None:
    if not math.isfinite(loss_sum):
        kept = f"{run_dir / LAST} (epoch {done}) is kept" if done else "no checkpoint was written"
        raise TrainingError(
            f"the training loss became {loss_sum} in epoch {epoch} by step {step}; stopped, {kept}. "
            f"Start again with a lower --lr or --lam (or --amp bf16/off instead of fp16)"
        )


def _check_finite_eval(test_loss: float, test_acc: float, model: torch.nn.Module, epoch: int, run_dir: Path,
                       done: int) -> None:
    """A diverged model (non-finite test loss or weights) stops the run and is never saved (nor "best")."""
    weights_ok = all(bool(torch.isfinite(t).all())
                     for t in model.state_dict().values() if t.is_floating_point())
    if math.isfinite(test_loss) and math.isfinite(test_acc) and weights_ok:
        return
    kept = f"{run_dir / LAST} (epoch {done}) is kept" if done else "no checkpoint was written"
    what = f"the test loss became {test_loss}" if weights_ok else "the weights became non-finite"
    raise TrainingError(
        f"the run diverged: {what} after epoch {epoch}; stopped, {kept}, and the diverged model was "
        f"not saved. Start again with a lower --lr or --lam (or --amp bf16/off instead of fp16)"
    )


def train(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Run (or resume) the training described by ``config``; see :class:`TrainConfig`.

    Under ``torchrun`` every rank calls this; see :mod:`slimcli.train.distributed`.
    """
    d, device_text = init_from_env(config.device)
    try:
        result = _train(dataclasses.replace(config, device=device_text), reporter, d)
        # every rank has finished its collectives before the group is torn down (a rank that exits
        # while another still talks to it can abort in gloo's teardown); only on success, so a lost
        # rank never makes the survivors wait here
        d.barrier()
        return result
    finally:
        shutdown(d)


def _train(config: TrainConfig, reporter: Reporter | None, d: Dist) -> TrainResult:
    reporter = reporter if reporter is not None and d.main else Reporter()  # rank 0 reports
    if d.enabled and config.batch_size % d.world:
        raise UsageError(f"--batch-size is the global batch; with {d.world} ranks it must be a multiple of "
                         f"{d.world}, got {config.batch_size}")
    run = prepare(config)  # every usage error is raised here, before any data is loaded
    run.run_dir = Path(d.broadcast_text(str(run.run_dir)))  # rank 0's (a default name has a time stamp)
    cfg, device, model, penalty, ds = run.config, run.device, run.model, run.penalty, run.dataset
    root = Path(cfg.data_dir) if cfg.data_dir else None
    normalize = Normalizer(ds.mean, ds.std, device, run.channels_last)
    if d.enabled and cfg.sync_bn:
        model = sync_batchnorm(model, device)
    gammas = bn_scales(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestone_epochs(), gamma=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision.scaler)
    # Shuffling draws from a CPU generator (same order on any device); augmentation from one on
    # the device (no host round trip per batch). Both are saved, so a resume replays them.
    generators = {"shuffle": torch.Generator().manual_seed(cfg.seed),
                  "augment": torch.Generator(device=device).manual_seed(cfg.seed + 1)}
    # the resident fast path, or DataLoader workers for a set too large for the device
    feeder = make_feeder(ds, root, device, normalize, cfg.batch_size, d, generators["augment"], cfg.seed,
                         cfg.data_on_device, cfg.workers)
    loop = LoopState()
    if run.resume is not None:
        loop = unpack_state(*run.resume, optimizer, scheduler, scaler, generators)
    if d.main:  # only rank 0 writes files
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if run.resume is None and cfg.force:
            clear_run_dir(run.run_dir)  # --force: the earlier run's files go (checked in prepare)
        truncate_metrics(run.run_dir, loop.epoch)  # lines past the saved epoch are replayed, not doubled
    d.barrier()
    net = wrap(model, d, device)  # DistributedDataParallel under torchrun
    net = torch.compile(net) if cfg.compile else net
    eval_net = model if d.enabled else net  # ranks evaluate different shards: no DDP collectives there
    amp_dtype = run.precision.dtype
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    n, bs = feeder.n, cfg.batch_size
    steps, eval_bs = feeder.steps, max(bs, 1000)
    metrics_meta = dict(run.base_meta.get("metrics") or {})

    def save(best: bool) -> None:
        if not d.main:
            return
        meta = {**run.base_meta, "metrics": metrics_meta}
        if best:  # best first: a crash in between leaves last one epoch behind, never ahead
            save_checkpoint(run.run_dir / BEST, model, meta)
        tensors, smeta = pack_state(loop, cfg.to_json(), optimizer, scheduler, scaler, generators)
        save_checkpoint(run.run_dir / LAST, model, meta, state=tensors, state_meta=smeta)

    def interrupted(signum: int, where: str) -> TrainingInterrupted:
        resume = f"{d.launcher()} {run.command} --resume {run.run_dir}"
        text = f"interrupted {where}; state saved in {run.run_dir}. Resume with: {resume}"
        return TrainingInterrupted(text, signum, run.run_dir, resume)

    started, last_record = time.perf_counter(), None
    threads_before = torch.get_num_threads()
    where = str(device)
    if device.type == "cpu":
        if d.enabled and not cfg.threads:  # ranks share the node's cores; no timing race between them
            cfg = dataclasses.replace(cfg, threads=max(1, torch.get_num_threads() // d.local_world))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        else:
            chosen, _ = pick_threads(model, *feeder.sample(bs), lambda: autocast, log=reporter.message)
            cfg = dataclasses.replace(cfg, threads=chosen)  # a resume keeps the count (same float sums)
        count = torch.get_num_threads()
        run.base_meta["train"]["threads"] = count
        where = f"cpu ({count} thread{'s' if count > 1 else ''})"
    run.base_meta["train"].update({"world_size": d.world, "batch_per_rank": bs // d.world, "global_batch": bs,
                                   "sync_bn": bool(cfg.sync_bn and d.enabled),
                                   "data": "streamed" if feeder.streaming else "on device"})
    if d.enabled:
        where = f"{where} × {d.world} ranks ({bs // d.world} images each per step)"
    if feeder.streaming:
        where = f"{where}, streaming ({getattr(feeder, 'workers', 0)} workers per rank)"

    def stop_now() -> bool:
        """Ctrl-C/SIGTERM seen: alone at once; under torchrun every few steps, on all ranks together."""
        if not d.enabled:
            return bool(stop)
        return loop.step % STOP_CHECK_EVERY == 0 and d.any(bool(stop), device)
    info = {"arch": run.base_meta["arch"], "dataset": ds.spec, "train_size": n, "epochs": cfg.epochs,
            "penalty": penalty.spec, "lam": cfg.lam, "update": cfg.update, "device": where,
            "precision": run.precision.name, "run_dir": run.run_dir, "resumed_from": loop.epoch}
    try:
        with catch_stop_signals() as stop:  # from here on, Ctrl-C saves a resumable state
            reporter.start(info)
            if run.resume is not None:
                reporter.message(f"resuming {run.run_dir} at epoch {loop.epoch + 1}, step {loop.step}")
            if cfg.epochs == 0 and run.resume is None:  # nothing to train: evaluate and record the model
                test_loss, test_acc = feeder.evaluate(eval_net, eval_bs, amp_dtype)
                _check_finite_eval(test_loss, test_acc, model, 0, run.run_dir, 0)
                metrics_meta[cfg.stage] = {"epoch": 0, "test_loss": test_loss, "test_acc": test_acc}
                loop.best_acc = test_acc
                save(best=True)
            while loop.epoch < cfg.epochs:
                epoch = loop.epoch + 1
                if loop.step == 0:  # a fresh epoch; a resumed mid-epoch state brings its own order
                    loop.perm, loop.partial = torch.randperm(n, generator=generators["shuffle"]), {}
                lr = optimizer.param_groups[0]["lr"]
                part = loop.partial if d.main else {}  # saved sums are global: counted once, on rank 0
                # running sums stay on the device: no host sync per step
                sums = torch.tensor([part.get("loss_sum", 0.0), part.get("correct", 0.0)],
                                    dtype=torch.float64, device=device)
                seen, seen_here = int(part.get("seen", 0)), 0
                t0 = last_report = time.perf_counter()
                reporter.epoch_start(epoch, cfg.epochs, steps, loop.step)
                net.train()
                batches = feeder.batches(loop.perm, loop.step, epoch)  # type: ignore[arg-type]
                for i, (x, y) in zip(range(loop.step, steps), batches, strict=False):
                    with autocast:
                        logits = net(x)
                        loss = F.cross_entropy(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    optimizer_step(loss, optimizer, scaler, penalty, gammas, cfg.update)
                    hits = (logits.argmax(1) == y).sum()
                    sums += torch.stack([loss.detach().double() * len(y), hits.double()])
                    seen, seen_here = seen + len(y), seen_here + len(y)
                    loop.step, loop.global_step = i + 1, loop.global_step + 1
                    if stop_now():
                        break
                    now = time.perf_counter()
                    if now - last_report >= REPORT_EVERY_S:
                        loss_sum, correct = sums.tolist()
                        _check_finite(loss_sum, epoch, loop.step, run.run_dir, loop.epoch)
                        reporter.step(loop.step, {"loss": loss_sum / seen, "acc": correct / seen, "lr": lr,
                                                  "images_per_s": seen_here * d.world / (now - t0),
                                                  "frac_below_1e-2": gamma_fractions(gammas)[0]})
                        last_report = now
                if d.enabled:  # the epoch's figures over all ranks; rank 0's BN statistics everywhere
                    d.sync_buffers(model)
                    total = d.sum_(torch.cat([sums, sums.new_tensor([seen])]))
                    sums, seen = total[:2], int(total[2].item())
                loss_sum, correct = sums.tolist()
                _check_finite(loss_sum, epoch, loop.step, run.run_dir, loop.epoch)  # never save NaN weights
                train_s = part.get("train_s", 0.0) + time.perf_counter() - t0
                if loop.step < steps:  # a signal mid-epoch: save the exact position (order, step, sums)
                    loop.partial = {"loss_sum": loss_sum, "correct": correct, "seen": seen,
                                    "train_s": train_s}
                    save(best=False)
                    raise interrupted(stop.signum or 2, f"in epoch {epoch} at step {loop.step}/{steps}")
                scheduler.step()
                t1 = time.perf_counter()
                test_loss, test_acc = feeder.evaluate(eval_net, eval_bs, amp_dtype)
                _check_finite_eval(test_loss, test_acc, model, epoch, run.run_dir, loop.epoch)
                frac2, frac4 = gamma_fractions(gammas)
                with torch.no_grad():
                    pen = penalty.lam * float(penalty.value_many([g.detach() for g in gammas]))
                last_record = {
                    "epoch": epoch, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                    "test_loss": test_loss, "test_acc": test_acc, "penalty": pen,
                    "frac_below_1e-2": frac2, "frac_below_1e-4": frac4, "images_per_s": seen / train_s,
                    "seconds": train_s + time.perf_counter() - t1,
                }
                metrics_meta[cfg.stage] = {k: last_record[k] for k in
                                           ("epoch", "test_loss", "test_acc", "train_loss", "train_acc")}
                best = test_acc > loop.best_acc
                if best:
                    loop.best_acc, loop.best_epoch = test_acc, epoch
                loop.epoch, loop.step, loop.perm, loop.partial = epoch, 0, None, {}
                if d.enabled:  # every rank holds the same model, bit for bit (checked, and recorded)
                    run.base_meta["train"]["ranks_sha256"] = d.check_identical(model)
                if d.main:
                    append_metrics(run.run_dir, last_record)  # first: a resume truncates a line it replays
                save(best)
                reporter.epoch_end(last_record)
                if d.any(bool(stop), device):
                    raise interrupted(stop.signum or 2, f"after epoch {epoch}")
    except Exception as exc:
        if d.enabled and is_lost_rank(exc):
            done = (f"{run.run_dir / LAST} (epoch {loop.epoch}) is the last complete epoch" if loop.epoch
                    else "no epoch completed")
            raise TrainingError(
                f"rank {d.rank}: lost contact with the other ranks ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); one of them stopped or failed (its own "
                f"error is above). {done}; resume with: {d.launcher()} {run.command} --resume {run.run_dir}"
            ) from exc
        raise
    finally:
        reporter.close()
        torch.set_num_threads(threads_before)
    if last_record is None and loop.epoch > 0:
        last_record = read_metrics(run.run_dir)[-1]  # resumed a run that was already complete
    return TrainResult(run.run_dir, cfg.stage, loop.epoch, loop.best_acc, loop.best_epoch, last_record,
                       time.perf_counter() - started, str(device), run.precision.name, d.rank)
