"""How many images BatchNorm recalibration needs, and what it costs.

    .venv/bin/python benchmarks/recalibration.py CKPT [--ratio 0.7] [--images 0,64,256,1024,2048,8192,60000]
        [--seeds 0,1,2] [--threads 2] [--json]

Prunes CKPT once at ``--ratio`` (the surgery of ``slim prune``), then for every N of
``--images`` recalibrates a fresh copy of the slim model on N training images (for each
seed of ``--seeds``) and measures test accuracy. Timing is reported as seconds and as a
ratio to the test-set evaluation done in the same process (the baseline), so the numbers
can be compared across noisy machines. Results go to docs/pruning.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from slimcli.checkpoint import load_checkpoint
from slimcli.data import create_dataset
from slimcli.flows.prune import prune_loaded
from slimcli.model import Normalizer, build_model, calibration_images, evaluate_tensors, normalization_of
from slimcli.model import recalibrate as recalibrate_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--ratio", type=float, default=0.7)
    ap.add_argument("--images", default="0,64,256,1024,2048,8192,60000")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.ckpt)
    dense = build_model(ckpt)
    spec = str(ckpt.meta["dataset"])
    ds = create_dataset(spec)
    x_test, y_test = ds.load("test", None)
    mean, std = normalization_of(ckpt.meta) or (ds.mean, ds.std)
    normalize = Normalizer(mean, std, torch.device("cpu"))

    def test(model: torch.nn.Module) -> tuple[float, float]:
        t0 = time.perf_counter()
        _, acc = evaluate_tensors(model, x_test, y_test, normalize)
        return acc, time.perf_counter() - t0

    dense_acc, eval_s = test(dense)
    pruned = prune_loaded(ckpt, dense, "ratio", args.ratio, 1, recalibrate=0)
    surgery_acc, _ = test(pruned.model)
    rows = []
    for n in [int(v) for v in args.images.split(",")]:
        accs, secs = [], []
        for seed in [int(s) for s in args.seeds.split(",")] if n else [0]:
            model = copy.deepcopy(pruned.model)
            if n:
                images = calibration_images(spec, n, seed=seed)
                t0 = time.perf_counter()
                recalibrate_model(model, images, (mean, std))
                secs.append(time.perf_counter() - t0)
            accs.append(test(model)[0])
        rows.append({"images": n, "acc_mean": statistics.mean(accs), "acc_min": min(accs),
                     "acc_max": max(accs), "seconds": statistics.median(secs) if secs else 0.0})
    doc = {"ckpt": args.ckpt, "ratio": args.ratio, "dense_acc": dense_acc, "surgery_acc": surgery_acc,
           "eval_seconds": eval_s, "threads": args.threads, "rows": rows}
    if args.json:
        print(json.dumps(doc))
        return
    print(f"{args.ckpt}: dense {dense_acc:.2%}, ratio {args.ratio} after surgery {surgery_acc:.2%}; "
          f"test-set evaluation {eval_s:.2f} s ({args.threads} threads)")
    print("| images | test acc. (mean over seeds) | min – max | recalibration s | ÷ test evaluation |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['acc_mean']:.2%} | {r['acc_min']:.2%} – {r['acc_max']:.2%} | "
              f"{r['seconds']:.2f} | {r['seconds'] / eval_s:.2f}× |")


if __name__ == "__main__":
    main()
