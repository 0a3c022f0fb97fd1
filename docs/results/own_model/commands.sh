# The README's "Prune your own model" run, as it was made (2-core shared CPU, one thread each).
# Run from the repository root; the outputs behind docs/results/own_model/ are runs/own/.
set -ex
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python examples/make_imagefolder.py --source fashion-mnist --train 100 --val 50 --out data/fmnist-if
mkdir -p runs/own
python examples/train_own_model.py --data data/fmnist-if --arch resnet18 --size 32 --epochs 4 --out runs/own/resnet18.pth
deploy-prune import --arch tv.resnet18 --weights runs/own/resnet18.pth --data data/fmnist-if --input-size 32 --out runs/own/base
deploy-prune run configs/default.yaml --base runs/own/base --out runs/own/run
deploy-prune export runs/own/run/slim --format onnx --out runs/own/slim.onnx
deploy-prune bench --base runs/own/base --slim runs/own/run/slim --backends torch ort --device cpu --precision fp32 --batch 1 8 --accuracy --clock cpu --threads 1 --out runs/own/bench
