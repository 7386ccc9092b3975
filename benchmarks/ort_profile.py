"""Where onnxruntime spends its time in dense and re-formed pruned models: node time per op type.

    .venv/bin/python benchmarks/ort_profile.py --arch densenet40 --ratio 0.5 \\
        --forms dense,gather/8,pieces/8 [--batch 32] [--runs 5] [--threads 2]

The model gets random BN scales as in ``edge_latency.py``, is pruned at ``--ratio`` with
``slim prune``'s code, re-formed as ``slim export --selections S --pad-to P`` does for each ``S/P``
of ``--forms`` (``dense``: the dense model), exported, and run ``--runs`` times under onnxruntime's
profiler. Printed: the median run time and, per op type, the mean node time per run (the profiler
inflates both; compare forms, and use ``latency.py`` / ``edge_latency.py`` for latency). Op types
are after onnxruntime's own graph rewrites (its blocked-layout transformer turns BatchNormalization
into a depthwise conv where the input is blocked, fuses ReLU into convs, inserts Reorder nodes).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edge_latency import SHAPE, random_gamma

from slimcli.archs import create_arch
from slimcli.export import export_onnx
from slimcli.export.forms import export_form
from slimcli.measure import measure, ort_options
from slimcli.prune import compute_keep, prune_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="densenet40")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--forms", default="dense,gather/8,pieces/8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dense = random_gamma(create_arch(args.arch, 10, SHAPE), args.seed)
    plan = compute_keep(dense, "ratio", args.ratio, 1, input_shape=SHAPE)
    pruned, _ = prune_model(dense, plan, input_shape=SHAPE)
    dense_macs = measure(dense, SHAPE).macs
    x = np.random.default_rng(args.seed).standard_normal((args.batch, *SHAPE)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="slim-profile-") as tmp:
        for form in args.forms.split(","):
            if form == "dense":
                model = dense
            else:
                sel, _, pad = form.partition("/")
                model, _ = export_form(pruned, create_arch(args.arch, 10, SHAPE), sel, int(pad or 1), SHAPE)
            path = Path(tmp) / f"{form.replace('/', '_')}.onnx"
            export_onnx(model.eval(), path, input_shape=SHAPE, metadata={}, latency_runs=0)
            so = ort_options(ort, args.threads)  # slim's session options (workers stop spinning after a run)
            so.enable_profiling = True
            so.profile_file_prefix = str(path.with_suffix(""))
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x}
            warm = 2
            for _ in range(warm + args.runs):
                sess.run(None, feed)
            events = json.loads(Path(sess.end_profiling()).read_text())
            per_op: collections.Counter[str] = collections.Counter()
            count: collections.Counter[str] = collections.Counter()
            runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    per_op[e["args"]["op_name"]] += e["dur"]
                    count[e["args"]["op_name"]] += 1
            n = warm + args.runs
            macs = measure(model, SHAPE).macs / dense_macs
            median = statistics.median(runs[-args.runs:]) / 1e3
            print(f"== {args.arch} {args.ratio:g} {form}: MACs {macs:.2f}× dense, median {median:.1f} ms, "
                  f"node time {sum(per_op.values()) / n / 1e3:.1f} ms/run (batch {args.batch})")
            for op, us in per_op.most_common():
                print(f"   {op:24s} {us / n / 1e3:8.2f} ms  ({count[op] // n} nodes)")


if __name__ == "__main__":
    main()
