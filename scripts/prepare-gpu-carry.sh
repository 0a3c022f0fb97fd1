#!/usr/bin/env bash
# Here, before a GPU call: make .gpucheck/ (git-ignored), the folder scripts/gpu-check.sh needs on a
# GPU machine that reaches no network (docs/bench.md, "First GPU run"). It holds:
#   wheels/        the torch-pruning wheel (pure Python, py3-none-any), fetched with pip download;
#                  without a network, site/ gets a copy of the installed package instead
#   fashion-mnist/ the Fashion-MNIST test split as is, and the first 2,000 training images (the
#                  loader wants all four IDX files; the check reads the test split only)
#   pair/base, pair/slim  a small default pair: configs/default.yaml cut short (1 epoch on 6,000
#                  images, short scoring and recovery), trained here under a time box
# Usage: bash scripts/prepare-gpu-carry.sh [--from RUN_DIR] [--minutes N]
#   --from RUN_DIR  take base/ and slim/ of a finished `deploy-prune run` instead of training
#   --minutes N     time box of the training (default 15)
# Prints the folder's size: it must stay well under the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
CARRY=.gpucheck
FROM=""
MINUTES=15
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM="$2"; shift ;;
    --minutes) MINUTES="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "prepare-gpu-carry.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"
git check-ignore -q "$CARRY" || { echo "$CARRY is not git-ignored: add /$CARRY/ to .gitignore" >&2; exit 1; }

# 1. torch-pruning for Python 3.12 (pure Python: one wheel fits every platform)
TP_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch-pruning"))')"
rm -f "$CARRY"/wheels/*.whl
if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
     --platform manylinux_2_17_x86_64 --platform any -d "$CARRY/wheels" "torch-pruning==$TP_VERSION"; then
  echo "wheel: $(ls "$CARRY"/wheels)"
else
  echo "pip download failed (no network?): copying the installed torch_pruning $TP_VERSION to $CARRY/site"
  mkdir -p "$CARRY/site"
  src="$("$PY" -c 'import os, torch_pruning; print(os.path.dirname(torch_pruning.__file__))')"
  rm -rf "$CARRY/site/torch_pruning"
  cp -r "$src" "$CARRY/site/torch_pruning"
  find "$CARRY/site" -name __pycache__ -prune -exec rm -rf {} +
fi

# 2. Fashion-MNIST: the test split whole, the training split cut to its first 2,000 images
"$PY" - "$CARRY/fashion-mnist" <<'EOF'
import gzip, shutil, struct, sys
from pathlib import Path
from deploy_prune.data import FASHION_FILES, _find_idx, find_fashion_mnist

out, keep = Path(sys.argv[1]), 2000
src = find_fashion_mnist(None)
if src is None:
    sys.exit("Fashion-MNIST not found here (apt-get install -y dataset-fashion-mnist)")
for key, stem in FASHION_FILES.items():
    path = _find_idx(src, stem)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if key.startswith("train"):
        ndim = data[3]
        dims = list(struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim]))
        item = 1
        for d in dims[1:]:
            item *= d
        dims[0] = min(dims[0], keep)
        data = data[:4] + struct.pack(f">{ndim}I", *dims) + data[4 + 4 * ndim:4 + 4 * ndim + dims[0] * item]
    with gzip.open(out / f"{stem}.gz", "wb") as g:
        g.write(data)
print(f"fashion-mnist: test split whole, {keep} training images -> {out}")
EOF

# 3. the default pair (model directories only: weights and plan)
if [ -z "$FROM" ]; then
  FROM="runs/gpucheck-pair"
  echo "training the small default pair into $FROM (time box ${MINUTES} min) ..."
  timeout "${MINUTES}m" "$PY" -m deploy_prune.cli run configs/default.yaml --out "$FROM" --force \
    train.epochs=1 data.max_train_samples=6000 scoring.epochs=0.2 recovery.epochs=1 finetune.epochs=0
fi
for v in base slim; do
  [ -f "$FROM/$v/plan.json" ] || { echo "$FROM/$v/plan.json missing: not a finished run" >&2; exit 1; }
  rm -rf "$CARRY/pair/$v"
  mkdir -p "$CARRY/pair/$v"
  cp "$FROM/$v/plan.json" "$FROM/$v/model.safetensors" "$CARRY/pair/$v/"
done
[ -f "$FROM/report.md" ] && cp "$FROM/report.md" "$CARRY/pair/report.md"

size_kib=$(du -sk "$CARRY" | cut -f1)
echo "$CARRY: $((size_kib / 1024)) MiB ($(find "$CARRY" -type f | wc -l) files)"
[ "$size_kib" -lt $((48 * 1024)) ] || { echo "$CARRY is over 48 MiB: too close to the 64 MiB carry limit" >&2; exit 1; }
echo "next: the device call with carry [\"$CARRY\"] and the command: bash scripts/gpu-check.sh"
