"""Build a small ImageFolder tree (ROOT/train/CLASS/*.png, ROOT/val/CLASS/*.png) from local data.

No downloads: the images come from the Fashion-MNIST IDX files on this machine
(/usr/share/datasets/fashion-mnist) or from scikit-learn's bundled digits. The PNGs are
grayscale at their native size (28x28, or 8x8 for digits); ImageFolder reads them as RGB and
the model's own preprocessing resizes them. Class folders are numbered (``0_tshirt``, ...) so
ImageFolder's class index equals the dataset's label, and a model trained on the tree can also be
evaluated with ``--data fashion-mnist``::

    python examples/make_imagefolder.py --source fashion-mnist --train 100 --val 40 --out data/fmnist-if
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def _fashion(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from deploy_prune.data import FASHION_FILES, _find_idx, _read_idx, find_fashion_mnist

    folder = find_fashion_mnist(None)
    if folder is None:
        raise SystemExit("Fashion-MNIST IDX files not found; use --source digits")
    x = _read_idx(_find_idx(folder, FASHION_FILES[f"{split}_images"]))  # (N, 28, 28) uint8
    y = _read_idx(_find_idx(folder, FASHION_FILES[f"{split}_labels"]))
    return x, y, FASHION_CLASSES


def _digits(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    half = np.arange(len(x)) % 5 == 0  # every fifth image is a validation image
    keep = half if split == "test" else ~half
    return x[keep], d.target[keep], tuple(f"digit{i}" for i in range(10))


def build(out: str | Path, *, source: str = "fashion-mnist", train: int = 100, val: int = 40,
          seed: int = 0) -> Path:
    """Write ``train`` and ``val`` images per class under ``out``; returns ``out``."""
    out = Path(out)
    load = _fashion if source == "fashion-mnist" else _digits
    rng = np.random.default_rng(seed)
    for split, per_class, src in (("train", train, "train"), ("val", val, "test")):
        x, y, classes = load(src)
        for c, name in enumerate(classes):
            idx = rng.permutation(np.flatnonzero(y == c))[:per_class]
            folder = out / split / f"{c}_{name}"  # sorted like the labels: ImageFolder's index == label
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(x[i], mode="L").save(folder / f"{i:05d}.png")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    p.add_argument("--train", type=int, default=100, help="training images per class")
    p.add_argument("--val", type=int, default=40, help="validation images per class")
    p.add_argument("--out", required=True, help="root of the ImageFolder tree")
    args = p.parse_args()
    root = build(args.out, source=args.source, train=args.train, val=args.val)
    n = sum(1 for _ in root.rglob("*.png"))
    print(f"{n} images -> {root}/train, {root}/val")


if __name__ == "__main__":
    main()
