"""Models, each defined once against an :class:`~qprune.algebra.Algebra` layer factory.

The same definition gives the real (``real3``/``real4``) and the quaternion (``quat``) model;
widths are real widths everywhere. Every model is a :class:`Classifier`: a feature extractor,
a flatten, hidden fully connected layers and a real ``output`` head (pruning treats these
as the ``conv``, ``fc`` and ``output`` layer types).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .algebra import Algebra, get_algebra
from .errors import ConfigError

ImageShape = tuple[int, int, int]  # channels, height, width of the dataset's images


class Classifier(nn.Module):
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


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., Classifier]   # (algebra, image shape, classes, **options)
    image: ImageShape                  # the images it is meant for, used when none are given
    options: dict = field(default_factory=dict)  # architecture defaults, overridable as model.<key>
    flat: bool = False                 # flattens the image first (so one-channel quaternion input works)


MNIST_IMAGE: ImageShape = (1, 28, 28)
CIFAR_IMAGE: ImageShape = (3, 32, 32)

MODELS: dict[str, ModelSpec] = {
    "lenet_300_100": ModelSpec(lenet, MNIST_IMAGE, {"hidden": (300, 100)}, flat=True),
    "conv2": ModelSpec(conv_net, CIFAR_IMAGE, {"plan": (64, 64, "M"), "hidden": (256, 256)}),
    "conv4": ModelSpec(conv_net, CIFAR_IMAGE, {"plan": (64, 64, "M", 128, 128, "M"), "hidden": (256, 256)}),
    "conv6": ModelSpec(conv_net, CIFAR_IMAGE, {"plan": (64, 64, "M", 128, 128, "M", 256, 256, "M"), "hidden": (256, 256)}),
}


def build_model(
    name: str, algebra: str | Algebra = "real3", num_classes: int = 10, image_shape: ImageShape | None = None,
    **options,
) -> Classifier:
    """Build model ``name`` in number system ``algebra`` for ``image_shape`` (C, H, W) images.

    ``image_shape`` defaults to the model's usual data (MNIST for LeNet, CIFAR for the convnets);
    ``options`` override the architecture (e.g. ``hidden=(512, 256)``; see ``MODELS``).
    """
    if name not in MODELS:
        raise ConfigError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    spec = MODELS[name]
    if unknown := set(options) - set(spec.options):
        raise ConfigError(f"model {name} has no option(s) {sorted(unknown)}; it takes {sorted(spec.options)}")
    return spec.build(get_algebra(algebra), tuple(image_shape or spec.image), num_classes, **{**spec.options, **options})


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_real_parameters(name: str, num_classes: int = 10, image_shape: ImageShape | None = None, **options) -> int:
    """Parameters of the dense ``real3`` twin: the denominator of ``pct_of_real``."""
    with torch.device("meta"):
        return count_parameters(build_model(name, "real3", num_classes, image_shape, **options))
