"""Training throughput: slim's engine vs a loop in the style of the public network-slimming code.

Both train the same architecture on the same images for the same number of steps, with the
ℓ1 subgradient on every BN scale:

- reference: a ``torch.utils.data.Dataset`` whose ``__getitem__`` pads, randomly crops, flips
  and normalises one image at a time, a ``DataLoader`` (``num_workers=1, pin_memory=True`` on
  CUDA as in the reference ``main.py``, none on the CPU), fp32, and the penalty added by a
  Python loop over the BN layers (``m.weight.grad.data.add_(s * torch.sign(m.weight.data))``);
- slim: :func:`slimcli.train.train` — data resident on the device as uint8, one vectorised
  crop/flip per batch, bf16 autocast and channels_last on CUDA (``--amp``, ``--compile``).

Each side runs two passes of ``--steps`` steps and times the second (the first warms up
kernels, caches and the allocator); ``--repeats`` interleaved rounds, medians reported. Usage::

    python benchmarks/train_throughput.py --arch vgg11:width=0.25 --device cpu --steps 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from slimcli.archs import create_arch
from slimcli.data import create_dataset
from slimcli.train import TrainConfig, train
from slimcli.train.device import resolve_device


class PerSampleDataset(TorchDataset):
    """uint8 images with torchvision-style per-sample transforms written with torch ops
    (RandomCrop(padding) → RandomHorizontalFlip → ToTensor → Normalize)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple, std: tuple, pad: int,
                 hflip: bool) -> None:
        self.images, self.labels, self.pad, self.hflip = images, labels, pad, hflip
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        _, h, w = img.shape
        if self.pad:
            img = F.pad(img, (self.pad,) * 4)
            y, x = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            img = img[:, y : y + h, x : x + w]
        if self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return (img.float() / 255 - self.mean) / self.std, int(self.labels[i])


def reference_loop(model: nn.Module, loader: DataLoader, device: torch.device, steps: int, s: float) -> float:
    """Seconds for ``steps`` steps of the reference training loop (after one warm-up pass)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.train()
    seconds = 0.0
    for _ in range(2):  # pass 1 warms up, pass 2 is timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step, (data, target) in enumerate(loader):
            if step == steps:
                break
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            output = model(data)
            loss = F.cross_entropy(output, target)
            loss.backward()
            for m in model.modules():  # the reference's updateBN()
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.grad.data.add_(s * torch.sign(m.weight.data))
            optimizer.step()
            if step % 100 == 0:
                loss.item()  # the reference logs the loss every log_interval batches
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vgg11:width=0.25")
    p.add_argument("--dataset", default="synthetic:size=32,channels=3,classes=10",
                   help="a synthetic dataset spec (n is set from --steps × --batch-size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--amp", default="auto", help="slim side only (the reference is fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile on the slim side")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both loops (0 = torch's default)")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW on the slim side too")
    p.add_argument("--lam", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n = args.steps * args.batch_size
    if args.dataset.partition(":")[0] != "synthetic":
        p.error("--dataset must be a synthetic spec: the engine's epoch must be exactly --steps steps")
    spec = args.dataset + ("," if ":" in args.dataset else ":") + f"n={n},n_test=256"
    ds = create_dataset(spec)
    images, labels = ds.load("train")
    images, labels = images[:n], labels[:n]
    pad, hflip = int(ds.augment.get("crop_pad", 0)), bool(ds.augment.get("hflip", False))

    cuda = device.type == "cuda"
    per_sample = PerSampleDataset(images, labels, ds.mean, ds.std, pad, hflip)
    loader = DataLoader(per_sample, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=1 if cuda else 0, pin_memory=cuda)
    ref_runs: list[float] = []
    slim_runs: list[float] = []
    precision = ""
    # Interleaved rounds, median reported: on a shared machine the load changes from one
    # minute to the next, and a single pair of timings can be off by 10x either way.
    for _ in range(args.repeats):
        torch.manual_seed(0)
        model = create_arch(args.arch, ds.num_classes, tuple(ds.input_shape)).to(device)
        seconds = reference_loop(model, loader, device, args.steps, args.lam)
        ref_runs.append(args.steps * args.batch_size / seconds)
        # slim engine: 2 epochs of exactly --steps steps; epoch 2's train-only images/s
        with tempfile.TemporaryDirectory() as tmp:
            # the same CPU thread count as the reference (no automatic choice): like for like
            config = TrainConfig(arch=args.arch, dataset=spec, penalty="l1", lam=args.lam, epochs=2,
                                 batch_size=args.batch_size, milestones=(), device=str(device), amp=args.amp,
                                 compile=args.compile, threads=torch.get_num_threads(),
                                 channels_last=not args.no_channels_last,
                                 out=str(Path(tmp) / "run"), quiet=True, command="benchmark")
            result = train(config)
        assert result.last is not None
        slim_runs.append(result.last["images_per_s"])
        precision = result.precision
    ref_ips, slim_ips = statistics.median(ref_runs), statistics.median(slim_runs)

    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {threads} threads"
    print(f"arch {args.arch}, data {spec} {tuple(ds.input_shape)}, batch {args.batch_size}, "
          f"{args.steps} steps timed, {name}, torch {torch.__version__}")
    print(f"{'loop':<64} {'images/s':>10} {'ms/step':>9}   (median of {args.repeats}; all runs)")
    ref_name = f"reference (DataLoader w={loader.num_workers}, per-sample aug, fp32, Python BN loop)"
    slim_name = f"slim engine (device-resident, batch aug, amp {precision}" + \
        (", NCHW" if args.no_channels_last else ", NHWC") + (", compile" if args.compile else "") + ")"
    for label, ips, runs in [(ref_name, ref_ips, ref_runs), (slim_name, slim_ips, slim_runs)]:
        every = ", ".join(f"{r:.0f}" for r in runs)
        print(f"{label:<64} {ips:>10.0f} {1000 * args.batch_size / ips:>9.1f}   ({every})")
    print(f"ratio slim/reference: {slim_ips / ref_ips:.2f}x")
    print("command: python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]))


if __name__ == "__main__":
    main()
