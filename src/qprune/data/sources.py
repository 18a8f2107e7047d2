"""Dataset files -> uint8 image tensors, from local copies or torchvision downloads.

Everything here returns whole splits as ``uint8`` tensors ``(N, C, H, W)`` with ``int64``
labels; nothing is written next to the source files. MNIST's idx files are read straight from
their ``.gz`` (no unpacking), CIFAR from torchvision's pickled batches, and image folders (or
archives of them, such as the offline ``cifar10-jpeg.tar.xz``) are decoded once and cached as
tensors under ``data.cache`` so the next run starts in about a second.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import pickle
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DataError
from ..files import atomic_write_bytes, sweep_temporaries

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".zip")
CACHE_VERSION = 1


@dataclass
class RawSplits:
    """A dataset's train and test splits on the host, as loaded from disk."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    source: str  # what was read, for the results' provenance


# --------------------------------------------------------------------------- MNIST family

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_MNIST_CLASSES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}


def read_idx(path: Path) -> Tensor:
    """Read an idx file (optionally gzip-compressed) as a uint8 tensor of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    fix = "replace it with a good copy (delete it and set data.download=true when online)"
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; a cut-off stream, EOFError
        reason = "truncated" if isinstance(exc, EOFError) else " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path} cannot be read ({reason}): {fix}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not a uint8 idx file: {fix}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim :]
    expected = math.prod(dims)
    if len(body) != expected:
        raise DataError(f"{path} is truncated or corrupt ({len(body)} bytes of data where its header "
                        f"declares {expected}): {fix}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*dims)


def _find_idx(root: Path, folder: str, stem: str) -> Path | None:
    for directory in (root / folder / "raw", root / folder, root):
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def load_mnist(name: str, root: Path, download: bool) -> RawSplits:
    folder = _MNIST_FOLDERS[name]
    paths = {k: _find_idx(root, folder, stem) for k, stem in _IDX_FILES.items()}
    if None in paths.values():
        _download_or_fail(name, root, download, f"{folder}/raw/*-ubyte.gz", lambda: _torchvision_fetch(folder, root))
        paths = {k: _find_idx(root, folder, stem) for k, stem in _IDX_FILES.items()}
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise DataError(f"{paths[f'{split}_x']} holds {len(arrays[f'{split}_x'])} images but {paths[f'{split}_y']} "
                            f"{len(arrays[f'{split}_y'])} labels: replace the wrong one with a good copy")
    return RawSplits(
        arrays["train_x"].unsqueeze(1), arrays["train_y"].long(),
        arrays["test_x"].unsqueeze(1), arrays["test_y"].long(),
        _MNIST_CLASSES[name], str(paths["train_x"].parent),
    )


def _torchvision_fetch(dataset_class: str, root: Path) -> None:
    """torchvision's download into ``root`` (its own layout), for users who are online."""
    import torchvision.datasets as tvd

    for train in (True, False):
        getattr(tvd, dataset_class)(str(root), train=train, download=True)


# --------------------------------------------------------------------------- CIFAR

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "label_names", "labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels", "CIFAR100"),
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_cifar(name: str, root: Path, download: bool, cache_dir: Path | None, bad_images: str | None = None) -> RawSplits:
    """torchvision's pickled batches, or the offline JPEG copy ``cifar10-jpeg[.tar.xz]`` under ``root``."""
    folder, train_files, test_files, meta_file, names_key, labels_key, tv_name = _CIFAR[name]
    base = root / folder
    if not base.is_dir():
        for candidate in (root / f"{name}-jpeg", *(root / f"{name}-jpeg{s}" for s in ARCHIVE_SUFFIXES)):
            if candidate.exists():
                return load_image_folder(candidate, cache_dir, channels=3, bad_images=bad_images)
        _download_or_fail(
            name, root, download, f"{folder}/ (torchvision's format) or {name}-jpeg.tar.xz",
            lambda: _torchvision_fetch(tv_name, root),
        )

    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        batches = [_unpickle(base / f) for f in files]
        x = torch.cat([torch.as_tensor(b["data"], dtype=torch.uint8) for b in batches]).view(-1, 3, 32, 32)
        y = torch.cat([torch.as_tensor(b[labels_key], dtype=torch.long) for b in batches])
        return x, y

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    classes = list(_unpickle(base / meta_file)[names_key])
    return RawSplits(train_x, train_y, test_x, test_y, classes, str(base))


# --------------------------------------------------------------------------- image folders

