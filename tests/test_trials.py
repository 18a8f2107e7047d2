"""trials=K through the level runner: K run directories, each the single run of its seed, resumable."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qprune.cli import config_dir
from qprune.reporting import read_levels_csv
from qprune.runner import LevelRunner
from qprune.settings import Settings

QUICK = ["model=lenet_300_100", "algebra=quat", "train.epochs=1", "train.max_steps=25", "prune.levels=1",
         "data.train_size=2000", "data.test_size=300", "progress=none"]


def run(overrides, run_dir, data_root, cache_dir):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*QUICK, *overrides, f"data.root={data_root}", f"data.cache={cache_dir}"])
    config = OmegaConf.to_container(cfg, resolve=True)
    return LevelRunner(Settings.from_config(cfg), run_dir, config).run()


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


def test_trials_write_one_run_directory_per_seed_and_resume(data_root, cache_dir, tmp_path):
    rows = run(["trials=2", "seed=3"], tmp_path / "k", data_root, cache_dir)
    assert sorted(p.parent.name for p in (tmp_path / "k").glob("**/levels.csv")) == ["trial_0", "trial_1"]
    assert [r["seed"] for r in rows] == [3, 3, 4, 4]
    trial = tmp_path / "k" / "trial_1"
    assert json.loads((trial / "run.json").read_text())["identity"]["seed"] == 4
    assert json.loads((trial / "levels.json").read_text())["config"]["seed"] == 4
    k_rows = read_levels_csv(trial / "levels.csv")

    # trial 1 is the single run with seed 4: same initialisation, data order and pruning
    single_rows = run(["seed=4"], tmp_path / "single", data_root, cache_dir)
    for a, b in zip(k_rows, single_rows):
        assert a["prunable_remaining"] == b["prunable_remaining"] and a["params_nonzero"] == b["params_nonzero"]
        assert a["steps"] == b["steps"] == 25
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.34)  # float rounding may flip one image of 300
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    init = torch.load(trial / "checkpoints/init.pt", weights_only=True)
    single_init = torch.load(tmp_path / "single/checkpoints/init.pt", weights_only=True)
    assert all(torch.equal(init[k], single_init[k]) for k in init)
    weights = torch.load(trial / "levels/level_01/weights.pt", weights_only=True)
    single = torch.load(tmp_path / "single/levels/level_01/weights.pt", weights_only=True)
    assert max((weights[k] - single[k]).abs().max().item() for k in weights) < 1e-4
    assert weights["hidden.0.weight"].untyped_storage().nbytes() == weights["hidden.0.weight"].numel() * 4, \
        "a run's weights are saved on their own, not with the other runs' stacked storage"

    # a crash after trial 0 saved level 1 but before trial 1 did: the rerun redoes only trial 1's level 1
    stamp = (tmp_path / "k/trial_0/levels/level_01/result.json").stat().st_mtime_ns
    (trial / "levels/level_01/result.json").unlink()
    run(["trials=2", "seed=3"], tmp_path / "k", data_root, cache_dir)
    assert (tmp_path / "k/trial_0/levels/level_01/result.json").stat().st_mtime_ns == stamp
    assert without_timing(read_levels_csv(trial / "levels.csv")) == without_timing(k_rows)
