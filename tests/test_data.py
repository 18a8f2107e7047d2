"""Loading the real datasets in ../shared/data, and the device pipeline on slices of them."""

import io
import tarfile

import pytest
import torch
from PIL import Image

from qprune.data import DataSettings, DatasetSettings, device_data, load_data, load_raw, random_crop_flip
from qprune.errors import DataError

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_mnist_from_the_gz_files(mnist, data_root):
    assert mnist.train_x.shape == (60_000, 1, 28, 28) and mnist.train_x.dtype == torch.uint8
    assert mnist.test_x.shape == (10_000, 1, 28, 28)
    assert mnist.train_y[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's well-known first labels
    assert mnist.test_y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.train_x.max() == 255 and mnist.train_x.min() == 0
    # read straight from the .gz: nothing was unpacked next to them
    assert sorted(p.name for p in (data_root / "MNIST" / "raw").iterdir()) == sorted(
        f"{s}.gz" for s in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    )


def test_cifar10_from_the_jpeg_archive(cifar10):
    assert cifar10.train_x.shape == (50_000, 3, 32, 32) and cifar10.test_x.shape == (10_000, 3, 32, 32)
    assert cifar10.train_y.bincount().tolist() == [5000] * 10
    assert cifar10.test_y.bincount().tolist() == [1000] * 10
    assert cifar10.classes[:3] == ["airplane", "automobile", "bird"]
    # CIFAR-10's channel means are about (125, 123, 114) / 255 (JPEG shifts them slightly)
    means = cifar10.train_x.float().mean((0, 2, 3))
    assert torch.allclose(means, torch.tensor([125.3, 123.0, 113.9]), atol=2.5)


def test_decoded_images_are_cached(data_root, cache_dir, cifar10):
    cached = list((cache_dir / "imagefolder").glob("cifar10-jpeg-*.pt"))
    assert len(cached) == 1
    again = load_raw("cifar10", data_root, cache_dir, download=False)
    assert torch.equal(again.test_x, cifar10.test_x)


def test_model_input_normalises_and_appends_gray(cifar10):
    data = device_data(cifar10, torch.device("cpu"), **IMAGENET, add_gray=True, test_size=500)
    x = data.model_input(data.test.x)
    assert x.shape == (500, 4, 32, 32) and x.dtype == torch.float32
    rgb = (data.test.x.float() / 255 - torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(x[:, :3], rgb)
    gray = 0.2989 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # ITU-R 601, after normalisation as the study did
    torch.testing.assert_close(x[:, 3], gray)
    assert -2.2 < x.min() < -1.7 and 2.2 < x.max() < 2.7


def test_mnist_input_for_each_algebra(mnist):
    data = device_data(mnist, torch.device("cpu"), mean=(0.1307,), std=(0.3081,), add_gray=False, test_size=2000)
    x = data.model_input(data.test.x)
    assert x.shape == (2000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_crop_flip_is_a_shifted_possibly_mirrored_window(cifar10):
    x = cifar10.test_x[:64]
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, g, padding=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        matches = [
            (dy, dx, flip)
            for dy in range(9) for dx in range(9) for flip in (False, True)
            if torch.equal(out[i], (padded[i, :, dy:dy + 32, dx:dx + 32].flip(-1) if flip else padded[i, :, dy:dy + 32, dx:dx + 32]))
        ]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0][2]
    assert 16 < flips < 48  # about half flipped
    assert not torch.equal(out, x)


def test_batches_cover_the_split_once_per_epoch(mnist):
    data = device_data(mnist, torch.device("cpu"), mean=(0.1307,), std=(0.3081,), add_gray=False, train_size=1000)
    g = torch.Generator().manual_seed(1)
    labels = torch.cat([y for _, y in data.batches(data.train, 60, g)])
    assert len(labels) == 1000 and sorted(labels.tolist()) == sorted(data.train.y.tolist())
    assert sum(1 for _ in data.batches(data.train, 60, g, drop_last=True)) == 16


def test_validation_split_is_carved_from_train_and_fixed(mnist):
    a = device_data(mnist, torch.device("cpu"), mean=(0.1307,), std=(0.3081,), add_gray=False, val_size=5000)
    b = device_data(mnist, torch.device("cpu"), mean=(0.1307,), std=(0.3081,), add_gray=False, val_size=0.1)
    assert len(a.train) == 55_000 and len(a.val) == 5000 and len(a.test) == 10_000
    assert len(b.val) == 6000
    assert torch.equal(a.val.x[:100], device_data(mnist, torch.device("cpu"), mean=(0.1307,), std=(0.3081,),
                                                   add_gray=False, val_size=5000).val.x[:100])
    # disjoint: no validation image is among the training images (compare a sample by hash)
    train_keys = {bytes(img.numpy()) for img in a.train.x}
    assert sum(bytes(img.numpy()) in train_keys for img in a.val.x[:500]) < 5  # MNIST has a few duplicates


def test_missing_data_offline_names_data_root(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*MNIST/raw.*data.root=../shared/data") as info:
        load_data(DatasetSettings("mnist", 1, (0.1,), (0.3,)), DataSettings(root=str(tmp_path), download=False), False, torch.device("cpu"))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="cifar10 not found under data.root"):
        load_raw("cifar10", tmp_path, None, download=False)


def _png(color, size=8):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("as_archive", [False, True])
def test_image_folder_from_a_folder_or_an_archive(tmp_path, as_archive):
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    files = {f"pets/{split}/{cls}/{i}.png": _png(c) for split, n in (("train", 3), ("test", 2)) for cls, c in colors.items() for i in range(n)}
    if as_archive:
        source = tmp_path / "pets.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        for name, data in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(data)
        source = tmp_path / "pets"
    raw = load_raw("imagefolder", tmp_path, tmp_path / "cache", False, path=source)
    assert raw.classes == ["blue", "red"]
    assert raw.train_x.shape == (6, 3, 8, 8) and raw.test_x.shape == (4, 3, 8, 8)
    for x, y in zip(raw.train_x, raw.train_y):
        expected = colors[raw.classes[y]]
        assert x[:, 0, 0].tolist() == list(expected)
    assert len(list((tmp_path / "cache" / "imagefolder").glob("*.pt"))) == 1


def test_image_folder_of_mixed_sizes_needs_image_size(tmp_path):
    for split in ("train", "test"):
        for i, size in enumerate((8, 10)):
            (tmp_path / "d" / split / "a").mkdir(parents=True, exist_ok=True)
            (tmp_path / "d" / split / "a" / f"{i}.png").write_bytes(_png((1, 2, 3), size))
    with pytest.raises(DataError, match="dataset.image_size"):
        load_raw("imagefolder", tmp_path, None, False, path=tmp_path / "d")
    raw = load_raw("imagefolder", tmp_path, None, False, path=tmp_path / "d", image_size=6)
    assert raw.train_x.shape == (2, 3, 6, 6)


@pytest.mark.parametrize("root_exists", [False, True])
def test_a_failed_download_leaves_nothing_behind_and_says_why_in_full(tmp_path, monkeypatch, root_exists):
    """Offline with data.download=true: what torchvision created is removed (data.root itself when it
    was new), and its whole error is shown, on one line."""
    from qprune.data import sources

    reason = ("Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3.amazonaws.com/mnist/, got:\n"
              "<urlopen error [Errno -3] Temporary failure in name resolution>\nTried http://yann.lecun.com/exdb/mnist/, "
              "got:\n<urlopen error [Errno -3] Temporary failure in name resolution>")

    def offline_fetch(folder, root):   # as torchvision does: its folders and a partial file, then the error
        (root / folder / "raw").mkdir(parents=True)
        (root / folder / "raw" / "train-images-idx3-ubyte.gz.part").write_bytes(b"\x1f\x8b partial")
        raise RuntimeError(reason)

    monkeypatch.setattr(sources, "_torchvision_fetch", offline_fetch)
    if root_exists:
        root = tmp_path / "data"
        root.mkdir()
        (root / "README.md").write_text("mine")
    else:
        root = tmp_path / "nonexistent" / "data"
    with pytest.raises(DataError) as info:
        load_raw("mnist", root, None, download=True)
    message = str(info.value)
    assert "\n" not in message and message.endswith(" ".join(reason.split()))
    assert sorted(p.name for p in tmp_path.iterdir()) == (["data"] if root_exists else [])
    if root_exists:
        assert [p.name for p in root.iterdir()] == ["README.md"]
