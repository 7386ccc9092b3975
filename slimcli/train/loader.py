"""Where training batches come from: the device-resident fast path or the streaming loader.

Both feeders give the loop the same things — ``steps`` global steps per epoch, this rank's
normalised slice of each global batch, and a test evaluation summed over all ranks — so the
loop does not know which one runs.

- :class:`ResidentFeeder` (small sets): the split sits on the device as uint8; a step gathers
  the global batch, augments it there (:func:`~slimcli.train.augment.random_crop_flip`, one
  generator with the same state on every rank) and keeps this rank's slice.
- :class:`StreamFeeder` (sets that declare themselves too large, or ``--no-data-on-device``):
  DataLoader worker processes read and augment images one by one
  (:meth:`slimcli.data.Dataset.source`, randomness from (seed, epoch, index)), batches arrive
  in pinned memory and are copied to the device with ``non_blocking=True``.

Global step ``i`` takes ``perm[i·B : (i+1)·B]``; with W ranks, rank r takes the r-th of W equal
contiguous parts (a last batch not divisible by W drops its remainder, at most W − 1 images).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from slimcli.data import SampleSource, sample_rng
from slimcli.model import Normalizer, evaluate_tensors
from slimcli.train.augment import random_crop_flip
from slimcli.train.distributed import Dist


def epoch_steps(n: int, batch: int, world: int) -> int:
    """Global steps in an epoch of ``n`` images: a last partial batch counts if every rank gets one."""
    return n // batch + (1 if n % batch >= world else 0)


def rank_slice(indices: Tensor, d: Dist) -> Tensor:
    """This rank's contiguous part of one global batch (all parts equal)."""
    part = len(indices) // d.world
    return indices[d.rank * part : (d.rank + 1) * part]


