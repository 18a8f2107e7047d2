"""Models, each defined once against an :class:`~qprune.algebra.Algebra` layer factory.

The same definition gives the real (``real3``/``real4``), the quaternion (``quat``), the complex
(``complex``) and the learned-rule (``phm``) model; widths are real widths everywhere. Every model is a :class:`Classifier`: a feature extractor,
a flatten, hidden fully connected layers and a real ``output`` head (pruning treats these
as the ``conv``, ``fc`` and ``output`` layer types).

``classic``: LeNet-300-100 and Conv-2/4/6 (the original study); ``resnet``: the CIFAR ResNet-20
family and ResNet-18; ``mobilenet``: MobileNet v1 for CIFAR. The registry below is the one list
of model names (each has a ``conf/model/<name>.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..algebra import NORM_LAYERS, Algebra, get_algebra
from ..errors import ConfigError
from .classic import Classifier, ImageShape, conv_net, lenet
from .mobilenet import mobilenet
from .resnet import resnet


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., Classifier]   # (algebra, image shape, classes, **options)
    image: ImageShape                  # the images it is meant for, used when none are given
    options: dict = field(default_factory=dict)  # architecture defaults, overridable as model.<key>
    flat: bool = False                 # flattens the image first (so one-channel quaternion input works)


MNIST_IMAGE: ImageShape = (1, 28, 28)
CIFAR_IMAGE: ImageShape = (3, 32, 32)

MOBILENET_PLAN = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)

MODELS: dict[str, ModelSpec] = {
    "lenet_300_100": ModelSpec(lenet, MNIST_IMAGE, {"hidden": (300, 100)}, flat=True),
    "lenet_12": ModelSpec(lenet, MNIST_IMAGE, {"hidden": (12,)}, flat=True),  # the study's smallest: 784-12-10
    "conv2": ModelSpec(conv_net, CIFAR_IMAGE, {"plan": (64, 64, "M"), "hidden": (256, 256)}),
    "conv4": ModelSpec(conv_net, CIFAR_IMAGE, {"plan": (64, 64, "M", 128, 128, "M"), "hidden": (256, 256)}),
    "conv6": ModelSpec(conv_net, CIFAR_IMAGE, {"plan": (64, 64, "M", 128, 128, "M", 256, 256, "M"), "hidden": (256, 256)}),
    "resnet20": ModelSpec(resnet, CIFAR_IMAGE, {"widths": (16, 32, 64), "blocks": (3, 3, 3), "prune_shortcuts": True}),
    "resnet18": ModelSpec(resnet, CIFAR_IMAGE, {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2), "prune_shortcuts": True}),
    "mobilenet": ModelSpec(mobilenet, CIFAR_IMAGE, {"stem": 32, "plan": MOBILENET_PLAN}),
}


def build_model(
    name: str, algebra: str | Algebra = "real3", num_classes: int = 10, image_shape: ImageShape | None = None,
    *, init: str | None = None, n: int | None = None, rules: str | None = None, **options,
) -> Classifier:
    """Build model ``name`` in number system ``algebra`` for ``image_shape`` (C, H, W) images.

    ``image_shape`` defaults to the model's usual data (MNIST for LeNet, CIFAR for the others);
    ``init`` sets the quaternion initialisation (``he`` or ``study``; default: the algebra's), ``n``
    and ``rules`` configure a PHM algebra (``build_model("conv4", "phm", n=4)``);
    ``options`` override the architecture (e.g. ``hidden=(512, 256)``; see ``MODELS``).
    """
    if name not in MODELS:
        raise ConfigError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    spec = MODELS[name]
    algebra = get_algebra(algebra, **{k: v for k, v in {"init": init, "n": n, "rules": rules}.items() if v is not None})
    if unknown := set(options) - set(spec.options):
        raise ConfigError(f"model {name} has no option(s) {sorted(unknown)}; it takes {sorted(spec.options)}")
    return spec.build(algebra, tuple(image_shape or spec.image), num_classes, **{**spec.options, **options})


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_real_parameters(name: str, num_classes: int = 10, image_shape: ImageShape | None = None, **options) -> int:
    """Parameters of the dense ``real3`` twin: the denominator of ``pct_of_real``."""
    with torch.device("meta"):
        return count_parameters(build_model(name, "real3", num_classes, image_shape, **options))


def parameter_counts(model: nn.Module, prunable: Iterable[str], dense_real: int) -> dict[str, int | float]:
    """The parameter accounting of a run (levels.json): every parameter in exactly one role.

    ``prunable_total`` (the weights named in ``prunable``), ``unprunable_weights`` (other conv and
    linear weights: shortcuts with ``model.prune_shortcuts=false``, the head with
    ``prune.output=false``), ``biases`` and ``norm_params`` (batch norm scales and shifts, real or
    quaternion), their sum ``params_total``, the dense ``real3`` twin's ``params_dense_real`` and
    ``pct_of_real``, the dense model's size as a percentage of the twin's.
    """
    prunable = set(prunable)
    counts = {"prunable_total": 0, "unprunable_weights": 0, "biases": 0, "norm_params": 0}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if f"{module_name}.{name}".lstrip(".") in prunable:
                role = "prunable_total"
            elif isinstance(module, NORM_LAYERS):
                role = "norm_params"
            elif name == "bias":
                role = "biases"
            else:
                role = "unprunable_weights"
            counts[role] += param.numel()
    total = sum(counts.values())
    return {**counts, "params_total": total, "params_dense_real": dense_real,
            "pct_of_real": round(100.0 * total / dense_real, 4)}


__all__ = [
    "CIFAR_IMAGE", "MNIST_IMAGE", "MODELS", "Classifier", "ImageShape", "ModelSpec", "build_model",
    "conv_net", "count_parameters", "dense_real_parameters", "lenet", "mobilenet", "parameter_counts", "resnet",
]
