"""Stand-in for "the model you already have": fine-tune-style training of a torchvision
classifier on an ImageFolder tree with your own transforms, saved as a plain state_dict.

It prints the top-1 of its own evaluation loop (its own eval transform, the val/ images), which
``deploy-prune import`` must reproduce::

    python examples/train_own_model.py --data data/fmnist-if --arch resnet18 --size 32 --epochs 4 \\
        --out runs/own/resnet18.pth
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def transforms(size: int) -> tuple[T.Compose, T.Compose]:
    """The user's own recipe: torchvision's ImageNet one scaled to ``size`` (resize 256 -> crop 224)."""
    resize = round(size * 256 / 224)
    norm = T.Normalize(MEAN, STD)
    train = T.Compose([T.Resize(resize), T.RandomCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    evaluate = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), norm])
    return train, evaluate


@torch.no_grad()
def own_top1(model: nn.Module, root: str, size: int) -> float:
    """Top-1 (%) on ROOT/val with the user's own eval transform and loop."""
    val = ImageFolder(f"{root}/val", transform=transforms(size)[1])
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(val, batch_size=100))
    return 100.0 * correct / len(val)


def train(root: str, *, arch: str = "resnet18", size: int = 32, epochs: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    ds = ImageFolder(f"{root}/train", transform=transforms(size)[0])
    model = torchvision.models.get_model(arch, weights=None, num_classes=len(ds.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=max(1, epochs * len(loader)))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--arch", default="resnet18", help="torchvision model name")
    p.add_argument("--size", type=int, default=32, help="input side (crop); resize is size*256/224")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", required=True, help="state_dict file to write (.pth)")
    args = p.parse_args()
    model = train(args.data, arch=args.arch, size=args.size, epochs=args.epochs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # runs/own/ on a fresh checkout
    torch.save(model.state_dict(), args.out)
    print(f"{args.arch}: own eval loop top-1 {own_top1(model, args.data, args.size):.2f}% -> {args.out}")


if __name__ == "__main__":
    main()
