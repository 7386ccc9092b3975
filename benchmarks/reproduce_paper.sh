#!/usr/bin/env bash
# The paper's full CIFAR protocol on a GPU (docs/reproducing-the-paper.md has the published
# numbers next to the command that should reproduce each):
#   sparsity training 160 epochs (SGD lr 0.1 ÷10 at 80/120, momentum 0.9 Nesterov, wd 1e-4,
#   batch 64, γ init 0.5; slim's defaults) with every penalty, then a ratio sweep of every
#   checkpoint, then fine-tuning (160 epochs, no penalty) at the ratios of the paper's tables.
#
#   bash benchmarks/reproduce_paper.sh [RUNS_DIR]
# Environment: MODELS ("vgg19 densenet40 resnet164"), DATASETS ("cifar10 cifar100"),
# PENALTIES (the paper's, plus the authors' mcp:a=1 and scad), SEEDS ("0"; the paper
# averages five: "0 1 2 3 4"), DEVICE (cuda), DATA_DIR (where CIFAR is,
# or it is downloaded), SLIM (.venv/bin/slim), EPOCHS (160; lower it for a smoke test).
# Every step is skipped when its output exists and resumes when it was interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/paper}
MODELS=${MODELS:-vgg19 densenet40 resnet164}
DATASETS=${DATASETS:-cifar10 cifar100}
SEEDS=${SEEDS:-0}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-160}
SLIM=${SLIM:-.venv/bin/slim}
DATA=(); [ -n "${DATA_DIR:-}" ] && DATA=(--data-dir "$DATA_DIR")
read -r -a PENALTIES <<< "${PENALTIES:-none l1 lp:p=0.75 lp:p=0.5 lp:p=0.25 tl1:a=1 tl1:a=0.5 mcp:a=1 scad}"

lam_of() { case $1 in vgg19) echo 1e-4 ;; *) echo 1e-5 ;; esac; }  # paper §4 / Liu et al.
# the ratios of the paper's fine-tuning tables (Tables 4 and 5; ResNet-164: Liu et al. Table 1)
ft_ratios() {
  case "$1/$2" in
    vgg19/cifar10) echo 0.7 0.75 ;; vgg19/cifar100) echo 0.55 0.6 ;;
    densenet40/cifar10) echo 0.825 0.9 ;; densenet40/cifar100) echo 0.75 0.85 ;;
    resnet164/*) echo 0.4 0.6 ;;
  esac
}
slug() { echo "${1//[:=,]/_}"; }

for model in $MODELS; do
  for ds in $DATASETS; do
    for seed in $SEEDS; do
      ckpts=()
      for pen in "${PENALTIES[@]}"; do
        run="$RUNS/$model-$ds/$(slug "$pen")-s$seed"
        if [ -f "$run/last.state.safetensors" ] && [ ! -f "$run/.done" ]; then
          "$SLIM" sparsify-train --resume "$run" --device "$DEVICE" "${DATA[@]}"
        elif [ ! -f "$run/.done" ]; then
          "$SLIM" sparsify-train --arch "$model" --dataset "$ds" --penalty "$pen" --lam "$(lam_of "$model")" \
            --epochs "$EPOCHS" --seed "$seed" --device "$DEVICE" --out "$run" "${DATA[@]}"
        fi
        touch "$run/.done"
        ckpts+=("$run/best.safetensors")
      done
      # Figure 3 / Table 2: accuracy and params pruned at every ratio, as published (no
      # recalibration) and with slim's default BatchNorm recalibration
      "$SLIM" sweep "${ckpts[@]}" --ratios 0.05:0.95:0.05 --recalibrate 0 --device "$DEVICE" \
        --out "$RUNS/$model-$ds/sweep-s$seed" "${DATA[@]}"
      "$SLIM" sweep "${ckpts[@]}" --ratios 0.05:0.95:0.05 --device "$DEVICE" \
        --out "$RUNS/$model-$ds/sweep-recal-s$seed" "${DATA[@]}"
      # Tables 4/5: fine-tune at the paper's ratios (a ratio that empties a layer fails and is skipped)
      for pen in "${PENALTIES[@]}"; do
        run="$RUNS/$model-$ds/$(slug "$pen")-s$seed"
        for ratio in $(ft_ratios "$model" "$ds"); do
          pruned="$run/pruned-$ratio.safetensors"; ft="$run/ft-$ratio"
          if [ ! -f "$pruned" ]; then
            "$SLIM" prune "$run/best.safetensors" --ratio "$ratio" --min-channels 0 --recalibrate 0 --eval \
              --device "$DEVICE" --out "$pruned" "${DATA[@]}" || { echo "skip $run at $ratio"; continue; }
          fi
          if [ -f "$ft/last.state.safetensors" ] && [ ! -f "$ft/.done" ]; then
            "$SLIM" finetune --resume "$ft" --device "$DEVICE" "${DATA[@]}"
          elif [ ! -f "$ft/.done" ]; then
            "$SLIM" finetune "$pruned" --epochs "$EPOCHS" --seed "$seed" --device "$DEVICE" --out "$ft" "${DATA[@]}"
          fi
          touch "$ft/.done"
        done
      done
    done
  done
done
echo "done: sweeps in $RUNS/*/sweep*-s*/sweep.md, fine-tuned runs in $RUNS/*/*/ft-*/"
