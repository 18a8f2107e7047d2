"""Number systems: which layers a model is built from and which input channels it sees.

``real3``: real layers on the image's own channels (RGB; for grayscale data, its one channel).
``real4``: real layers on RGB plus a grayscale channel — the same input as ``quat``, so the
fair real baseline. ``quat``: quaternion layers on [R, G, B, gray] read as one quaternion
channel (real part R). ``complex``: complex layers on the same [R, G, B, gray] read as two complex
channels R + iB and G + i·gray. ``phm`` (``n`` components): learned-rule layers (PHM, see
:mod:`qprune.hypercomplex`) on [R, G, B, gray] for n = 2 and 4, on RGB for n = 3. Every input is the
data pipeline's tensor as it is, read component-major (the first channels are the real parts): no
algebra reorders channels. Hidden widths are *real* widths in every algebra, so a quaternion model
has a quarter of the weights of its real twin, a complex one half, PHM 1/n (plus n³ rule entries a
layer). Batch norm is real batch norm per real channel, or, in every hypercomplex algebra, batch norm
per number channel (``qbn``: ``norm`` or ``whiten``, see :mod:`qprune.quaternion_norm`).
Quaternion weights start from Parcollet's polar initialisation at the He scale (``init=he``) or at
the original study's code's scale (``init=study``, see :func:`qprune.quaternion.quaternion_init_`),
and so do the weights of PHM-4 with quaternion rules; real layers keep PyTorch's default
initialisation in every case, as in the study, and complex and random-rule PHM layers their He-scale
one (:mod:`qprune.hypercomplex`): the study has no scale of its own for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torch import Tensor, nn

from .errors import ConfigError
from .hypercomplex import PHM_RULES, HypercomplexConv2d, HypercomplexLinear
from .quaternion import INIT_SCHEMES, QConv2d, QLinear
from .quaternion_norm import QBN_MODES, QBatchNorm2d

ALGEBRAS = ("real3", "real4", "complex", "quat", "phm")
COMPONENTS = {"real3": 1, "real4": 1, "complex": 2, "quat": 4}   # phm: algebra.n
PIXEL_GROUPINGS = ("blocks", "adjacent")
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, QBatchNorm2d)  # what `batchnorm` builds, in any algebra


@dataclass(frozen=True)
class Algebra:
    """A layer factory plus the input it expects; models are written once against it."""

    name: str
    pixel_grouping: str = "blocks"
    qbn: str = "norm"             # batch norm per number channel (hypercomplex algebras): norm | whiten
    init: str = "he"              # quaternion weight init (quat, phm with quaternion rules): he | study (the original code's scale)
    n: int | None = None          # phm only: components per number (2, 3, 4, ...)
    rules: str | None = None      # phm only: how the learned rules start: random (default) | quaternion (n=4)

    def __post_init__(self):
        if self.name not in ALGEBRAS:
            raise ConfigError(f"algebra must be one of {', '.join(ALGEBRAS)}, got {self.name!r}")
        if self.name == "phm":
            if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 2:
                raise ConfigError(f"algebra=phm needs algebra.n, the components per number (an integer >= 2), got {self.n!r}")
            if self.rules is None:
                object.__setattr__(self, "rules", "random")
            if self.rules not in PHM_RULES:
                raise ConfigError(f"algebra.rules must be one of {', '.join(PHM_RULES)}, got {self.rules!r}")
            if self.rules == "quaternion" and self.n != 4:
                raise ConfigError(f"algebra.rules=quaternion starts the rules as the quaternion algebra: it needs algebra.n=4, got {self.n}")
        else:
            for key in ("n", "rules"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"algebra.{key} applies to algebra=phm only (complex has 2 components, quat 4): "
                                      f"leave it null for algebra={self.name}")
        if self.pixel_grouping not in PIXEL_GROUPINGS:
            raise ConfigError(
                f"algebra.pixel_grouping must be one of {', '.join(PIXEL_GROUPINGS)}, got {self.pixel_grouping!r}"
            )
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"algebra.init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
        if self.qbn not in QBN_MODES:
            raise ConfigError(f"algebra.qbn must be one of {', '.join(QBN_MODES)}, got {self.qbn!r}")

    @property
    def quaternion(self) -> bool:
        return self.name == "quat"

    @property
    def components(self) -> int:
        """Real numbers per number of the algebra: 1 (real), 2 (complex), 4 (quat), n (phm)."""
        return self.n if self.name == "phm" else COMPONENTS[self.name]

    @property
    def hypercomplex(self) -> bool:
        return self.components > 1

    @property
    def adds_gray(self) -> bool:
        """Whether the input gets a grayscale 4th channel appended to RGB (4 channels: 2 complex, 1 quaternion)."""
        return self.name in ("real4", "complex", "quat") or (self.name == "phm" and self.n in (2, 4))

    @property
    def label(self) -> str:
        """The algebra in words for messages: ``quat``, ``phm (n=4)``."""
        return f"phm (n={self.n})" if self.name == "phm" else self.name

    @property
    def tag(self) -> str:
        """A short name for run names and tables: ``real3``, ``complex``, ``quat``, ``phm4``, ``phm4q``
        (PHM-4 with rules started as the quaternion algebra); :meth:`from_tag` reads it back."""
        if self.name != "phm":
            return self.name
        return f"phm{self.n}{'q' if self.rules == 'quaternion' else ''}"

    @classmethod
    def from_tag(cls, tag: str, **options) -> "Algebra":
        match = re.fullmatch(r"phm(\d+)(q?)", tag)
        if match:
            return cls("phm", n=int(match.group(1)), rules="quaternion" if match.group(2) else "random", **options)
        if tag == "phm":
            raise ConfigError("name a PHM algebra with its n: phm2, phm4, phm4q (quaternion rules)")
        return cls(tag, **options)

    def input_channels(self, image_channels: int, flat: bool = False) -> int:
        """Channels the model sees for images with ``image_channels`` channels.

        ``flat`` models (LeNet) flatten the image, so a one-channel quaternion input can be
        grouped into quaternions of pixels; convolutional models cannot.
        """
        if image_channels == 3:
            channels = 4 if self.adds_gray else 3
            if not flat and channels % self.components:
                raise ConfigError(f"algebra={self.label} has no input layout for RGB images in convolutional models "
                                  "(its input channels must divide into numbers): use algebra.n=2, 3 or 4")
            return channels
        if image_channels == 1:
            if self.name == "real4":
                raise ConfigError(
                    "algebra=real4 appends a grayscale channel to RGB, but this dataset is already "
                    "grayscale: use algebra=real3 (the real model on its one channel) or algebra=quat"
                )
            if self.hypercomplex and not flat:
                raise ConfigError(
                    f"algebra={self.label} needs RGB data for convolutional models (its numbers are made of "
                    "R, G, B and gray); on grayscale data use a LeNet model or algebra=real3"
                )
            return 1
        raise ConfigError(f"images must have 1 or 3 channels, got {image_channels}")

    def check_width(self, width: int, what: str) -> None:
        n = self.components
        if width % n:
            kind = "quaternion" if self.quaternion else self.label
            raise ConfigError(f"{what}={width}: a {kind} layer's width must be divisible by {n}; "
                              f"make {what}'s widths multiples of {n}")

    def check_flat_input(self, features: int) -> None:
        """A flattened image must divide into numbers too (LeNet on MNIST: 784 values)."""
        if features % self.components:
            raise ConfigError(f"algebra={self.label}: the flattened image has {features} values, which do not divide "
                              f"into numbers of {self.components}; pick an algebra whose components divide {features}")

    def _rule_init(self) -> str:
        return "complex" if self.name == "complex" else self.rules

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        if not self.hypercomplex:
            return nn.Linear(in_features, out_features, bias)
        self.check_width(in_features, "in_features")
        self.check_width(out_features, "out_features")
        if self.quaternion:
            return QLinear(in_features, out_features, bias, init=self.init)
        return HypercomplexLinear(in_features, out_features, self.components, self._rule_init(), bias, init=self.init)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
        padding: int = 0, groups: int = 1, bias: bool = True,
    ) -> nn.Module:
        """A conv; ``groups`` counts groups of *real* channels, as in ``nn.Conv2d``.

        In a hypercomplex algebra of n components a depthwise conv (``groups=in_channels``) becomes
        one filter per number channel (``in_channels/n`` groups: each maps the n components of one
        channel to n with n weights per kernel position, so it has as many weights as the real
        depthwise conv, whatever n); any other group count keeps its number of groups, and so the
        real width of each group.
        """
        if not self.hypercomplex:
            return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.check_width(in_channels, "in_channels")
        self.check_width(out_channels, "out_channels")
        n = self.components
        h_groups = in_channels // n if groups == in_channels else groups
        if (in_channels // n) % h_groups or (out_channels // n) % h_groups:
            raise ConfigError(
                f"groups={groups}: a {self.label} conv from {in_channels} to {out_channels} real channels needs "
                f"groups dividing both counts of numbers ({in_channels // n}, {out_channels // n}) or groups=in_channels"
            )
        if self.quaternion:
            return QConv2d(in_channels, out_channels, kernel_size, stride, padding, groups=h_groups, bias=bias, init=self.init)
        return HypercomplexConv2d(in_channels, out_channels, kernel_size, n, self._rule_init(), stride, padding,
                                  groups=h_groups, bias=bias, init=self.init)

    def batchnorm(self, channels: int) -> nn.Module:
        """Batch norm over ``channels`` real channels: per real channel, or per number channel (all n components together)."""
        if not self.hypercomplex:
            return nn.BatchNorm2d(channels)
        self.check_width(channels, "batch norm channels")
        return QBatchNorm2d(channels, self.qbn, components=self.components)

    def output(self, in_features: int, num_classes: int) -> nn.Linear:
        """The classifier head is real in every algebra: classes need not be divisible by n."""
        return nn.Linear(in_features, num_classes)

    def flatten(self, image_channels: int) -> nn.Module:
        """Flatten an image for a fully connected model, keeping the components of a number contiguous.

        Multi-channel images flatten channel-major, which is already component-major. A
        one-channel input of an n-component algebra groups its pixels: ``blocks`` reads the
        flattened image as n contiguous blocks (for quaternions r|i|j|k, the original study's
        choice), ``adjacent`` makes each run of n neighbouring pixels one number.
        """
        if self.hypercomplex and image_channels == 1 and self.pixel_grouping == "adjacent":
            return AdjacentPixels(self.components)
        return nn.Flatten()


class AdjacentPixels(nn.Module):
    """Flatten, then reorder so pixels n·t .. n·t+n-1 become number t (component-major output)."""

    def __init__(self, components: int = 4):
        super().__init__()
        self.components = components

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        return flat.view(flat.shape[0], -1, self.components).transpose(1, 2).reshape(flat.shape[0], -1)

    def extra_repr(self) -> str:
        return f"components={self.components}"


def get_algebra(algebra: str | Algebra, **options) -> Algebra:
    """An :class:`Algebra` from its name (and options such as ``n=4``), or the one given with options replaced."""
    if isinstance(algebra, Algebra):
        return replace(algebra, **options) if options else algebra
    return Algebra(algebra, **options)
