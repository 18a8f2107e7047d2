"""Shared fixtures: the real datasets in ../shared/data (or $QPRUNE_TEST_DATA), loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("QPRUNE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


def pytest_configure(config):
    torch.set_num_threads(min(torch.get_num_threads(), 2))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "MNIST" / "raw").is_dir():
        pytest.fail(f"the real datasets are not at {DATA_ROOT}: put ../shared/data beside the checkout or set QPRUNE_TEST_DATA")
    return DATA_ROOT


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decoded-image cache for the whole session (the CLI tests reuse it through QPRUNE_CACHE)."""
    return tmp_path_factory.mktemp("qprune-cache")


@pytest.fixture(scope="session")
def mnist(data_root):
    from qprune.data import load_raw

    return load_raw("mnist", data_root, None, download=False)


@pytest.fixture(scope="session")
def cifar10(data_root, cache_dir):
    from qprune.data import load_raw

    return load_raw("cifar10", data_root, cache_dir, download=False)
