"""Dense vs pruned latency per runtime, with the files `slim export --target RUNTIME` writes.

    .venv/bin/python benchmarks/latency.py [--quick] [--archs vgg19,resnet164,densenet40]
        [--ratios 0.3,0.5,0.7] [--round-to 1,8] [--batches 1,32] [--runtimes ort,openvino]
        [--threads 2] [--json FILE]

For each architecture (CIFAR size, 3×32×32, 10 classes, random BN scales |γ| ~ U(0, 1) as in
``edge_latency.py``), every ``--ratios`` × ``--round-to`` is pruned with ``slim prune``'s code
(``compute_keep`` + ``prune_model``, the paper's gathers), then re-formed for each runtime exactly
as ``slim export --target RUNTIME`` does (``slimcli.export.metadata.reformed``: selections by
target, kept counts padded with zero channels, the padding timed and chosen), exported, and timed
**interleaved** with the dense model in that runtime. Printed per row: the MAC ratio of the
pruning (the paper's count) and of the file (with its zero padding), the latency ratio, and the
efficiency (1 − latency ratio) / (1 − MAC ratio) against each. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from edge_latency import SHAPE, gathers, random_gamma, setup

from slimcli.archs import create_arch
from slimcli.export import export_onnx
from slimcli.export.metadata import reformed
from slimcli.export.runtimes import check_runtimes, interleaved_latency
from slimcli.measure import measure
from slimcli.prune import compute_keep, prune_model


def _eff(lat: float, mac: float) -> float:
    return (1 - lat) / (1 - mac) if mac < 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="vgg19,resnet164,densenet40")
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--round-to", default="1,8", help="comma list of slim prune --round-to values")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--runtimes", default="ort,openvino")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer timed runs (20 at batch 1, 5 at batch 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runs_b1, runs_big = (20, 5) if args.quick else (100, 20)
    runtimes, ratios, batches, versions = setup(args, "latency")
    rounds = [int(r) for r in args.round_to.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slim-latency-") as tmp:
        for arch in args.archs.split(","):
            dense = random_gamma(create_arch(arch, 10, SHAPE), args.seed)
            meta = {"arch": arch, "num_classes": 10, "input_shape": list(SHAPE)}
            dense_macs = measure(dense, SHAPE).macs
            for rt in runtimes:
                target = rt if rt in ("ort", "openvino", "ncnn") else "generic"
                models: dict[str, torch.nn.Module] = {"dense": dense}
                info: dict[str, dict[str, Any]] = {}
                for r in ratios:
                    for n in rounds:
                        plan = compute_keep(dense, "ratio", r, 1, input_shape=SHAPE, round_to=n)
                        slim, _ = prune_model(dense, plan, input_shape=SHAPE)
                        new, form, _ = reformed(slim, meta, target)
                        key = f"{r:g} r{n}"
                        models[key] = new
                        info[key] = {"ratio": r, "round_to": n, "pruned_macs": measure(slim, SHAPE).macs,
                                     "pad_to": (form or {}).get("pad_to", 1)}
                blobs = {}
                for key, model in models.items():
                    path = Path(tmp) / f"{arch}-{rt}-{key.replace(' ', '_')}.onnx"
                    export_onnx(model.eval(), path, input_shape=SHAPE, metadata={}, latency_runs=0)
                    blobs[key] = path.read_bytes()
                    info.setdefault(key, {})["macs"] = measure(model, SHAPE).macs
                    info[key]["gathers"] = gathers(path)
                    checked = check_runtimes(blobs[key], model, SHAPE, [rt], latency_runs=0,
                                             threads=args.threads, raise_on_mismatch=False)
                    info[key]["rel_diff"] = max(c.rel_diff for c in checked)
                for b in batches:
                    runs, warm = (runs_b1, 5) if b == 1 else (runs_big, 2)
                    med = interleaved_latency(blobs, SHAPE, rt, batch=b, runs=runs, warmup=warm,
                                              threads=args.threads, seed=args.seed)
                    for key, i in info.items():
                        if key == "dense":
                            continue
                        lat = med[key] / med["dense"]
                        mac_p, mac_f = i["pruned_macs"] / dense_macs, i["macs"] / dense_macs
                        rows.append({
                            "arch": arch, "ratio": i["ratio"], "round_to": i["round_to"], "runtime": rt,
                            "batch": b, "pad_to": i["pad_to"], "gathers": i["gathers"],
                            "mac_ratio_pruned": mac_p, "mac_ratio_file": mac_f, "dense_ms": med["dense"],
                            "pruned_ms": med[key], "latency_ratio": lat,
                            "efficiency_pruned": _eff(lat, mac_p), "efficiency_file": _eff(lat, mac_f),
                            "rel_diff": max(i["rel_diff"], info["dense"]["rel_diff"])})
                        print(f"{arch} {key} {rt} b{b}: {med['dense']:.2f} → {med[key]:.2f} ms ({lat:.2f}×)",
                              file=sys.stderr)

    print("| arch | ratio | --round-to | runtime | batch | pad | Gather | MACs × (pruned / file) | dense ms "
          "| slim ms | latency × | efficiency (pruned / file) | parity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['ratio']:g} | {r['round_to']} | {r['runtime']} | {r['batch']} "
              f"| {r['pad_to']} | {r['gathers']} | {r['mac_ratio_pruned']:.2f} / {r['mac_ratio_file']:.2f} "
              f"| {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | **{r['latency_ratio']:.2f}** "
              f"| {r['efficiency_pruned']:.2f} / "
              f"{r['efficiency_file']:.2f} | {r['rel_diff']:.1e}" + (" WRONG" if r["rel_diff"] > 1e-4 else "")
              + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "versions": versions, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
