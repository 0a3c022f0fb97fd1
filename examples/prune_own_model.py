"""Prune your own model from Python: a classifier class deploy-prune has never seen.

Trains a small CNN of its own on scikit-learn's digits (local, no download), then
prune -> recover -> save -> load with the ``deploy_prune`` API, printing top-1 at each step::

    python examples/prune_own_model.py            # about a minute on one CPU core
    python examples/prune_own_model.py --quick    # a few seconds (what the test runs)
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deploy_prune


class DigitsNet(nn.Module):
    """Any nn.Module classifier works; this one is not registered with deploy-prune."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 10)
        return self.head(self.body(x))


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    te, tr = perm[:360], perm[360:]
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x[te], y[te]), batch_size=256)
    return train, test


def train(model: nn.Module, loader: DataLoader, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets (for the test)")
    p.add_argument("--out", help="where to save the slim model (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    epochs, score_epochs, rec_epochs = (2, 0.3, 0.5) if args.quick else (15, 2, 5)

    train_loader, test_loader = digits_loaders()
    model = DigitsNet()
    train(model, train_loader, epochs)
    base_top1 = deploy_prune.evaluate(model, test_loader)["top1"]

    example = torch.zeros(1, 1, 8, 8)
    slim, plan = deploy_prune.prune(model, example, loader=train_loader, target_flops=2.0,
                                    config={"scoring": {"epochs": score_epochs, "lr": 0.01, "l1_lambda": 0.001}})
    pruned_top1 = deploy_prune.evaluate(slim, test_loader)["top1"]
    deploy_prune.recover(slim, model, train_loader, plan=plan, epochs=rec_epochs, finetune_epochs=1,
                         finetune_lr=1e-4)
    recovered_top1 = deploy_prune.evaluate(slim, test_loader)["top1"]

    with tempfile.TemporaryDirectory() as tmp:
        path = deploy_prune.save(slim, plan, args.out or f"{tmp}/slim", force=True)
        again, _ = deploy_prune.load(path, model=DigitsNet())  # your constructor rebuilds it
        same = torch.equal(again(example + 0.5), slim(example + 0.5))

    info = plan.info
    print(f"DigitsNet: {info['base_flops'] / 1e6:.3f} -> {info['flops'] / 1e6:.3f} MFLOPs "
          f"({info['flops_reduction']:.2f}x fewer), crucial nodes {info['crucial_nodes']}")
    print(f"top-1: base {base_top1:.2f}% | pruned {pruned_top1:.2f}% | recovered {recovered_top1:.2f}%")
    print(f"saved and reloaded with DigitsNet(): outputs identical: {same}")
    return {"base": base_top1, "pruned": pruned_top1, "recovered": recovered_top1,
            "flops_reduction": info["flops_reduction"], "reloaded_identical": float(same)}


if __name__ == "__main__":
    main()
