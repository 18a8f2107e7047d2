"""Shared fixtures: the real datasets in $QPRUNE_TEST_DATA, else $QPRUNE_DATA, else ../shared/data, loaded once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import TINY, run_qprune

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("QPRUNE_TEST_DATA") or os.environ.get("QPRUNE_DATA") or REPO.parent / "shared" / "data").resolve()


def pytest_configure(config):
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    # W&B stays off unless a test asks for it (logger.mode=offline beats $WANDB_MODE), never goes
    # online with a developer's key, and keeps its own files out of the home directory.
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.pop("WANDB_API_KEY", None)
    home = tempfile.mkdtemp(prefix="qprune-tests-wandb-")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[name] = os.path.join(home, name.lower())


@pytest.fixture(scope="session")
def basic_sweep(data_root, cache_dir, tmp_path_factory):
    """A multirun with the basic launcher (all jobs in one process), 2 algebras x 2 seeds, with W&B
    as a person without W&B credentials gets it: the default logger, offline."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_qprune(["-m", *TINY, "algebra=real3,quat", "seed=0,1"], data_root, cache_dir, cwd,
                        WANDB_MODE=None, NETRC=str(cwd / "no-netrc"))
    (sweep_dir,) = (cwd / "outputs" / "multirun").iterdir()
    return sweep_dir, result


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "MNIST" / "raw").is_dir():
        pytest.fail(f"the real datasets are not at {DATA_ROOT}: put ../shared/data beside the checkout or set QPRUNE_DATA")
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


@pytest.fixture(autouse=True)
def _fresh_wandb_failures():
    """A W&B failure is remembered for the rest of a process; each test starts without one."""
    from qprune.wandb_logger import forget_failures

    forget_failures()
    yield
    forget_failures()
