#!/usr/bin/env bash
# `make demo-heldout`: the whole demo, with its defaults unchanged, on the "heldout" phantom family
# (datamodules/phantoms_heldout.py: other anatomy, films and lesion shapes, never used to choose a setting).
# Trains into logs/heldout/, writes outputs/heldout/ and docs/heldout.md; compare with docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
LOGS=logs/heldout OUT=outputs/heldout RESULTS=docs/heldout.md TARGET=demo-heldout \
  bash experiments/demo.sh data.family=heldout "$@"
