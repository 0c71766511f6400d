#!/usr/bin/env bash
# `make demo`: the main job end to end on the synthetic phantoms, on the CPU, from nothing.
# Trains both stages into logs/demo/ (TensorBoard: `make tensorboard`), then writes results under outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOGS=logs/demo
OUT=outputs/demo
rm -rf "$LOGS" "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "stage 1: autoencoder"
$PY experiments/train_autoencoder.py log_dir=$LOGS trainer.enable_progress_bar=false "$@"

step "stage 2: latent diffusion model"
$PY experiments/train.py log_dir=$LOGS model.vae.path=$LOGS/autoencoder/vae trainer.enable_progress_bar=false "$@"

step "done in $(( $(date +%s) - start ))s: TensorBoard logs in $LOGS, results in $OUT"
