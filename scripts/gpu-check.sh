#!/usr/bin/env bash
# The first GPU run in one call (docs/bench.md, "First GPU run"). From the repository root of a
# fresh copy on the GPU machine, with .gpucheck/ (made by scripts/prepare-gpu-carry.sh) carried:
#
#   bash scripts/gpu-check.sh                 # writes at most 8 files into $OUT (or --out DIR)
#   bash scripts/gpu-check.sh --dry-run       # the same steps on a CPU machine, tiny sizes
#   bash scripts/gpu-check.sh --steps pytest  # only the named steps (comma-separated), e.g. a rerun
#
# Steps, in this order, each in its own process under `timeout`; none is started once the budget
# (--budget seconds, default 470) is spent, and a failing step never stops the next:
#   install   offline: the carried torch-pruning wheel, then `pip install --no-deps
#             --no-build-isolation -e .`; PYTHONPATH=repo root is set either way (the fallback)
#   env       GPU, driver, CUDA, clocks and throttle reasons (NVML, nvidia-smi) -> env.json
#   pair      the default pair on CUDA: eager fp32/fp16, compile (CUDA graphs), AOTInductor, batch
#             1 and 256, top-1 of each timed artifact -> pair.csv, pair.md
#   paper     ResNet-50 at 2.8x (random weights): eager fp16 channels_last and compile, batch 1
#             and 32 -> resnet50.csv, resnet50.md
#   pytest    pytest -m "gpu or trt" -> pytest.txt
#   env-after the clocks and throttle reasons again, after the load -> env.json
# Files in the output folder: summary.tsv, log.txt, env.json, pair.csv, pair.md, resnet50.csv,
# resnet50.md, pytest.txt (8). The last lines printed are the summary table: step, status, seconds.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET=470
ONLY=""
OUTDIR="${OUT:-}"
CARRY=".gpucheck"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --out) OUTDIR="$2"; shift ;;
    --carry) CARRY="$2"; shift ;;
    --steps) ONLY=",$2," ; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$OUTDIR" ] || OUTDIR="gpucheck-out"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export GPUCHECK_WORK="${GPUCHECK_WORK:-$(mktemp -d /tmp/gpucheck-work.XXXXXX)}"
SUMMARY="$OUTDIR/summary.tsv"
LOG="$OUTDIR/log.txt"
: > "$LOG"
printf 'step\tstatus\tseconds\tnote\n' > "$SUMMARY"
START=$(date +%s)
MIN_LEFT=20  # no step starts with less than this many seconds of budget left
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)

record() {  # step status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
  printf '== %s: %s (%ss) %s\n' "$1" "$2" "$3" "$4" | tee -a "$LOG"
}

# step NAME CAP_SECONDS COMMAND... : run COMMAND time-boxed to min(CAP, budget left), output to the log
step() {
  local name="$1" cap="$2"; shift 2
  local now left box t0 rc status note=""
  if [ -n "$ONLY" ] && [ "$name" != install ] && [[ "$ONLY" != *",$name,"* ]]; then
    record "$name" "skipped" 0 "not in --steps"; return
  fi
  now=$(date +%s); left=$((BUDGET - (now - START)))
  if [ "$left" -lt "$MIN_LEFT" ]; then
    record "$name" "not started" 0 "budget spent ($((now - START))s of ${BUDGET}s)"; return
  fi
  box=$(( cap < left ? cap : left ))
  echo "== $name (time box ${box}s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout -k 10 "$box" "$@" >> "$LOG" 2>&1
  rc=$?
  case "$rc" in
    0) status="ok" ;;
    124|137) status="timeout"; note="cut at ${box}s; files written before the cut are kept" ;;
    *) status="failed"; note="exit $rc; see log.txt" ;;
  esac
  record "$name" "$status" "$(( $(date +%s) - t0 ))" "$note"
}

skip() { record "$1" "skipped" 0 "$2"; }

# --- install (offline) -------------------------------------------------------------------------
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the fallback: the repo root on the path
if [ "$DRY" = 1 ]; then
  skip install "dry run: this environment is used as it is"
else
  install_offline() {
    local wheels=("$CARRY"/wheels/*.whl)
    if [ -e "${wheels[0]}" ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/gpucheck-site "${wheels[@]}" \
        || return 1
    fi
    # setuptools without bdist_wheel cannot build the editable install: PYTHONPATH covers it
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
      || echo "editable install failed: using PYTHONPATH=$PWD instead"
    "$PY" -c "import torch_pruning, deploy_prune, bench, export; print('imports ok')"
  }
  export PYTHONPATH="$PYTHONPATH:/tmp/gpucheck-site"
  [ -d "$CARRY/site" ] && export PYTHONPATH="$PYTHONPATH:$PWD/$CARRY/site"  # torch_pruning copied, no wheel
  export -f install_offline
  export CARRY PY
  step install 120 bash -c install_offline
fi

# --- the checks --------------------------------------------------------------------------------
step env 60 "$PY" scripts/gpu_check.py env --out "$OUTDIR" "${DRYFLAG[@]}"
if [ "$DRY" = 0 ] && [ ! -d "$CARRY/pair/slim" ]; then
  skip pair "no $CARRY/pair: run scripts/prepare-gpu-carry.sh here and carry $CARRY"
else
  step pair 220 "$PY" scripts/gpu_check.py pair --out "$OUTDIR" --carry "$CARRY" "${DRYFLAG[@]}"
fi
step paper 190 "$PY" scripts/gpu_check.py paper --out "$OUTDIR" "${DRYFLAG[@]}"
step pytest 150 bash -c "'$PY' -m pytest -m 'gpu or trt' -v -p no:cacheprovider -rs tests > '$OUTDIR/pytest.txt' 2>&1"
step env-after 45 "$PY" scripts/gpu_check.py env --after --out "$OUTDIR" "${DRYFLAG[@]}"
rm -rf "$GPUCHECK_WORK"

# --- summary -----------------------------------------------------------------------------------
echo
echo "gpu-check$([ "$DRY" = 1 ] && echo ' (dry run)'): $(( $(date +%s) - START ))s of a ${BUDGET}s budget; files in $OUTDIR:"
(cd "$OUTDIR" && ls)
if [ -f "$OUTDIR/pair.csv" ]; then
  "$PY" - "$OUTDIR/pair.csv" <<'EOF' || true
import sys
import pandas as pd
df = pd.read_csv(sys.argv[1])
cols = [c for c in ("check_run", "backend", "device", "precision", "batch", "variant", "status", "p50_ms",
                    "device_p50_ms", "speedup", "device_speedup", "top1") if c in df]
print(df[cols].to_string(index=False, max_colwidth=30, float_format=lambda v: f"{v:.4g}"))
for (run, backend, precision, status), g in df[df["status"] != "ok"].groupby(
        ["check_run", "backend", "precision", "status"], sort=False):
    print(f"{status}: {run} {backend} {precision}: {g['error'].iloc[0]}")
EOF
fi
echo
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
