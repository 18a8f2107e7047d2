"""Number systems: which layers a model is built from and which input channels it sees.

``real3``: real layers on the image's own channels (RGB; for grayscale data, its one channel).
``real4``: real layers on RGB plus a grayscale channel — the same input as ``quat``, so the
fair real baseline. ``quat``: quaternion layers on [R, G, B, gray] read as one quaternion
channel (real part R). Hidden widths are *real* widths in every algebra, so a quaternion model
has a quarter of the parameters of its real twin. Batch norm is real batch norm per real channel,
or quaternion batch norm (``qbn``: ``norm`` or ``whiten``, see :mod:`qprune.quaternion_norm`).
Quaternion weights start from Parcollet's polar initialisation at the He scale (``init=he``) or at
the original study's code's scale (``init=study``, see :func:`qprune.quaternion.quaternion_init_`);
real layers keep PyTorch's default initialisation in every case, as in the study.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .errors import ConfigError
from .quaternion import INIT_SCHEMES, QConv2d, QLinear
from .quaternion_norm import QBN_MODES, QBatchNorm2d

ALGEBRAS = ("real3", "real4", "quat")
PIXEL_GROUPINGS = ("blocks", "adjacent")
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, QBatchNorm2d)  # what `batchnorm` builds, in any algebra


@dataclass(frozen=True)
class Algebra:
    """A layer factory plus the input it expects; models are written once against it."""

    name: str
    pixel_grouping: str = "blocks"
    qbn: str = "norm"             # quaternion batch norm mode (quat only): norm | whiten
    init: str = "he"              # quaternion weight init (quat only): he | study (the original code's scale)

    def __post_init__(self):
        if self.name not in ALGEBRAS:
            raise ConfigError(f"algebra must be one of {', '.join(ALGEBRAS)}, got {self.name!r}")
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
    def adds_gray(self) -> bool:
        """Whether the input gets a grayscale 4th channel appended to RGB."""
        return self.name in ("real4", "quat")

    def input_channels(self, image_channels: int, flat: bool = False) -> int:
        """Channels the model sees for images with ``image_channels`` channels.

        ``flat`` models (LeNet) flatten the image, so a one-channel quaternion input can be
        grouped into quaternions of pixels; convolutional models cannot.
        """
        if image_channels == 3:
            return 4 if self.adds_gray else 3
        if image_channels == 1:
            if self.name == "real4":
                raise ConfigError(
                    "algebra=real4 appends a grayscale channel to RGB, but this dataset is already "
                    "grayscale: use algebra=real3 (the real model on its one channel) or algebra=quat"
                )
            if self.quaternion and not flat:
                raise ConfigError(
                    "algebra=quat needs RGB data for convolutional models (one quaternion channel = "
                    "R, G, B, gray); on grayscale data use a LeNet model or algebra=real3"
                )
            return 1
        raise ConfigError(f"images must have 1 or 3 channels, got {image_channels}")

    def check_width(self, width: int, what: str) -> None:
        if self.quaternion and width % 4:
            raise ConfigError(f"{what}={width}: a quaternion layer's width must be divisible by 4")

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        if not self.quaternion:
            return nn.Linear(in_features, out_features, bias)
        self.check_width(in_features, "in_features")
        self.check_width(out_features, "out_features")
        return QLinear(in_features, out_features, bias, init=self.init)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
        padding: int = 0, groups: int = 1, bias: bool = True,
    ) -> nn.Module:
        """A conv; ``groups`` counts groups of *real* channels, as in ``nn.Conv2d``.

        In ``quat`` a depthwise conv (``groups=in_channels``) becomes one quaternion filter per
        quaternion channel (``in_channels/4`` quaternion groups: each group maps the 4 components
        of one channel to 4, so it has as many weights as the real depthwise conv); any other group
        count keeps its number of groups, and so the real width of each group.
        """
        if not self.quaternion:
            return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.check_width(in_channels, "in_channels")
        self.check_width(out_channels, "out_channels")
        q_groups = in_channels // 4 if groups == in_channels else groups
        if (in_channels // 4) % q_groups or (out_channels // 4) % q_groups:
            raise ConfigError(
                f"groups={groups}: a quaternion conv from {in_channels} to {out_channels} real channels needs "
                f"groups dividing both quaternion counts ({in_channels // 4}, {out_channels // 4}) or groups=in_channels"
            )
        return QConv2d(in_channels, out_channels, kernel_size, stride, padding, groups=q_groups, bias=bias, init=self.init)

    def batchnorm(self, channels: int) -> nn.Module:
        """Batch norm over ``channels`` real channels: per real channel, or per quaternion channel in ``quat``."""
        if not self.quaternion:
            return nn.BatchNorm2d(channels)
        self.check_width(channels, "batch norm channels")
        return QBatchNorm2d(channels, self.qbn)

    def output(self, in_features: int, num_classes: int) -> nn.Linear:
        """The classifier head is real in every algebra: classes need not be divisible by 4."""
        return nn.Linear(in_features, num_classes)

    def flatten(self, image_channels: int) -> nn.Module:
        """Flatten an image for a fully connected model, keeping quaternion components contiguous.

        [R, G, B, gray] images flatten channel-major, which is already component-major. A
        one-channel quaternion input groups its pixels: ``blocks`` reads the flattened image as
        four contiguous blocks r|i|j|k (the original study's choice), ``adjacent`` makes each
        run of 4 neighbouring pixels one quaternion.
        """
        if self.quaternion and image_channels == 1 and self.pixel_grouping == "adjacent":
            return AdjacentPixelQuaternions()
        return nn.Flatten()


class AdjacentPixelQuaternions(nn.Module):
    """Flatten, then reorder so pixels 4t..4t+3 become quaternion t (component-major output)."""

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        return flat.view(flat.shape[0], -1, 4).transpose(1, 2).reshape(flat.shape[0], -1)


def get_algebra(algebra: str | Algebra) -> Algebra:
    return algebra if isinstance(algebra, Algebra) else Algebra(algebra)