def load_image_folder(
    path: Path, cache_dir: Path | None, channels: int = 3, image_size: int | None = None,
    bad_images: str | None = None,
) -> RawSplits:
    """An ImageFolder tree ``{train,test}/<class>/<image>`` (a folder or an archive), cached as tensors.

    ``val/`` stands in for ``test/`` when there is no ``test/``. Images of different sizes need
    ``image_size`` (they are resized to a square of that side). An image that cannot be decoded
    (truncated, or not an image) is an error naming it, or with ``bad_images="skip"`` left out
    with one warning. The cache is keyed on the contents — every file's path, size and
    modification time (an archive's own) — so adding, removing or replacing an image re-decodes.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"image folder {path} does not exist: set dataset.path to a folder or archive holding train/ and test/")
    cache_file = _cache_file(path, cache_dir, channels, image_size, bad_images)
    if cache_file is not None and cache_file.is_file():
        try:
            cached = torch.load(cache_file, weights_only=True)
            return RawSplits(**cached, source=str(path))
        except Exception as exc:  # a stale or truncated cache is rebuilt, never fatal
            log.warning("ignoring unreadable cache %s (%s)", cache_file, exc)
    splits = _decode_tree(_list_images(path), channels, image_size, path, bad_images)
    if cache_file is not None:
        _save_cache(splits, cache_file)
    return splits


def _list_images(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(relative path, reader) for every image file in a folder or archive."""
    name = path.name.lower()
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                yield file.relative_to(path).as_posix(), file.read_bytes
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.lower().endswith(IMAGE_SUFFIXES):
                    data = z.read(info)
                    yield info.filename, lambda data=data: data
    elif any(name.endswith(s) for s in ARCHIVE_SUFFIXES):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                    data = tar.extractfile(member).read()
                    yield member.name, lambda data=data: data
    else:
        raise DataError(f"dataset.path={path} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")


def _split_and_class(relative: str) -> tuple[str, str] | None:
    """('train'|'test'|'val', class) from '.../<split>/<class>/<file>'."""
    parts = relative.split("/")
    if len(parts) < 3 or parts[-3] not in ("train", "test", "val"):
        return None
    return parts[-3], parts[-2]


def _decode_tree(files, channels: int, image_size: int | None, path: Path, bad_images: str | None = None) -> RawSplits:
    encoded: dict[str, list[tuple[str, str, Tensor]]] = {"train": [], "test": [], "val": []}
    for relative, read in files:
        found = _split_and_class(relative)
        if found:
            split, cls = found
            encoded[split].append((relative, cls, torch.frombuffer(bytearray(read()), dtype=torch.uint8)))
    if not encoded["test"]:
        encoded["test"] = encoded.pop("val")
    if not encoded["train"] or not encoded["test"]:
        raise DataError(f"{path} holds no train/<class>/<image> and test/<class>/<image> files")
    classes = sorted({cls for _, cls, _ in encoded["train"]})
    index = {c: i for i, c in enumerate(classes)}
    log.info("decoding %d images from %s (cached afterwards)", len(encoded["train"]) + len(encoded["test"]), path)

    def decode(items: list[tuple[str, str, Tensor]]) -> tuple[Tensor, Tensor]:
        decoded, bad = decode_named([(name, d) for name, _, d in items], channels)
        if bad:
            first = f"{path}/{bad[0]}" if path.is_dir() else f"{bad[0]} in {path}"
            if bad_images != "skip":
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise DataError(f"{first} is not a readable image (truncated, or not an image){more}: remove it, "
                                "or set data.bad_images=skip to leave unreadable images out")
            log.warning("left out %d unreadable images (data.bad_images=skip), the first %s", len(bad), first)
        kept = [(cls, img) for (_, cls, _), img in zip(items, decoded) if img is not None]
        if not kept:
            raise DataError(f"{path} has a split without one readable image")
        images = _same_size([img for _, img in kept], image_size, path)
        labels = torch.tensor([index.get(cls, -1) for cls, _ in kept])
        if (labels < 0).any():
            raise DataError(f"{path}: the test split has classes that train does not have")
        return torch.stack(images), labels

    train_x, train_y = decode(encoded["train"])
    test_x, test_y = decode(encoded["test"])
    return RawSplits(train_x, train_y, test_x, test_y, classes, str(path))


def decode_named(items: list[tuple[str, Tensor]], channels: int) -> tuple[list[Tensor | None], list[str]]:
    """Decode (name, encoded file) pairs: one batched call, and image by image only when that fails,
    to find the unreadable ones — (images with None where a file could not be decoded, their names)."""
    try:
        return decode_images([d for _, d in items], channels), []
    except Exception:  # noqa: BLE001 - torchvision and PIL raise many kinds; the next loop names the file
        pass
    images, bad = [], []
    for name, data in items:
        try:
            images.append(decode_images([data], channels)[0])
        except Exception:  # noqa: BLE001
            images.append(None)
            bad.append(name)
    return images, bad


