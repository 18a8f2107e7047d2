"""Device-resident datasets: uint8 images on the training device, normalised and augmented there.

A whole split lives on the device as ``uint8`` (CIFAR-10's train split is 150 MB); an epoch is
shuffled and augmented in one go (a permutation and a handful of gathers over all its images),
batches are slices of it, and normalisation (plus the grayscale channel of ``real4``/``quat``)
happens per batch in :meth:`DeviceData.model_input`. No per-sample Python, no host round trips.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .sources import RawSplits

# ITU-R 601 luma weights, applied to the *normalised* channels as the original study did.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
AUGMENTATIONS = ("none", "crop_flip")


@dataclass
class Split:
    x: Tensor  # uint8 (N, C, H, W)
    y: Tensor  # int64 (N,)

    def __len__(self) -> int:
        return self.x.shape[0]

    def take(self, index: Tensor) -> "Split":
        return Split(self.x[index], self.y[index])

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class DeviceData:
    """Train (and optional validation) and test splits on one device, plus how to feed a model."""

    train: Split
    test: Split
    val: Split | None
    classes: list[str]
    mean: Sequence[float]
    std: Sequence[float]
    add_gray: bool = False
    augment: str = "none"
    crop_padding: int = 4
    source: str = ""
    _scale: Tensor = field(init=False, repr=False)
    _shift: Tensor = field(init=False, repr=False)
    _gray: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"dataset.augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        channels = self.image_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(f"dataset.mean and dataset.std need {channels} values (one per channel)")
        device = self.train.x.device
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        self._gray = torch.tensor(GRAY_WEIGHTS, device=device).view(1, 3, 1, 1)
        if self.add_gray and channels != 3:
            raise ConfigError("a grayscale 4th channel needs RGB images")

    @property
    def device(self) -> torch.device:
        return self.train.x.device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def model_input(self, x: Tensor) -> Tensor:
        """uint8 images -> the float input of the model: normalised, [R, G, B, gray] when asked."""
        x = x.float() * self._scale + self._shift
        if self.add_gray:
            x = torch.cat((x, (x * self._gray).sum(1, keepdim=True)), dim=1)
        return x

    def augment_batch(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.augment == "crop_flip":
            return random_crop_flip(x, generator, self.crop_padding)
        return x

    def epoch(self, split: Split, generator: torch.Generator) -> Split:
        """One training epoch's images in training order, augmented: one shuffle and one augmentation.

        All of the epoch's random numbers are drawn here at once (a permutation, then the
        augmentation of every image), so the eager loop and the graph engine see the same data
        for the same generator whatever their batching (a dropped last batch included).
        """
        order = torch.randperm(len(split), generator=generator, device=self.device)
        return Split(self.augment_batch(split.x[order], generator), split.y[order])

    def batches(
        self, split: Split, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(model input, labels) batches; shuffled and augmented when a generator is given (training)."""
        if generator is not None:
            split = self.epoch(split, generator)
        stop = len(split) - len(split) % batch_size if drop_last else len(split)
        for start in range(0, stop, batch_size):
            yield self.model_input(split.x[start : start + batch_size]), split.y[start : start + batch_size]


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop from a zero-padded image plus a random horizontal flip, for a whole batch at once.

    The same as torchvision's ``RandomCrop(size, padding)`` then ``RandomHorizontalFlip()`` per
    image (zero = black padding on the uint8 image), done as one gather per chunk of images;
    all random numbers are drawn up front, so the chunking does not change the result.
    """
    b = x.shape[0]
    shift = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=x.device)
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    out = torch.empty_like(x)
    for start in range(0, b, AUGMENT_CHUNK):
        part = slice(start, start + AUGMENT_CHUNK)
        out[part] = _crop_flip(x[part], shift[:, part], flip[part], padding)
    return out


AUGMENT_CHUNK = 16_384  # images per gather: bounds the padded copy (CIFAR: ~80 MB) on any device


def _crop_flip(x: Tensor, shift: Tensor, flip: Tensor, padding: int) -> Tensor:
    b, c, h, w = x.shape
    device = x.device
    rows = shift[0, :, None] + torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + shift[1, :, None]
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(b, device=device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _size(value: int | float | None, total: int, key: str) -> int:
    """A count from an int or a fraction of ``total``."""
    if value is None:
        return 0
    if isinstance(value, float) and 0 < value < 1:
        return int(round(value * total))
    if isinstance(value, (int, float)) and value == int(value) and 0 <= value < total:
        return int(value)
    raise ConfigError(f"{key} must be a count in [0, {total}) or a fraction in (0, 1), got {value}")


def device_data(
    raw: RawSplits, device: torch.device, *, mean: Sequence[float], std: Sequence[float], add_gray: bool,
    augment: str = "none", val_size: int | float | None = None, train_size: int | float | None = None,
    test_size: int | float | None = None, split_seed: int = 0,
) -> DeviceData:
    """Carve the validation split (and optional subsets) on the host, then move everything to ``device``.

    The validation split is a fixed random part of train (``split_seed``), so it does not change
    with the run's seed; ``train_size``/``test_size`` keep a random subset (small experiments, tests).
    """
    g = torch.Generator().manual_seed(split_seed)
    train, test = Split(raw.train_x, raw.train_y), Split(raw.test_x, raw.test_y)
    order = torch.randperm(len(train), generator=g)
    n_val = _size(val_size, len(train), "data.val_size")
    val = train.take(order[len(train) - n_val :]) if n_val else None
    remaining = order[: len(train) - n_val]
    if train_size is not None:
        remaining = remaining[: _size(train_size, len(remaining) + 1, "data.train_size") or len(remaining)]
    train = train.take(remaining)
    if test_size is not None:
        n_test = _size(test_size, len(test) + 1, "data.test_size") or len(test)
        test = test.take(torch.randperm(len(test), generator=g)[:n_test])
    return DeviceData(
        train.to(device), test.to(device), val.to(device) if val else None, list(raw.classes),
        mean, std, add_gray, augment, source=raw.source,
    )
