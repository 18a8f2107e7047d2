"""Data: dataset files -> device-resident uint8 splits -> normalised (and augmented) model input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .pipeline import GRAY_WEIGHTS, DeviceData, Split, device_data, random_crop_flip
from .sources import RawSplits, load_raw

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
BAD_IMAGES = (None, "skip")


@dataclass(frozen=True)
class DatasetSettings:
    """What the data is (the ``dataset`` config group)."""

    name: str
    channels: int = 3
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.25, 0.25, 0.25)
    augment: str = "none"
    path: str | None = None          # imagefolder: a folder or archive with train/ and test/
    image_size: int | None = None    # imagefolder: resize to this square side

    def __post_init__(self):
        if self.name not in DATASETS:
            raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}, got {self.name!r}")


@dataclass(frozen=True)
class DataSettings:
    """Where the data is and which part of it to use (the ``data`` config node)."""

    root: str = "data"
    cache: str | None = None
    download: bool = True
    val_size: int | float | None = None
    train_size: int | float | None = None
    test_size: int | float | None = None
    split_seed: int = 0
    bad_images: str | None = None    # image folders: None (an unreadable image is an error) | "skip"

    def __post_init__(self):
        if self.bad_images not in BAD_IMAGES:
            raise ConfigError(f"data.bad_images must be null (an unreadable image is an error) or skip, got {self.bad_images!r}")


def load_data(dataset: DatasetSettings, where: DataSettings, add_gray: bool, device: torch.device) -> DeviceData:
    raw = load_raw(dataset.name, where.root, where.cache, where.download, dataset.path, dataset.channels, dataset.image_size,
                   where.bad_images)
    return device_data(
        raw, device, mean=dataset.mean, std=dataset.std, add_gray=add_gray and raw.train_x.shape[1] == 3,
        augment=dataset.augment, val_size=where.val_size, train_size=where.train_size,
        test_size=where.test_size, split_seed=where.split_seed,
    )


__all__ = [
    "DATASETS", "GRAY_WEIGHTS", "DataSettings", "DatasetSettings", "DeviceData", "RawSplits", "Split",
    "device_data", "load_data", "load_raw", "random_crop_flip",
]
