"""MobileNet (v1, Howard et al. 2017) for CIFAR: depthwise-separable convs with batch norm.

The CIFAR variant keeps the ImageNet widths (32 stem, 64 … 1024) but its stem has stride 1, so
32×32 images end at 2×2 before global average pooling. In ``quat`` the depthwise conv is one
quaternion filter per quaternion channel (it mixes the channel's four components, with as many
weights as the real depthwise conv) and the pointwise conv is a quaternion 1×1 conv (a quarter of
the real weights), so a quaternion MobileNet keeps a bit more than a quarter of the parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..algebra import Algebra
from ..errors import ConfigError
from .classic import Classifier, ImageShape


class DepthwiseSeparable(nn.Module):
    """3×3 depthwise conv, batch norm, ReLU, then 1×1 pointwise conv, batch norm, ReLU."""

    def __init__(self, algebra: Algebra, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.depthwise = algebra.conv2d(in_channels, in_channels, 3, stride, padding=1, groups=in_channels, bias=False)
        self.bn1 = algebra.batchnorm(in_channels)
        self.pointwise = algebra.conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = algebra.batchnorm(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.pointwise(self.relu(self.bn1(self.depthwise(x))))))


def _width_and_stride(item: int | Sequence[int]) -> tuple[int, int]:
    """A plan item: a width (stride 1) or [width, stride]."""
    if isinstance(item, int):
        return item, 1
    if len(item) == 2 and all(isinstance(v, int) for v in item):
        return item[0], item[1]
    raise ConfigError(f"model.plan item {item!r} must be a width or [width, stride]")


def mobilenet(
    algebra: Algebra, image: ImageShape, num_classes: int, stem: int, plan: Sequence[int | Sequence[int]]
) -> Classifier:
    """MobileNet v1: a 3×3 stem of ``stem`` channels, then one depthwise-separable block per plan item."""
    algebra.check_width(stem, "model.stem")
    in_channels = algebra.input_channels(image[0])
    stem_layers = nn.Sequential(
        algebra.conv2d(in_channels, stem, 3, padding=1, bias=False), algebra.batchnorm(stem), nn.ReLU()
    )
    blocks, channels = [], stem
    for item in plan:
        width, stride = _width_and_stride(item)
        algebra.check_width(width, "model.plan")
        blocks.append(DepthwiseSeparable(algebra, channels, width, stride))
        channels = width
    features = nn.Sequential(OrderedDict([
        ("stem", stem_layers), ("blocks", nn.Sequential(*blocks)), ("pool", nn.AdaptiveAvgPool2d(1)),
    ]))
    return Classifier(features, nn.Flatten(), nn.Identity(), algebra.output(channels, num_classes))
