"""Helpers shared by the test modules: running ``python -m qprune`` as a person would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
