#!/usr/bin/env bash
# The tables and plots of docs/results/fashion-mnist.md from the runs of
# benchmarks/fashion_mnist_train.sh:
#   1. every finished run swept at 0.3 … 0.9 (step 0.1): accuracy after surgery (the paper's
#      number) and after BatchNorm recalibration on 2048 training images;
#   2. the 0.7 models fine-tuned for FT_EPOCHS epochs (default 1, no penalty).
#   bash benchmarks/fashion_mnist_results.sh [RUNS_DIR]
# Both sweeps resume: rerunning after more runs have finished computes only the new cells.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/fashion-mnist}
SLIM=${SLIM:-.venv/bin/slim}
FT_EPOCHS=${FT_EPOCHS:-1}
ckpts=()
for d in "$RUNS"/*/; do
  if [ -f "$d/metrics.jsonl" ] && [ "$(wc -l < "$d/metrics.jsonl")" -ge 12 ]; then ckpts+=("$d/best.safetensors"); fi
done
[ ${#ckpts[@]} -gt 0 ] || { echo "no finished run under $RUNS"; exit 1; }
start=$SECONDS
"$SLIM" sweep "${ckpts[@]}" --ratios 0.3:0.9:0.1 --recalibrate 2048 --device cpu --out "$RUNS/sweep"
echo "sweep: $((SECONDS - start)) s" >> "$RUNS/wall_times.txt"
start=$SECONDS
"$SLIM" sweep "${ckpts[@]}" --ratios 0.7 --recalibrate 2048 --finetune-epochs "$FT_EPOCHS" --min-channels 1 \
  --device cpu --out "$RUNS/sweep-ft"
echo "sweep-ft: $((SECONDS - start)) s" >> "$RUNS/wall_times.txt"
