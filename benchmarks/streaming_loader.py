"""Streaming loader vs the device-resident path: training throughput on the same small data.

    .venv/bin/python benchmarks/streaming_loader.py [--device cpu] [--workers 2] [--epochs 2]

Trains the same model on the same generated image folder twice — ``--data-on-device`` (decoded
once, augmented on the device) and ``--no-data-on-device`` (decoded and augmented per image in
DataLoader workers) — and prints images/s of the last epoch of each and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _images import make_image_folder

from slimcli.registry import load_plugins
from slimcli.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description="streaming loader vs device-resident throughput")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--arch", default="resnet56:depth=8")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    load_plugins()
    with tempfile.TemporaryDirectory() as work:
        folder = make_image_folder(Path(work) / "imgs", classes=4, train=a.per_class, val=20)
        spec = f"imagefolder:path={folder},size={a.size}"
        speed = {}
        for resident in (True, False):
            out = Path(work) / ("resident" if resident else "stream")
            r = train(TrainConfig(arch=a.arch, dataset=spec, epochs=a.epochs, batch_size=64, lr=0.05,
                                  device=a.device, threads=a.threads, workers=a.workers,
                                  data_on_device=resident, out=str(out)))
            speed[resident] = r.last["images_per_s"] if r.last else float("nan")
        n = 4 * a.per_class
        print(f"{n} images {a.size}x{a.size}, {a.arch}, {a.device}, {a.workers} workers: "
              f"resident {speed[True]:.0f} img/s, streaming {speed[False]:.0f} img/s, "
              f"ratio streaming/resident {speed[False] / speed[True]:.2f}")


if __name__ == "__main__":
    main()