def auto_workers(d: Dist) -> int:
    """DataLoader workers per rank: the CPUs of this node shared by its ranks, one left, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // max(d.local_world, 1) - 1))


class ResidentFeeder:
    """The whole dataset as uint8 on the device; batches gathered and augmented there."""

    streaming = False

    def __init__(self, ds: Any, root: Path | None, device: torch.device, normalize: Normalizer,
                 batch: int, d: Dist, generator: torch.Generator) -> None:
        self.x_train, self.y_train = (t.to(device) for t in ds.load("train", root))
        self.x_test, self.y_test = (t.to(device) for t in ds.load("test", root))
        self.crop_pad, self.hflip = int(ds.augment.get("crop_pad", 0)), bool(ds.augment.get("hflip", False))
        self.normalize, self.batch, self.d, self.generator = normalize, batch, d, generator
        self.n = len(self.y_train)
        self.steps = epoch_steps(self.n, batch, d.world)

    def sample(self, count: int) -> tuple[Tensor, Tensor]:
        idx = torch.arange(min(count, self.n), device=self.x_train.device)
        return self.normalize(self.x_train[idx]), self.y_train[idx]

    def batches(self, perm: Tensor, start: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        perm = perm.to(self.x_train.device)
        for i in range(start, self.steps):
            idx = perm[i * self.batch : (i + 1) * self.batch]
            x = random_crop_flip(self.x_train[idx], self.crop_pad, self.hflip, self.generator)
            if self.d.enabled:  # the same draws on every rank; each keeps its slice
                x, idx = rank_slice(x, self.d), rank_slice(idx, self.d)
            yield self.normalize(x), self.y_train[idx]

    def evaluate(self, net: nn.Module, batch: int, amp_dtype: torch.dtype | None) -> tuple[float, float]:
        x, y = self.x_test, self.y_test
        if self.d.enabled:
            x, y = x[self.d.rank :: self.d.world], y[self.d.rank :: self.d.world]
        loss, acc = evaluate_tensors(net, x, y, self.normalize, batch, amp_dtype) if len(y) else (0.0, 0.0)
        return _gather(loss, acc, len(y), self.d, x.device)


class _Samples(TorchDataset):
    """Map-style view: key (epoch, index) → (uint8 image, label); epoch < 0 = evaluation view."""

    def __init__(self, source: SampleSource, seed: int) -> None:
        self.source, self.seed = source, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, i = key
        rng = sample_rng(self.seed, epoch, i) if epoch >= 0 else None
        return torch.from_numpy(self.source.get(i, rng)), int(self.source.labels[i])


class _Plan:
    """A batch sampler whose batches are replaced before each pass (persistent workers keep it)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamFeeder:
    """Images read and augmented in DataLoader workers, pinned, copied asynchronously."""

    streaming = True

    def __init__(self, ds: Any, root: Path | None, device: torch.device, normalize: Normalizer,
                 batch: int, d: Dist, seed: int, workers: int | None) -> None:
        self.train_src, self.test_src = ds.source("train", root), ds.source("test", root)
        self.device, self.normalize, self.batch, self.d = device, normalize, batch, d
        self.n = len(self.train_src)
        self.steps = epoch_steps(self.n, batch, d.world)
        self.workers = auto_workers(d) if workers is None else workers
        self.train_plan, self.test_plan = _Plan(), _Plan()
        self.train_loader = self._loader(_Samples(self.train_src, seed), self.train_plan)
        self.test_loader = self._loader(_Samples(self.test_src, seed), self.test_plan)

    def _loader(self, samples: _Samples, plan: _Plan) -> DataLoader:
        extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 4} if self.workers else {}
        return DataLoader(samples, batch_sampler=plan, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", **extra)

    def _to_device(self, batches: Iterator[Any]) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            yield self.normalize(x), y.to(self.device, non_blocking=True)

    def sample(self, count: int) -> tuple[Tensor, Tensor]:
        self.train_plan.batches = [[(-1, i) for i in range(min(count, self.n))]]
        return next(self._to_device(iter(self.train_loader)))

    def batches(self, perm: Tensor, start: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        plan = []
        for i in range(start, self.steps):
            idx = rank_slice(perm[i * self.batch : (i + 1) * self.batch], self.d)
            plan.append([(epoch, int(j)) for j in idx])
        self.train_plan.batches = plan
        return self._to_device(iter(self.train_loader))

    def evaluate(self, net: nn.Module, batch: int, amp_dtype: torch.dtype | None) -> tuple[float, float]:
        mine = list(range(self.d.rank, len(self.test_src), self.d.world))
        self.test_plan.batches = [[(-1, i) for i in mine[k : k + batch]] for k in range(0, len(mine), batch)]
        loss_sum = correct = 0.0
        for x, y in self._to_device(iter(self.test_loader)):
            loss, acc = evaluate_tensors(net, x, y, _identity, len(y), amp_dtype)
            loss_sum, correct = loss_sum + loss * len(y), correct + round(acc * len(y))
        n = len(mine)
        return _gather(loss_sum / max(n, 1), correct / max(n, 1), n, self.d, self.device)


def _identity(x: Tensor) -> Tensor:
    return x


def _gather(loss: float, acc: float, n: int, d: Dist, device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy over all ranks' shards from each rank's means and count."""
    if not d.enabled:
        return loss, acc
    t = d.sum_(torch.tensor([loss * n, round(acc * n), n], dtype=torch.float64, device=device))
    total = max(t[2].item(), 1.0)
    return t[0].item() / total, t[1].item() / total


Feeder = ResidentFeeder | StreamFeeder


def make_feeder(ds: Any, root: Path | None, device: torch.device, normalize: Normalizer, batch: int,
                d: Dist, generator: torch.Generator, seed: int, on_device: bool | None,
                workers: int | None) -> Feeder:
    """The resident feeder unless the dataset is too large for the device (or ``on_device`` is False)."""
    resident = (not ds.too_large_for_device(root)) if on_device is None else on_device
    if resident:
        return ResidentFeeder(ds, root, device, normalize, batch, d, generator)
    return StreamFeeder(ds, root, device, normalize, batch, d, seed, workers)
