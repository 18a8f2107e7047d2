"""The original study's models: LeNet-300-100 and the lottery-ticket Conv-2/4/6 (no batch norm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..algebra import Algebra

ImageShape = tuple[int, int, int]  # channels, height, width of the dataset's images


class Classifier(nn.Module):
    """Features, flatten, hidden fully connected layers and the real ``output`` head.

    Every model is one, so that pruning finds the head as ``model.output`` (layer type ``output``).
    """

    def __init__(self, features: nn.Module, flatten: nn.Module, hidden: nn.Module, output: nn.Linear):
        super().__init__()
        self.features, self.flatten, self.hidden, self.output = features, flatten, hidden, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(self.flatten(self.features(x))))


def _mlp(algebra: Algebra, in_features: int, widths: Sequence[int]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for width in widths:
        algebra.check_width(width, "model.hidden")
        layers += [algebra.linear(in_features, width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers), in_features


def lenet(algebra: Algebra, image: ImageShape, num_classes: int, hidden: Sequence[int]) -> Classifier:
    """LeNet-300-100 (Han et al.; the lottery-ticket paper's MNIST model): an MLP on raw pixels."""
    channels, height, width = image
    in_features = algebra.input_channels(channels, flat=True) * height * width
    algebra.check_flat_input(in_features)
    fc, width_out = _mlp(algebra, in_features, hidden)
    return Classifier(nn.Identity(), algebra.flatten(channels), fc, algebra.output(width_out, num_classes))


def conv_net(
    algebra: Algebra, image: ImageShape, num_classes: int, plan: Sequence[int | str], hidden: Sequence[int]
) -> Classifier:
    """The lottery-ticket Conv-2/4/6: 3x3 convs with bias and ReLU, 2x2 max-pool after each pair ('M')."""
    channels, height, width = image
    in_channels = algebra.input_channels(channels)
    layers: list[nn.Module] = []
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        else:
            algebra.check_width(int(item), "model.plan")
            layers += [algebra.conv2d(in_channels, int(item), 3, padding=1), nn.ReLU()]
            in_channels = int(item)
    fc, width_out = _mlp(algebra, in_channels * height * width, hidden)
    return Classifier(nn.Sequential(*layers), nn.Flatten(), fc, algebra.output(width_out, num_classes))
