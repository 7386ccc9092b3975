"""Markdown tables for docs/results/fashion-mnist.md from the sweeps of fashion_mnist_results.sh.

    .venv/bin/python benchmarks/fashion_mnist_report.py RUNS_DIR > tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(v: object) -> str:
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "N/A"


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fashion-mnist")
    sweep = json.loads((runs / "sweep" / "sweep.json").read_text())
    ft_path = runs / "sweep-ft" / "sweep.json"
    ft = json.loads(ft_path.read_text()) if ft_path.exists() else {"cells": []}
    labels = [c["label"] for c in sweep["checkpoints"]]
    dense = {c["label"]: c["accuracy"] for c in sweep["checkpoints"]}
    cells = {(c["label"], c["ratio"]): c for c in sweep["cells"]}
    ratios = sweep["ratios"]

    print("### Dense accuracy and what each ratio prunes\n")
    print("| penalty | dense acc. | " + " | ".join(f"params pruned @ {r:.2f}" for r in ratios[::2]) + " |")
    print("|---|---:|" + "---:|" * len(ratios[::2]))
    for label in labels:
        row = [pct(cells.get((label, r), {}).get("params_pruned")) for r in ratios[::2]]
        print(f"| `{label}` | {pct(dense[label])} | " + " | ".join(row) + " |")
    for key, title in (("acc_surgery", "Test accuracy right after surgery (no recalibration, as the paper)"),
                       ("acc_recalibrated", "Test accuracy after BatchNorm recalibration (2048 images)")):
        print(f"\n### {title}\n")
        print("| ratio | " + " | ".join(f"`{lb}`" for lb in labels) + " |")
        print("|---:|" + "---:|" * len(labels))
        for r in ratios:
            print(f"| {r:.2f} | " + " | ".join(pct(cells.get((lb, r), {}).get(key)) for lb in labels) + " |")
    if ft["cells"]:
        print("\n### Ratio 0.70, then fine-tuned (no penalty)\n")
        print("| penalty | dense | params pruned | after surgery | after recalibration | fine-tuned |")
        print("|---|---:|---:|---:|---:|---:|")
        for c in ft["cells"]:
            print(f"| `{c['label']}` | {pct(dense.get(c['label']))} | {pct(c['params_pruned'])} | "
                  f"{pct(c['acc_surgery'])} | {pct(c['acc_recalibrated'])} | {pct(c['acc_finetuned'])} |")


if __name__ == "__main__":
    main()
