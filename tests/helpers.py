"""Helpers shared by the test modules: running ``python -m qprune`` as a person would, loading a script
from scripts/, and a pruned LeNet-300-100 on a slice of MNIST for the training tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
MNIST = dict(mean=(0.1307,), std=(0.3081,), add_gray=False)

# Small enough for every test run: 2 levels of 10 steps on MNIST slices.
TINY = ["model=lenet_300_100", "train.max_steps=10", "prune.levels=1", "data.train_size=1000", "data.test_size=500",
        "progress=none"]


def run_qprune(args, data_root: Path, cache_dir: Path, cwd: Path, check: bool = True, **env: str | None) -> subprocess.CompletedProcess:
    """``python -m qprune ARGS`` in ``cwd`` with outputs under ``cwd/outputs``; ``env`` adds variables (None removes one)."""
    merged = {**os.environ, "QPRUNE_DATA": str(data_root), "QPRUNE_CACHE": str(cache_dir), "QPRUNE_OUTPUTS": str(cwd / "outputs"), **env}
    merged = {k: v for k, v in merged.items() if v is not None}
    result = subprocess.run([sys.executable, "-m", "qprune", *args], cwd=cwd, env=merged, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"qprune failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module (registered in sys.modules: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def mnist_slice(mnist: Path):
    """620 training images (10 full batches of 60 and a last partial batch of 20) and 300 test images, on the CPU."""
    from qprune.data import device_data

    return device_data(mnist, torch.device("cpu"), **MNIST, train_size=620, test_size=300)


def pruned_model(algebra, seed: int, rate: float = 0.5):
    """LeNet-300-100 in ``algebra`` (a name or an Algebra), one global pruning round at ``rate`` applied; with its
    masks and the pruned weights' names."""
    from qprune import build_model
    from qprune.pruning import Masks, PruneSettings, prunable_weights, prune

    torch.manual_seed(seed)
    model = build_model("lenet_300_100", algebra)
    weights = prunable_weights(model)
    masks = prune(model, Masks.ones(model, weights), weights, PruneSettings(rate=rate))
    masks.apply_(model)
    return model, masks, [w.name for w in weights]
