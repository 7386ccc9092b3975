#!/usr/bin/env bash
# Sparsity-train vgg19:width=0.25 on real Fashion-MNIST with every penalty of
# docs/results/fashion-mnist.md (12 epochs, λ = 1e-3, seed 0, the paper's protocol otherwise).
#   bash benchmarks/fashion_mnist_train.sh [RUNS_DIR] [JOBS]
# RUNS_DIR defaults to runs/fashion-mnist; JOBS parallel runs of 1 CPU thread each (default 2,
# which keeps a 2-core machine busy). A finished run is skipped; an interrupted one resumes.
# Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or --data-dir.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/fashion-mnist}
JOBS=${2:-2}
SLIM=${SLIM:-.venv/bin/slim}
PENALTIES=(tl1:a=0.5 l1 none lp:p=0.5 mcp scad tl1:a=1 lp:p=0.75 mcp:theta=0.1 scad:theta=0.1)
mkdir -p "$RUNS"

one() {
  local pen=$1 dir="$RUNS/${1//[:=,]/_}"
  if [ -f "$dir/metrics.jsonl" ] && [ "$(wc -l < "$dir/metrics.jsonl")" -ge 12 ]; then return; fi
  local start=$SECONDS
  if [ -f "$dir/last.state.safetensors" ]; then
    "$SLIM" sparsify-train --resume "$dir" --threads 1 --quiet
  else
    "$SLIM" sparsify-train --arch vgg19:width=0.25 --dataset fashion-mnist --penalty "$pen" --lam 1e-3 \
      --epochs 12 --seed 0 --device cpu --threads 1 --quiet --out "$dir"
  fi
  echo "$pen $((SECONDS - start)) s" >> "$RUNS/wall_times.txt"
}
export -f one; export RUNS SLIM
printf '%s\n' "${PENALTIES[@]}" | xargs -P "$JOBS" -I{} bash -c 'one "$@"' _ {}
