#!/usr/bin/env bash
# `make demo-freetext`, after `make demo`: does training on free-text reports work? The demo's phantoms are written as
# a MIMIC-CXR-JPG tree with generated free-text reports; stage 2 is trained on it through data=mimic_cxr with the
# demo's autoencoder and run length; its counterfactuals are scored on the same held-out test phantoms as the
# template-prompt model's, and induction is driven by free-text sentences. Summary: outputs/demo/freetext/report.md.
set -euo pipefail
source "$(dirname "$0")/demo_env.sh"  # cd to the repository; PY, LOGS, the pinned CPU kernels and threads
OUT=outputs/demo/freetext
TREE=data/phantoms_mimic
TOKENS=32  # the CPU model's prompt encoder length (model.prompt_encoder.max_length)
# the comparison is with the demo's own runs, at the demo's settings: nothing on the command line changes one side
[ $# -eq 0 ] || { echo "demo-freetext: takes no arguments (it repeats make demo's settings)" >&2; exit 1; }
for needed in "$LOGS/ldm/checkpoints/last.ckpt" "$LOGS/autoencoder/vae" "$LOGS/classifier/checkpoints/last.ckpt" \
  outputs/demo/attribution/metrics.json outputs/demo/induction/{nodule,ground_glass,consolidation,effusion}/metrics.json; do
  [ -e "$needed" ] || { echo "demo-freetext: $needed is missing: run \`make demo\` first (the template-prompt model)" >&2; exit 1; }
done
rm -rf "$TREE" "$OUT" "$LOGS/ldm_freetext"
mkdir -p "$OUT"
start=$(date +%s)
echo "== writing the phantoms as a MIMIC-CXR-JPG tree with free-text reports: $TREE"
$PY -m datamodules.mimic_phantoms --out "$TREE"

echo "== [$(( $(date +%s) - start ))s] stage 2 on the free-text reports (data=mimic_cxr)"
$PY experiments/train.py data=mimic_cxr data.root=$TREE data.image_size=64 data.resize=stretch data.num_workers=0 \
  data.max_prompt_tokens=$TOKENS log_dir=$LOGS run_name=ldm_freetext model.vae.path=$LOGS/autoencoder/vae \
  trainer.enable_progress_bar=false

CKPT=$LOGS/ldm_freetext/checkpoints/last.ckpt
echo "== [$(( $(date +%s) - start ))s] attribution on the held-out test phantoms"
$PY experiments/counterfactual_attribution.py checkpoint=$CKPT 'methods=[sdedit,inversion,refined]' progress=false \
  output_dir=$OUT/attribution

echo "== [$(( $(date +%s) - start ))s] induction from free-text sentences"
while IFS='|' read -r finding zone sentence; do
  $PY experiments/zero_shot_induction.py checkpoint=$CKPT finding=$finding zone=$zone "prompt=$sentence" \
    output_dir=$OUT/induction/$finding < /dev/null
done <<'SENTENCES'
nodule|left-lower|Small round nodule in the left lower lung.
ground_glass|right-middle|Faint ground-glass haziness in the right mid lung, no effusion.
consolidation|right-lower|Airspace consolidation at the right lung base, compatible with pneumonia.
effusion|left-lower|Small left pleural effusion blunting the costophrenic angle.
SENTENCES

$PY experiments/freetext_report.py outputs/demo --tree "$TREE" --max-prompt-tokens $TOKENS > /dev/null
grep -h "^\*\*Every method" "$OUT/report.md"
echo "== done in $(( $(date +%s) - start ))s: $OUT/report.md"
