"""The classifiers, by name: `build_model("resnet50", num_classes=230, in_channels=3)`.

    resnet50    the reference network: torchvision's ResNet-50 (v1.5), 25.6 M parameters at 1000 classes
    resnet18    torchvision's ResNet-18, 11.7 M parameters at 1000 classes
    small_cnn   the CPU default: 4 conv blocks and global pooling, about 0.45 M parameters

The ResNets are written here because torchvision is not a dependency; they match torchvision layer for
layer (same module names, parameter counts and initialization). Every model ends in global
average pooling, so any input size works (the reference feeds 128x128, small_cnn is meant for 64x64), and
all of them run in `torch.channels_last`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stemdl.harness.errors import StemdlError

# ---- ResNet (torchvision's definition) ------------------------------------------------------------------


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    """ResNet v1.5: the stride sits on the 3x3 conv, not on the first 1x1 (as in torchvision)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int,
                 in_channels: int = 3, zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_conv_bn(self)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_layer(self, block, width: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, width * block.expansion, stride),
                                       nn.BatchNorm2d(width * block.expansion))
        layers = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = width * block.expansion
        layers += [block(self.inplanes, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_conv_bn(model: nn.Module) -> None:
    """torchvision's initialization: He normal (fan_out) for convs, BatchNorm weight 1 and bias 0.
    Linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet50(num_classes: int, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, zero_init_residual)


def resnet18(num_classes: int, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, zero_init_residual)


# ---- small CNN (the CPU default) ------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Four blocks of (conv3x3-BN-ReLU) x2 + 2x2 max-pool, global average pooling, dropout, linear.

    At 64x64 the last block sees 8x8 features: a receptive field that spans the central discs and their
    spacing, which is what tells the lattices apart. No bias in the convs (BatchNorm follows)."""

    def __init__(self, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (24, 48, 96, 128),
                 dropout: float = 0.2):
        super().__init__()
        blocks, cin = [], in_channels
        for width in widths:
            blocks += [conv3x3(cin, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       conv3x3(width, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        _init_conv_bn(self)

    def forward(self, x):
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(self.dropout(x))


def small_cnn(num_classes: int, in_channels: int = 3, dropout: float = 0.2) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, dropout=dropout)


# ---- registry -------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": resnet50,
    "resnet18": resnet18,
    "small_cnn": small_cnn,
}


def build_model(name: str, num_classes: int, in_channels: int = 3, **options) -> nn.Module:
    """The model registered as `name`; `options` go to its builder (zero_init_residual, dropout)."""
    if name not in MODELS:
        raise StemdlError(f"unknown model {name!r}; choices: {', '.join(MODELS)}")
    if num_classes < 1 or in_channels < 1:
        raise StemdlError(f"model {name}: num_classes and in_channels must be >= 1, "
                          f"got {num_classes} and {in_channels}")
    return MODELS[name](num_classes, in_channels, **options)