def decode_images(encoded: list[Tensor], channels: int) -> list[Tensor]:
    """Encoded image files -> uint8 (C, H, W) tensors: torchvision's batched decoder, else PIL."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io moves to torchcodec
            from torchvision.io import ImageReadMode, decode_image, decode_jpeg

            mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
            if all(d[:2].tolist() == [0xFF, 0xD8] for d in encoded):  # all JPEG: one batched call
                return list(decode_jpeg(encoded, mode=mode))
            return [decode_image(d, mode=mode) for d in encoded]
    except (ImportError, AttributeError, TypeError):
        import numpy as np
        from PIL import Image

        pil_mode = "RGB" if channels == 3 else "L"
        images = [Image.open(io.BytesIO(d.numpy().tobytes())).convert(pil_mode) for d in encoded]
        return [torch.from_numpy(np.array(img)).view(img.height, img.width, -1).permute(2, 0, 1) for img in images]


def _same_size(images: list[Tensor], image_size: int | None, path: Path) -> list[Tensor]:
    if image_size:
        from torchvision.transforms.v2.functional import resize

        return [img if img.shape[-2:] == (image_size, image_size) else resize(img, [image_size, image_size], antialias=True) for img in images]
    sizes = {tuple(img.shape[-2:]) for img in images}
    if len(sizes) > 1:
        raise DataError(f"{path} has images of {len(sizes)} sizes: set dataset.image_size to resize them")
    return images


def _cache_file(path: Path, cache_dir: Path | None, channels: int, image_size: int | None,
                bad_images: str | None = None) -> Path | None:
    if cache_dir is None:
        return None
    skip = "|skip" if bad_images == "skip" else ""  # (the key of a default run is what it always was)
    key = f"{path.resolve()}|{_contents_key(path)}|{channels}|{image_size}|{CACHE_VERSION}{skip}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    stem = path.name.split(".")[0]
    return Path(cache_dir).expanduser() / "imagefolder" / f"{stem}-{digest}.pt"


def _contents_key(path: Path) -> str:
    """What the decoded images depend on: an archive's size and modification time; for a folder every
    file's relative path, size and modification time (a folder's own mtime misses edits in subfolders)."""
    stat = path.stat()
    if not path.is_dir():
        return f"{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha1()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            s = file.stat()
            digest.update(f"{file.relative_to(path).as_posix()}|{s.st_size}|{s.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _save_cache(splits: RawSplits, cache_file: Path) -> None:
    payload = {k: v for k, v in vars(splits).items() if k != "source"}
    try:
        sweep_temporaries(cache_file.parent, only_dead=True)  # what a killed process left mid-write
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(cache_file, buffer.getvalue())
    except OSError as exc:  # a full or read-only disk (nothing half-written is left): decode again next time
        log.warning("could not write the decoded-image cache (%s); set data.cache to a writable folder", exc)


# --------------------------------------------------------------------------- missing data

def _download_or_fail(name: str, root: Path, download: bool, expected: str, fetch: Callable[[], object]) -> None:
    """torchvision's download when allowed; when it fails (offline), remove whatever it created
    (``data.root`` itself if it did not exist) and say why in full, on one line."""
    hint = (
        f"{name} not found under data.root={root} (expected {expected}); "
        "set data.root to a folder holding it (e.g. data.root=../shared/data or QPRUNE_DATA=...)"
    )
    if not download:
        raise DataError(hint + ", or allow data.download=true when online")
    created = _first_missing(root)
    before = set(root.iterdir()) if created is None else set()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fetch()
    except Exception as exc:
        _remove_new(root, created, before)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{hint}; downloading it failed (offline?): {reason}") from None


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what ``mkdir(parents=True)`` creates), or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_new(root: Path, created: Path | None, before: set[Path]) -> None:
    """Undo a failed download: the folders it created, or the entries it added to an existing root."""
    import shutil

    targets = [created] if created is not None else [p for p in root.iterdir() if p not in before] if root.is_dir() else []
    for target in targets:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def load_raw(
    name: str, root: str | Path, cache_dir: str | Path | None, download: bool,
    path: str | Path | None = None, channels: int = 3, image_size: int | None = None, bad_images: str | None = None,
) -> RawSplits:
    """Load dataset ``name`` (mnist, fashion_mnist, cifar10, cifar100, imagefolder) on the host.

    ``bad_images``: None (an unreadable image is an error naming it) or ``"skip"`` (image folders only).
    """
    root = Path(root).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir else None
    if name in _MNIST_FOLDERS:
        return load_mnist(name, root, download)
    if name in _CIFAR:
        return load_cifar(name, root, download, cache, bad_images)
    if name == "imagefolder":
        if not path:
            raise DataError("dataset=imagefolder needs dataset.path=<folder or archive with train/ and test/>")
        return load_image_folder(Path(path), cache, channels, image_size, bad_images)
    raise DataError(f"unknown dataset {name!r}")
