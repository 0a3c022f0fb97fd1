#!/usr/bin/env bash
# The test command (CI runs exactly this): set up, then every test not marked slow. GPU and
# TensorRT tests skip, naming what is missing, on machines without them. Extra arguments go to
# pytest (e.g. `-m slow` for the long ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec python3 -m pytest -q "$@"
