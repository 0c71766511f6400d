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

step "independent finding classifier (before stage 2, whose FID curves use its features; also saliency, validity, induction effect)"
$PY experiments/train_classifier.py log_dir=$LOGS trainer.enable_progress_bar=false "$@"

step "stage 2: latent diffusion model"
$PY experiments/train.py log_dir=$LOGS model.vae.path=$LOGS/autoencoder/vae trainer.enable_progress_bar=false "$@"

step "healthy counterfactuals and attribution maps on held-out phantoms"
$PY experiments/counterfactual_attribution.py output_dir=$OUT/attribution

step "generation quality (FID / SSIM / MS-SSIM) on held-out phantoms"
$PY experiments/evaluate.py output_dir=$OUT/evaluation

step "zero-shot localized disease induction on held-out normal phantoms"
$PY experiments/zero_shot_induction.py output_dir=$OUT/induction

step "done in $(( $(date +%s) - start ))s: TensorBoard logs in $LOGS, results in $OUT"
