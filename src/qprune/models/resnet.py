"""CIFAR ResNets with batch norm: the ResNet-20 family and ResNet-18, in any algebra.

The ResNet-20 family (He et al. 2016, §4.2; the lottery-ticket framework's ``cifar_resnet_20``):
a 3×3 stem, three stages of n basic blocks with 16/32/64 channels — depth 6n + 2, so
``blocks=[9, 9, 9]`` is ResNet-56 — global average pooling and the real head. ResNet-18's CIFAR
variant: a 3×3 stride-1 stem (no max-pool), four stages of two blocks, 64/128/256/512 channels.
Where a block changes the shape, its shortcut is a 1×1 conv + batch norm (He et al.'s option B).
Convs have no bias (batch norm follows each); the quaternion model has the same real widths and
quaternion batch norm.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..algebra import Algebra
from ..errors import ConfigError
from .classic import Classifier, ImageShape


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)) with 3×3 convs."""

    def __init__(self, algebra: Algebra, in_channels: int, out_channels: int, stride: int, prune_shortcut: bool):
        super().__init__()
        self.conv1 = algebra.conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = algebra.batchnorm(out_channels)
        self.conv2 = algebra.conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = algebra.batchnorm(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            projection = algebra.conv2d(in_channels, out_channels, 1, stride, bias=False)
            projection.prunable = prune_shortcut  # read by pruning.prunable_weights
            self.shortcut = nn.Sequential(projection, algebra.batchnorm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(
    algebra: Algebra, image: ImageShape, num_classes: int, widths: Sequence[int], blocks: Sequence[int],
    prune_shortcuts: bool = True,
) -> Classifier:
    """A CIFAR ResNet: stage i has ``blocks[i]`` basic blocks of ``widths[i]`` channels (stride 2 after the first)."""
    if len(widths) != len(blocks) or not widths:
        raise ConfigError(f"model.widths={list(widths)} and model.blocks={list(blocks)} need one entry per stage")
    if any(not isinstance(n, int) or n < 1 for n in blocks):
        raise ConfigError(f"model.blocks={list(blocks)}: each stage needs a positive number of blocks")
    for width in widths:
        algebra.check_width(int(width), "model.widths")
    in_channels = algebra.input_channels(image[0])
    stem = nn.Sequential(
        algebra.conv2d(in_channels, widths[0], 3, padding=1, bias=False), algebra.batchnorm(widths[0]), nn.ReLU()
    )
    layers: list[tuple[str, nn.Module]] = [("stem", stem)]
    channels = widths[0]
    for i, (width, count) in enumerate(zip(widths, blocks)):
        stage = []
        for b in range(count):
            stage.append(BasicBlock(algebra, channels, width, 2 if i > 0 and b == 0 else 1, prune_shortcuts))
            channels = width
        layers.append((f"stage{i + 1}", nn.Sequential(*stage)))
    layers.append(("pool", nn.AdaptiveAvgPool2d(1)))
    return Classifier(nn.Sequential(OrderedDict(layers)), nn.Flatten(), nn.Identity(), algebra.output(channels, num_classes))
