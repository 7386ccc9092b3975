"""Why slim's onnxruntime sessions stop their spinning workers after each run.

    .venv/bin/python benchmarks/ort_spinning.py [--arch resnet164] [--ratio 0.5] [--forms zero/8,gather/8]
        [--batches 1,32] [--threads 2] [--runs-b1 40] [--runs-b32 8]

The dense model (random BN scales, as in ``edge_latency.py``) and its pruned forms are timed three
ways, per batch size, each printed as median ms and ratio to dense:

``alone``
    one model's session at a time, default session options: what a deployment that runs one
    model sees (the reference);
``interleaved``
    all sessions alive, one run of each in turn (``slimcli.measure.interleaved_medians``), default
    options: each session's worker threads keep spinning after its run and take the cores from
    the next session's run;
``interleaved+stop``
    the same with ``session.force_spinning_stop=1`` (``slimcli.measure.ort_options``, what every
    slim session uses): workers spin only during a run.

Results and the command are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from edge_latency import SHAPE, random_gamma

from slimcli.archs import create_arch
from slimcli.export import export_onnx
from slimcli.export.forms import export_form
from slimcli.measure import interleaved_medians, onnx_latency_ms, ort_options
from slimcli.prune import compute_keep, prune_model


def session(path: Path, threads: int, stop: bool) -> ort.InferenceSession:
    opts = ort_options(ort, threads, stop_spinning=stop)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet164")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--forms", default="zero/8,gather/8")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-b1", type=int, default=40)
    ap.add_argument("--runs-b32", type=int, default=8, help="timed runs at batches > 1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dense = random_gamma(create_arch(args.arch, 10, SHAPE), args.seed)
    plan = compute_keep(dense, "ratio", args.ratio, 1, input_shape=SHAPE)
    pruned, _ = prune_model(dense, plan, input_shape=SHAPE)
    models = {"dense": dense}
    for form in args.forms.split(","):
        sel, _, pad = form.partition("/")
        models[form], _ = export_form(pruned, create_arch(args.arch, 10, SHAPE), sel, int(pad or 1), SHAPE)
    print(f"# onnxruntime {ort.__version__}, {args.threads} threads, {args.arch} pruned at {args.ratio}")
    with tempfile.TemporaryDirectory(prefix="slim-spin-") as tmp:
        paths = {}
        for i, (name, model) in enumerate(models.items()):
            paths[name] = Path(tmp) / f"{i}.onnx"
            export_onnx(model.eval(), paths[name], input_shape=SHAPE, metadata={}, latency_runs=0)
        for batch in map(int, args.batches.split(",")):
            runs = args.runs_b1 if batch == 1 else args.runs_b32
            x = np.random.default_rng(args.seed).standard_normal((batch, *SHAPE)).astype(np.float32)
            results = {}
            for how, stop in (("interleaved", False), ("interleaved+stop", True)):
                sessions = {k: session(p, args.threads, stop) for k, p in paths.items()}
                fns = {k: (lambda s=s, x=x: s.run(None, {"input": x})) for k, s in sessions.items()}
                results[how] = interleaved_medians(fns, runs, warmup=2)
                del sessions, fns
            # one session at a time, as slim export times a file alone (onnxruntime's spinning default)
            results["alone"] = {name: onnx_latency_ms(path.read_bytes(), torch.from_numpy(x), runs, warmup=2,
                                                      threads=args.threads) for name, path in paths.items()}
            for how in ("alone", "interleaved", "interleaved+stop"):
                ms = results[how]
                cells = " | ".join(f"{k} {ms[k]:.1f} ms ({ms[k] / ms['dense']:.2f}×)" for k in models)
                print(f"batch {batch:>2} {how:<17} {cells}", flush=True)


if __name__ == "__main__":
    main()
