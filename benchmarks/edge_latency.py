"""Edge latency of pruned vs dense models: ONNX export, then CPU latency per runtime, interleaved.

    .venv/bin/python benchmarks/edge_latency.py [--quick] [--archs vgg19,resnet164,densenet40]
        [--ratios 0.3,0.5] [--batches 1,32] [--runtimes ort[,openvino,opencv,ncnn]] [--threads 2]
        [--runs-b1 N] [--runs-b32 N] [--seed 0] [--json FILE]

For each architecture (CIFAR size, 3×32×32, 10 classes) the dense model gets random BN scales
(|γ| ~ U(0, 1), seeded, so the global-ratio rule spreads the cuts over all layers), is pruned at
every ``--ratios`` with the library's own surgery (``slimcli.prune.compute_keep`` +
``prune_model``, the code of ``slim prune``), and the dense and pruned models are exported with
``slimcli.export.export_onnx`` (verified against PyTorch in onnxruntime, as ``slim export``).
Then, per runtime and batch size, the dense and all pruned models of the architecture are timed
**interleaved** (one run of each in turn, see ``slimcli.measure.interleaved_medians``) on the
same input, ``--threads`` intra-op threads; the table gives the medians, the ratio to dense,
the MAC ratio, the efficiency ``(1 − latency ratio) / (1 − MAC ratio)`` (1: latency falls as
fast as MACs; ≤ 0: no faster than dense) and the number of ``Gather`` nodes (channel
selections) in the pruned ONNX graph. ``--quick`` uses fewer timed runs (a few minutes on two
cores). Results and commands are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from slimcli.archs import create_arch
from slimcli.export import export_onnx
from slimcli.export.forms import export_form
from slimcli.export.runtimes import check_runtimes, interleaved_latency, parse_runtimes, runtime_version
from slimcli.measure import measure
from slimcli.prune import compute_keep, prune_model

SHAPE = (3, 32, 32)


def random_gamma(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """|γ| ~ U(0, 1) in every BatchNorm (what a sparsity-trained model's ranking looks like to the rule)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g))
    # scale the classifier so logits are O(1): parity (relative to max(1, |logit|)) then means something
    fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        std = model.eval()(torch.randn(8, *SHAPE, generator=g)).std().item()
        if std > 0:
            fc.weight.mul_(1 / std)
            if fc.bias is not None:
                fc.bias.mul_(1 / std)
    return model.eval()


def gathers(path: Path) -> int:
    import onnx

    return sum(n.op_type == "Gather" for n in onnx.load(str(path)).graph.node)


def setup(args: argparse.Namespace, title: str) -> tuple[list[str], list[float], list[int], dict[str, Any]]:
    """Threads and seed set, the header printed: (runtimes, ratios, batches, runtime versions)."""
    runtimes = list(parse_runtimes(args.runtimes))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    versions = {r: runtime_version(r) for r in runtimes}
    print(f"# {title}: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          + ", ".join(f"{r} {v}" for r, v in versions.items()), file=sys.stderr)
    return (runtimes, [float(r) for r in args.ratios.split(",")], [int(b) for b in args.batches.split(",")],
            versions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="vgg19,resnet164,densenet40")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--runtimes", default="ort", help="comma list of ort, opencv, openvino, ncnn (or all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer timed runs (20 at batch 1, 5 at batch 32)")
    ap.add_argument("--runs-b1", type=int, default=None)
    ap.add_argument("--runs-b32", type=int, default=None, help="timed runs at batches > 1")
    ap.add_argument("--forms", default="gather",
                    help="comma list of pruned forms: gather (slim prune's default), zero (--selections "
                         "zero), joint (--coupling joint), each optionally +rN (--round-to N), e.g. "
                         "gather,zero+r8,joint+r8; @SELECTIONS/PAD re-forms the pruned model as slim export "
                         "does (e.g. gather@zero/16, gather@pieces/8; SELECTIONS as in slim export)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runs_b1 = args.runs_b1 or (20 if args.quick else 100)
    runs_big = args.runs_b32 or (5 if args.quick else 20)
    runtimes, ratios, batches, versions = setup(args, "edge latency")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slim-edge-") as tmp:
        for arch in args.archs.split(","):
            dense = random_gamma(create_arch(arch, 10, SHAPE), args.seed)
            models: dict[str, torch.nn.Module] = {"dense": dense}
            ratio_of: dict[str, float] = {}
            for r in ratios:
                for form in args.forms.split(","):
                    pruned_as, _, reformed = form.partition("@")
                    base, _, rnd = pruned_as.partition("+r")
                    coupling = "joint" if base == "joint" else "auto"
                    selections = base if base in ("zero", "auto") else "gather"
                    plan = compute_keep(dense, "ratio", r, 1, input_shape=SHAPE, coupling=coupling,
                                        round_to=int(rnd) if rnd else 1)
                    key = f"{r:g} {form}"
                    models[key], _ = prune_model(dense, plan, input_shape=SHAPE, selections=selections)
                    if reformed:  # as slim export re-forms it: @SELECTIONS/PAD (e.g. @zero/16, @pieces/8)
                        sel, _, pad = reformed.partition("/")
                        models[key], _ = export_form(models[key], create_arch(arch, 10, SHAPE), sel,
                                                     int(pad or 1), SHAPE)
                    ratio_of[key] = r
            info: dict[str, dict[str, Any]] = {}
            blobs: dict[str, bytes] = {}
            for key, model in models.items():
                path = Path(tmp) / f"{arch}-{key}.onnx".replace("/", "_")
                export_onnx(model.eval(), path, input_shape=SHAPE, metadata={}, latency_runs=0)
                blobs[key] = path.read_bytes()
                m = measure(model, SHAPE)
                info[key] = {"macs": m.macs, "params": m.params, "gathers": gathers(path)}
                print(f"{arch} {key}: {m.macs / 1e6:.1f} MMACs, {m.params:,} params, "
                      f"{info[key]['gathers']} Gather nodes", file=sys.stderr)
            # every runtime computes every model right (else its latency means nothing)
            parity: dict[tuple[str, str], float] = {}
            for key, model in models.items():
                for c in check_runtimes(blobs[key], model, SHAPE, runtimes, latency_runs=0,
                                        threads=args.threads, raise_on_mismatch=False):
                    parity[key, c.runtime] = c.rel_diff
            for rt in runtimes:
                for b in batches:
                    runs, warm = (runs_b1, 5) if b == 1 else (runs_big, 2)
                    med = interleaved_latency(blobs, SHAPE, rt, batch=b, runs=runs, warmup=warm,
                                              threads=args.threads, seed=args.seed)
                    for key in models:
                        if key == "dense":
                            continue
                        mac_ratio = info[key]["macs"] / info["dense"]["macs"]
                        lat_ratio = med[key] / med["dense"]
                        eff = (1 - lat_ratio) / (1 - mac_ratio) if mac_ratio < 1 else float("nan")
                        rows.append({
                            "arch": arch, "ratio": ratio_of[key], "form": key.split(" ", 1)[1],
                            "runtime": rt, "batch": b,
                            "mac_ratio": mac_ratio,
                            "params_ratio": info[key]["params"] / info["dense"]["params"],
                            "gathers": info[key]["gathers"], "dense_ms": med["dense"], "pruned_ms": med[key],
                            "latency_ratio": lat_ratio, "efficiency": eff,
                            "rel_diff": parity[key, rt], "dense_rel_diff": parity["dense", rt],
                        })
                        r = rows[-1]
                        print(f"{arch} {key} {rt} b{b}: {r['dense_ms']:.2f} → {r['pruned_ms']:.2f} ms "
                              f"({lat_ratio:.2f}×, MACs {mac_ratio:.2f}×)", file=sys.stderr)

    print("| arch | ratio | form | runtime | batch | MACs × | params × | Gather | dense ms | pruned ms "
          "| latency × | efficiency | parity (rel) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        par = max(r["rel_diff"], r["dense_rel_diff"])
        print(f"| {r['arch']} | {r['ratio']:g} | {r['form']} | {r['runtime']} | {r['batch']} "
              f"| {r['mac_ratio']:.2f} "
              f"| {r['params_ratio']:.2f} | {r['gathers']} | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} "
              f"| **{r['latency_ratio']:.2f}** | {r['efficiency']:.2f} | {par:.1e}"
              + (" WRONG" if par > 1e-4 else "") + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "versions": versions, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
