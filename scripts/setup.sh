#!/usr/bin/env bash
# Installs everything deploy-prune needs on a fresh Debian machine (run as root, or with sudo
# available): the local Fashion-MNIST files and the Python package with its dev extras.
# Safe to run again: it skips what is already there.
#
# What it downloads, the first time:
#   - dataset-fashion-mnist (Debian package, about 30 MB);
#   - torch and torchvision from PyPI: on Linux x86-64 the default torch brings NVIDIA's CUDA
#     libraries, about 4.4 GB installed in all (torch 1.2 GB + CUDA 3.2 GB on the development
#     machine), which takes a few minutes;
#   - onnxruntime, onnx, onnxscript, torch-pruning, pandas, matplotlib, scikit-learn (a few
#     hundred MB).
# A CPU-only machine can skip the 3.2 GB of CUDA libraries:
#   TORCH_CPU=1 bash scripts/setup.sh
# installs torch and torchvision from PyTorch's CPU index (https://download.pytorch.org/whl/cpu)
# before the rest. Everything runs on the CPU either way; CUDA is used only when a GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "== installing Fashion-MNIST (Debian package dataset-fashion-mnist, about 30 MB)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
if [ "${TORCH_CPU:-0}" = "1" ] && ! python3 -c "import torch" 2>/dev/null; then
  echo "== installing the CPU-only torch and torchvision (PyTorch's CPU index: no CUDA libraries)"
  python3 -m pip install --progress-bar on torch torchvision --index-url https://download.pytorch.org/whl/cpu
fi
# Always (re)install this checkout: a clone must not run another checkout's console script.
# pip skips what is already satisfied, so a repeat costs seconds.
if python3 -c "import torch" 2>/dev/null; then
  echo "== installing deploy-prune (torch is already there; the rest is a few hundred MB the first time)"
else
  echo "== installing deploy-prune and its dependencies: torch with its CUDA libraries is about 4.4 GB"
  echo "   (a few minutes; pip shows its progress below). CPU-only machine: Ctrl-C and rerun as"
  echo "   TORCH_CPU=1 bash scripts/setup.sh to install torch's CPU build without them."
fi
python3 -m pip install --progress-bar on -e ".[dev,slim]"
