"""Model-zoo coverage: slim's channel pruning vs Torch-Pruning on timm / pytorchcv models (issue 10).

    PYTHONPATH=/tmp/zoo-site .venv/bin/python benchmarks/zoo_coverage.py [--models a,b,…]
        [--size 64] [--ratio 0.3] [--timeout 120] [--json out.json]

Needs timm (and pytorchcv for ``pytorchcv:`` names) and ``torch-pruning==1.6.1`` importable,
e.g. installed with ``pip install --no-deps --target /tmp/zoo-site``; where torchvision does
not import, timm is imported with the test-only stand-in of plugins/slim-plugin-timm/tests.

Every model is built with ``num_classes=10`` in eval mode, its BatchNorms randomized with
:func:`slimcli.testing.randomize_batchnorms` (seed 0), and fed a ``3×size×size`` input;
``NAME@224`` gives one model its own size (pytorchcv's models end in a fixed 7×7 pooling).

* slim (float64), for ``--coupling auto`` and ``joint``: ``prunable_bns`` → ``compute_keep(…,
  "ratio", r)`` → ``prune_model``; it records the share of BNs prunable, the share of BNs that
  lost ≥ 1 channel, ``report.params_pruned_ratio``, the time of the three calls, and
  max |slim(x) − masked_dense(model, plan)(x)| / max |masked_dense(x)| on two random images.
* Torch-Pruning (float32): ``tp.pruner.MetaPruner`` with ``tp.importance.BNScaleImportance()``,
  ``pruning_ratio=r``, ``ignored_layers=[classifier]``, ``global_pruning=True`` (the equivalent
  of slim's global ratio) and ``False`` (uniform per layer); a BN counts as pruned when it lost
  ≥ 1 channel; the pruned model must still run a forward pass.

Each tool runs in its own subprocess with ``--timeout`` seconds and one thread, so a crash or a
hang is recorded as such. Prints a markdown table (and any slim failure, loudly).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = (
    "resnet18,resnet50,resnext50_32x4d,mobilenetv2_100,mobilenetv3_small_100,efficientnet_b0,"
    "mnasnet_100,regnetx_002,densenet121,ghostnet_100,rexnet_100,cspresnet50,repvgg_a0,dla34,"
    "pytorchcv:shufflenetv2_wd2@224"
)
EXACT = 1e-9  # relative output difference allowed in float64
RESULT = "RESULT "


# ----------------------------------------------------------------------------------------------
# worker side (one subprocess per model and tool)


def _build(name: str) -> Any:
    """A fresh zoo model with 10 classes in eval mode, and its final classifier."""
    if name.startswith("pytorchcv:"):
        import importlib

        arch = name.split(":", 1)[1]
        family = arch.split("_")[0]  # pytorchcv.models.shufflenetv2.shufflenetv2_wd2
        model = getattr(importlib.import_module(f"pytorchcv.models.{family}"), arch)(num_classes=10)
        return model.eval(), model.output
    sys.path.insert(0, str(ROOT / "plugins" / "slim-plugin-timm" / "tests"))
    from torchvision_standin import standin_torchvision

    with standin_torchvision():
        import timm
    model = timm.create_model(name.removeprefix("timm:"), pretrained=False, num_classes=10)
    return model.eval(), model.get_classifier()


def _slim(name: str, shape: tuple[int, int, int], ratio: float, coupling: str) -> dict[str, Any]:
    import torch

    from slimcli.prune import compute_keep, masked_dense, prunable_bns, prune_model
    from slimcli.testing import randomize_batchnorms

    model, _ = _build(name)
    model = randomize_batchnorms(model.double(), seed=0)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t0 = time.perf_counter()
    bns = prunable_bns(model, shape, coupling=coupling)
    plan = compute_keep(model, "ratio", ratio, input_shape=shape, bns=bns, coupling=coupling)
    slim, report = prune_model(model, plan, input_shape=shape)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = slim(x)
        want = masked_dense(model, plan)(x)
    rel = float((out - want).abs().max() / want.abs().max().clamp_min(1e-300))
    # node names ('view_8') and numbers out of the reasons, so that the same cause counts once
    reasons = Counter(re.sub(r"'[^']*'|\d+", "…", b.reason or "?")[:100]
                      for b in bns.values() if not b.prunable)
    return {
        "bns": len(bns),
        "prunable": sum(b.prunable for b in bns.values()),
        "cut": sum(r.kept < r.channels for r in report.layers),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_removed": report.params_pruned_ratio,
        "rel_err": rel,
        "shape_ok": tuple(out.shape) == tuple(want.shape),
        "seconds": seconds,
        "reasons": reasons.most_common(3),
    }


def _tp(name: str, shape: tuple[int, int, int], ratio: float, mode: str) -> dict[str, Any]:
    import torch
    import torch_pruning as tp

    from slimcli.testing import randomize_batchnorms

    model, classifier = _build(name)
    model = randomize_batchnorms(model.float(), seed=0)
    bn_type = torch.nn.modules.batchnorm._BatchNorm
    before = {n: m.num_features for n, m in model.named_modules() if isinstance(m, bn_type)}
    params_before = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.BNScaleImportance(),
                                  pruning_ratio=ratio, global_pruning=mode == "global",
                                  ignored_layers=[classifier])
    pruner.step()
    seconds = time.perf_counter() - t0
    after = {n: m.num_features for n, m in model.named_modules() if isinstance(m, bn_type)}
    params_after = sum(p.numel() for p in model.parameters())
    try:
        with torch.no_grad():
            forward = tuple(model(x).shape) == (1, 10)
    except Exception as exc:  # a pruned model that no longer runs is a result, not a crash of this script
        forward = f"{type(exc).__name__}: {str(exc)[:120]}"
    return {
        "bns": len(before),
        "cut": sum(after.get(n, 0) < c for n, c in before.items()),
        "params_before": params_before,
        "params_after": params_after,
        "params_removed": 1 - params_after / params_before,
        "forward": forward,
        "seconds": seconds,
    }


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    shape = (3, args.size, args.size)
    tool, name = args.worker
    name, _, size = name.partition("@")
    shape = (3, int(size), int(size)) if size else shape
    if tool == "slim":
        out: dict[str, Any] = {}
        for coupling in ("auto", "joint"):
            try:
                out[coupling] = _slim(name, shape, args.ratio, coupling)
            except Exception as exc:
                out[coupling] = {"error": f"{type(exc).__name__}: {exc}"[:600],
                                 "traceback": traceback.format_exc(limit=-6)[-2500:]}
    else:
        out = _tp(name, shape, args.ratio, tool.split("-", 1)[1])
    print(RESULT + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------
# driver side


def _run(tool: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", tool, name, "--size", str(args.size),
           "--ratio", str(args.ratio)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "hang", "error": f"no result after {args.timeout:g} s (killed)"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"status": "crash", "error": tail[:300], "stderr": proc.stderr[-3000:], "wall": wall}
    return {"status": "ok", "wall": wall, **json.loads(lines[-1][len(RESULT):])}


def _pct(v: float) -> str:
    return f"{100 * v:.0f} %"


def _slim_cell(r: dict[str, Any]) -> str:
    if "error" in r:
        return "**FAILED**"
    exact = "exact" if r["rel_err"] <= EXACT and r["shape_ok"] else f"**err {r['rel_err']:.1e}**"
    return (f"{_pct(r['prunable'] / max(r['bns'], 1))} / {_pct(r['cut'] / max(r['bns'], 1))} / "
            f"{100 * r['params_removed']:.1f} % / {exact} / {r['seconds']:.1f} s")


def _tp_cell(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"**{r['status']}**"
    broken = "" if r["forward"] is True else " (forward fails)"
    return (f"{_pct(r['cut'] / max(r['bns'], 1))} / {100 * r['params_removed']:.1f} % / "
            f"{r['seconds']:.1f} s{broken}")


def _goal(s: dict[str, Any], t: dict[str, Any]) -> str:
    """slim auto vs one Torch-Pruning run: share of BNs (slim prunable vs TP cut) and params removed."""
    if "error" in s or s.get("rel_err", 1) > EXACT:
        return "no (slim failed)"
    if t["status"] != "ok" or t["forward"] is not True:
        return f"yes (TP {t['status'] if t['status'] != 'ok' else 'broken'})"
    bn = s["prunable"] / s["bns"] >= t["cut"] / t["bns"]
    par = s["params_removed"] >= t["params_removed"] - 1e-9
    missed = [what for what, ok in (("BNs", bn), ("params", par)) if not ok]
    return "no (" + ", ".join(missed) + ")" if missed else "yes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm names or pytorchcv:NAME")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model and tool")
    ap.add_argument("--json", type=Path, help="also write every result here")
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        row = results[name] = {t: _run(t, name, args) for t in ("slim", "tp-global", "tp-uniform")}
        slim = row["slim"]
        if slim["status"] != "ok":
            slim.update({c: {"error": f"{slim['status']}: {slim['error']}"} for c in ("auto", "joint")})
        for c in ("auto", "joint"):
            r = slim[c]
            if "error" in r:
                failures.append(f"SLIM FAILURE {name} --coupling {c}: {r['error']}\n{r.get('traceback', '')}")
            elif r["rel_err"] > EXACT or not r["shape_ok"]:
                failures.append(f"SLIM NOT EXACT {name} --coupling {c}: "
                                f"relative difference {r['rel_err']:.3g}")
        print(f"# {name}: slim {slim['status']}, TP global {row['tp-global']['status']}, "
              f"TP uniform {row['tp-uniform']['status']}", file=sys.stderr, flush=True)
    print(f"Ratio {args.ratio:g}, input 3×{args.size}×{args.size} (unless NAME@SIZE), num_classes=10, "
          "random BN γ/β/stats (seed 0).\n")
    print("slim cells: BNs prunable / BNs that lost ≥ 1 channel / params removed / slim == masked dense / "
          "time; TP cells: BNs that lost ≥ 1 channel / params removed / time.\n")
    print("| model | BNs | params | slim auto | slim joint | TP global | TP uniform | auto ≥ TP global | "
          "auto ≥ TP uniform |")
    print("|---|--:|--:|---|---|---|---|---|---|")
    for name, row in results.items():
        s = row["slim"]["auto"]
        base = s if "error" not in s else row["tp-global"] if row["tp-global"]["status"] == "ok" else {}
        bns, params = base.get("bns", "?"), base.get("params_before")
        print(f"| {name} | {bns} | {f'{params / 1e6:.2f} M' if params else '?'} | {_slim_cell(s)} | "
              f"{_slim_cell(row['slim']['joint'])} | {_tp_cell(row['tp-global'])} | "
              f"{_tp_cell(row['tp-uniform'])} | "
              f"{_goal(s, row['tp-global'])} | {_goal(s, row['tp-uniform'])} |")
    print("\nWhy slim (auto) leaves BNs unpruned (top reasons per model):\n")
    for name, row in results.items():
        s = row["slim"]["auto"]
        if "error" not in s and s["reasons"]:
            print(f"- {name}: " + "; ".join(f"{n}× {why}" for why, n in s["reasons"]))
    for name, row in results.items():
        for t in ("tp-global", "tp-uniform"):
            r = row[t]
            if r["status"] != "ok" or r["forward"] is not True:
                print(f"- TP {t[3:]} on {name}: {r['status']}: {r.get('error') or r.get('forward')}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for f in failures:
        print("\n" + "!" * 80 + "\n" + f, file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
