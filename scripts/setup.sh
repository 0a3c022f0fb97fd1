#!/usr/bin/env bash
# Installs everything deploy-prune needs on a fresh Debian machine (run as root, or with sudo
# available): the local Fashion-MNIST files and the Python package with its dev extras.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "== installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
# Always (re)install this checkout: a clone must not run another checkout's console script.
# pip skips what is already satisfied, so a repeat costs seconds.
echo "== installing deploy-prune and its dependencies (torch, torchvision, onnxruntime, ...)"
python3 -m pip install -q -e ".[dev,slim]"
