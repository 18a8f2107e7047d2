"""CIFAR-100 in torchvision's on-disk format (generated here from real CIFAR-10 images: no copy exists offline)."""

import json
import pickle

import pytest
import torch
from hydra import compose, initialize_config_dir

from qprune.cli import config_dir
from qprune.data import load_raw
from qprune.runner import LevelRunner
from qprune.settings import Settings

FINE = [f"class_{i:02d}" for i in range(100)]


@pytest.fixture(scope="module")
def cifar100_root(cifar10, tmp_path_factory):
    """<root>/cifar-100-python/{train,test,meta} as torchvision unpacks them: pickled dicts with a
    (N, 3072) uint8 'data' array (R, G, B planes of 32x32), 'fine_labels' and 'coarse_labels'."""
    root = tmp_path_factory.mktemp("cifar100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    for split, images, start in (("train", 64, 0), ("test", 24, 1000)):
        x = cifar10.train_x[start:start + images]
        fine = [(3 * i + 7) % 100 for i in range(images)]
        batch = {"filenames": [f"img_{i}.png" for i in range(images)], "batch_label": f"{split} batch 1 of 1",
                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": x.reshape(images, -1).numpy()}
        (folder / split).write_bytes(pickle.dumps(batch))
    meta = {"fine_label_names": FINE, "coarse_label_names": [f"super_{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


def test_cifar100_reads_torchvisions_pickles(cifar100_root, cifar10):
    raw = load_raw("cifar100", cifar100_root, None, download=False)
    assert raw.classes == FINE
    assert raw.train_x.shape == (64, 3, 32, 32) and raw.test_x.shape == (24, 3, 32, 32)
    assert torch.equal(raw.train_x, cifar10.train_x[:64]) and torch.equal(raw.test_x, cifar10.train_x[1000:1024])
    assert raw.train_y.tolist() == [(3 * i + 7) % 100 for i in range(64)]  # the fine labels, not the coarse ones
    assert raw.source.endswith("cifar-100-python")


def test_a_run_on_cifar100_gets_a_100_class_head(cifar100_root, cache_dir, tmp_path):
    overrides = ["model=resnet20", "algebra=quat", "dataset=cifar100", f"data.root={cifar100_root}", f"data.cache={cache_dir}",
                 "data.download=false", "train.batch_size=16", "train.epochs=1", "train.max_steps=2",
                 "prune.levels=1", "progress=none", "device=cpu"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    from omegaconf import OmegaConf

    rows = LevelRunner(Settings.from_config(cfg), tmp_path / "run", OmegaConf.to_container(cfg, resolve=True)).run()
    assert [r["level"] for r in rows] == [0, 1]
    weights = torch.load(tmp_path / "run/levels/level_01/weights.pt", weights_only=True)
    assert weights["output.weight"].shape == (100, 64)
    counts = json.loads((tmp_path / "run/levels.json").read_text())
    head = 100 * 64
    assert counts["params_total"] == 69_230 + 90 * 65 and counts["params_dense_real"] == 272_474 + 90 * 65
    assert counts["prunable_total"] == 68_240 - 640 + head and counts["biases"] == 100 and counts["norm_params"] == 980
    assert counts["pct_of_real"] == pytest.approx(100 * counts["params_total"] / counts["params_dense_real"], abs=1e-4)
    assert rows[1]["params_nonzero"] == counts["params_total"] - round(0.2 * counts["prunable_total"])
