"""Data-parallel training under ``torchrun`` (DistributedDataParallel), and nothing when alone.

``torchrun --nproc_per_node=N -m slimcli sparsify-train …`` starts N copies of the command;
:func:`init_from_env` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: NCCL on CUDA (rank → the GPU
``cuda:LOCAL_RANK``), gloo on the CPU. Without torchrun (or with one process) every helper
here is a no-op, so the single-process engine is unchanged.

What keeps the ranks identical: every rank draws the same permutation and augmentation
streams (same seeds) and takes its contiguous slice of each global batch; DDP averages the
gradients, so the penalty (added to the averaged gradients, or the prox after the identical
step) and every γ stay bit-identical; DDP broadcasts rank 0's BatchNorm buffers at each forward.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from slimcli.errors import TrainingError, UsageError

#: under DDP the ranks agree on a Ctrl-C / SIGTERM every this many steps (one tiny all-reduce)
STOP_CHECK_EVERY = 10
#: a collective that waits longer than this fails (a lost rank) instead of hanging
TIMEOUT = _dt.timedelta(minutes=10)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: ``world`` processes, this one is ``rank`` (``local_rank`` on its node)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The rank that writes checkpoints, metrics and progress."""
        return self.rank == 0

    # collectives (no-ops alone) ---------------------------------------------------------
    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` (sum) in place across ranks; returns it."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank."""
        if not self.enabled:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them before
        each forward, so after an epoch's last step each rank still holds its own update."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b, src=0)

    def check_identical(self, model: nn.Module) -> str:
        """sha256 of ``model``'s parameters and buffers, checked equal on every rank (else an error)."""
        digest = state_digest(model)
        if self.enabled:
            digests: list[str] = [""] * self.world
            dist.all_gather_object(digests, digest)
            if len(set(digests)) > 1:
                which = ", ".join(f"rank {i}: {h[:12]}" for i, h in enumerate(digests))
                raise TrainingError(f"the ranks' models differ ({which}); this is a bug in slim or a "
                                    f"nondeterministic plugin — please report it")
        return digest

    def launcher(self) -> str:
        """How to start the command again (for resume hints)."""
        if not self.enabled:
            return "slim"
        return f"torchrun --nproc_per_node={self.local_world} -m slimcli"


def state_digest(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in ``model.state_dict()``."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def env_dist() -> Dist:
    """The torchrun environment of this process (world 1 without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    return Dist(world, rank, local, local_world)


def init_from_env(device_text: str) -> tuple[Dist, str]:
    """Join torchrun's process group; return it and the device string this rank must use."""
    d = env_dist()
    if not d.enabled:
        return d, device_text
    if device_text.startswith("cuda:"):
        raise UsageError(f"--device {device_text}: under torchrun each rank uses cuda:LOCAL_RANK; "
                         f"pass --device cuda (or auto)")
    cuda = device_text in ("cuda", "auto") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(d.local_rank)
        device_text = f"cuda:{d.local_rank}"
    elif device_text == "auto":
        device_text = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return d, device_text


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def is_lost_rank(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "peer", "timed out"))


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch (all ranks), on any device.

    ``torch.nn.SyncBatchNorm`` needs CUDA; this one all-reduces Σx, Σx² and the count with a
    differentiable all-reduce (gloo or NCCL), so forward and backward equal one BatchNorm
    over the whole global batch. Same parameters, buffers and state-dict keys as BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable

        c = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)),
                           x.new_full((1,), x.numel() // c)])
        total = all_reduce(local)
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1  # type: ignore[operator]
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Global-batch BatchNorm statistics: torch's SyncBatchNorm on CUDA, :class:`GlobalBatchNorm2d`
    elsewhere (same parameter objects, so optimizer and γ list stay valid)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return model


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` under torchrun, ``model`` itself alone."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # rank 0's BatchNorm running statistics are broadcast at every forward (identical checkpoints)
    params = inspect.signature(DDP.__init__).parameters
    sync = {"forward_sync_buffers": True} if "forward_sync_buffers" in params else {"broadcast_buffers": True}
    return DDP(model, device_ids=ids, **sync)


__all__ = [
    "Dist",
    "GlobalBatchNorm2d",
    "env_dist",
    "init_from_env",
    "is_lost_rank",
    "shutdown",
    "state_digest",
    "sync_batchnorm",
    "wrap",
]
