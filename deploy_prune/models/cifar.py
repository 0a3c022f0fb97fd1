"""CIFAR-style VGG (with BatchNorm), ResNet-20/56 (He et al. 2016) and a small VGG for CI.

All accept any number of input channels and classes and any input side >= 8: pooling uses
``ceil_mode`` and the head pools adaptively, so 28x28 Fashion-MNIST and 32x32 CIFAR both work.
"""

from __future__ import annotations

from torch import nn

from deploy_prune.models import MODELS, ModelSpec

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
SMALL_VGG_CFG = [32, 32, "M", 64, 64, "M", 128, "M", 128]  # cheap tail, like VGG-16 conv5


class VGG(nn.Module):
    """Conv-BN-ReLU stack, adaptive pool to ``pool_size``, flatten, linear classifier."""

    def __init__(self, cfg: list, *, num_classes: int = 10, in_channels: int = 3,
                 pool_size: int = 1, hidden: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        feat = c * pool_size * pool_size
        if hidden:
            self.classifier = nn.Sequential(
                nn.Linear(feat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.classifier = nn.Linear(feat, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x))  # (B, C, p, p)
        return self.classifier(x.flatten(1))


class BasicBlock(nn.Module):
    """3x3-3x3 residual block; a 1x1 conv shortcut (option B) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: stages of 16/32/64 channels (times ``width``)."""

    def __init__(self, depth: int, *, num_classes: int = 10, in_channels: int = 3, width: int = 1) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        cin = w[0]
        stages = []
        for i, c in enumerate(w):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, c, stride=2 if (i > 0 and j == 0) else 1))
                cin = c
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _vgg(cfg, pool_size=1, hidden=None):
    def build(*, num_classes: int, in_channels: int, **kw) -> nn.Module:
        kw = {"pool_size": pool_size, "hidden": hidden, **kw}
        return VGG(kw.pop("cfg", cfg), num_classes=num_classes, in_channels=in_channels, **kw)

    return build


def _resnet(depth):
    def build(*, num_classes: int, in_channels: int, **kw) -> nn.Module:
        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, **kw)

    return build


MODELS.register("small_vgg")(ModelSpec(_vgg(SMALL_VGG_CFG, pool_size=2), input_size=28))
MODELS.register("vgg16_cifar")(ModelSpec(_vgg(VGG16_CFG, pool_size=1, hidden=512), input_size=32))
MODELS.register("resnet20")(ModelSpec(_resnet(20), input_size=32))
MODELS.register("resnet56")(ModelSpec(_resnet(56), input_size=32))
