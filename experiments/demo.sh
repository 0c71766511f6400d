#!/usr/bin/env bash
# `make demo`: the main job end to end on the synthetic phantoms, on the CPU, from nothing.
# Trains both stages into $LOGS (logs/demo/; TensorBoard: `make tensorboard`), then writes results under $OUT
# (outputs/demo/). Arguments are config overrides for every step (demo_heldout.sh: data.family=heldout).
set -euo pipefail
source "$(dirname "$0")/demo_env.sh"  # cd to the repository; PY, LOGS, the pinned CPU kernels and threads
OUT=${OUT:-outputs/demo}
rm -rf "$LOGS" "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
last=$start
current=""
# each step's wall time goes to $OUT/timings.tsv, which experiments/demo_report.py turns into the report's first table
step() {
  local now; now=$(date +%s)
  [ -n "$current" ] && printf '%s\t%s\n' "$current" "$(( now - last ))" >> "$OUT/timings.tsv"
  current="$1"; last=$now
  echo; echo "== [$(( now - start ))s] $*"
}

# this machine's speed in the demo's own unit (stage 2's UNet step), so the report's minutes compare across machines
step "machine reference"
$PY experiments/benchmark.py --reference output_dir=$OUT/reference "$@" > /dev/null

step "stage 1: autoencoder"
$PY experiments/train_autoencoder.py log_dir=$LOGS trainer.enable_progress_bar=false "$@"
mkdir -p "$OUT/autoencoder" && cp "$LOGS"/autoencoder/round_trip.{json,md} "$OUT/autoencoder/"

# the independent classifier comes before stage 2, whose fid_domain curves use its features (and scores the rest)
step "finding classifier"
$PY experiments/train_classifier.py log_dir=$LOGS trainer.enable_progress_bar=false "$@"

step "stage 2: latent diffusion"
$PY experiments/train.py log_dir=$LOGS model.vae.path=$LOGS/autoencoder/vae trainer.enable_progress_bar=false "$@"

step "attribution (held-out phantoms)"
# the scoring steps read the checkpoints trained above, on the same data
RUN_ARGS=(checkpoint=$LOGS/ldm/checkpoints/last.ckpt classifier_checkpoint=$LOGS/classifier/checkpoints/last.ckpt "$@")
$PY experiments/counterfactual_attribution.py output_dir=$OUT/attribution "${RUN_ARGS[@]}"

step "evaluation: FID / SSIM / MS-SSIM, prompt fidelity"
$PY experiments/evaluate.py output_dir=$OUT/evaluation "${RUN_ARGS[@]}"

step "zero-shot induction (4 findings)"
for spec in nodule:left-lower ground_glass:right-middle consolidation:right-lower effusion:left-lower; do
  $PY experiments/zero_shot_induction.py finding=${spec%%:*} zone=${spec##*:} output_dir=$OUT/induction/${spec%%:*} "${RUN_ARGS[@]}"
done

step "report"
$PY experiments/demo_report.py "$OUT" --target "${TARGET:-demo}" ${RESULTS:+--results "$RESULTS"} > /dev/null
step "done in $(( $(date +%s) - start ))s: TensorBoard logs in $LOGS, results in $OUT (summary: $OUT/report.md = ${RESULTS:-docs/results.md})"
