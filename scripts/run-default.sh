#!/usr/bin/env bash
# The main job on the local Fashion-MNIST default: set up, then train -> score -> prune (3x fewer
# FLOPs) -> one-step KL recovery -> fine-tune -> report. Extra arguments go to `deploy-prune run`
# (e.g. `--resume`, or overrides such as train.epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT="${OUT:-runs/default}"
exec deploy-prune run configs/default.yaml --out "$OUT" "$@"
