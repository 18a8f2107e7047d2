"""Past one process: small multiruns through submitit (local executor) and joblib, aggregated at the end;
the experiment and launcher configs compose into valid runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from helpers import TINY, run_qprune
from qprune.cli import config_dir
from qprune.reporting import read_levels_csv
from qprune.settings import Settings


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def the_sweep(cwd: Path) -> Path:
    (sweep_dir,) = (cwd / "outputs" / "multirun").iterdir()
    return sweep_dir


def test_submitit_local_runs_each_job_in_its_own_process(data_root, cache_dir, tmp_path):
    result = run_qprune(["-m", "hydra/launcher=local", *TINY, "algebra=real3", "seed=0,1", "logger=csv",
                         "hydra.launcher.timeout_min=10"], data_root, cache_dir, tmp_path, OMP_NUM_THREADS="1")
    sweep_dir = the_sweep(tmp_path)
    jobs = sorted(sweep_dir.glob("*/levels.csv"))
    assert [p.parent.name.split("-")[0] for p in jobs] == ["0", "1"]
    # submitit's job folders (named by the job's id, its process id here): each log is one job's run
    ran = set()
    for log_file in (sweep_dir / ".submitit").glob("*/*_0_log.out"):
        text = log_file.read_text()
        assert f"JobEnvironment(job_id={log_file.parent.name}," in text
        (line,) = [line for line in text.splitlines() if "results in" in line]
        ran.add(line.split("results in ")[1].strip())
    assert ran == {str(job.parent) for job in jobs}
    means = read_csv(sweep_dir / "sweep_mean.csv")
    assert [(m["curve"], m["runs"]) for m in means] == [("real3", "2"), ("real3", "2")]
    for m in means:
        values = [read_levels_csv(job)[int(m["level"])]["test_acc"] for job in jobs]
        assert float(m["test_acc_mean"]) == pytest.approx(sum(values) / 2, abs=1e-4)
        assert float(m["test_acc_std"]) == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=1e-4)
    assert "sweep: 2 runs, 1 curves" in result.stdout + result.stderr


def test_joblib_sweep_over_pruning_rates(data_root, cache_dir, tmp_path):
    run_qprune(["-m", "hydra/launcher=parallel", *TINY, "algebra=real3", "prune.rate=0.2,0.5", "logger=csv"],
               data_root, cache_dir, tmp_path)
    sweep_dir = the_sweep(tmp_path)
    means = read_csv(sweep_dir / "sweep_mean.csv")
    assert [(m["curve"], m["level"], m["runs"], float(m["prunable_remaining"])) for m in means] == [
        ("prune.rate=0.2", "0", "1", 1.0), ("prune.rate=0.2", "1", "1", 0.8),
        ("prune.rate=0.5", "0", "1", 1.0), ("prune.rate=0.5", "1", "1", 0.5),
    ]
    for m in means:
        (job,) = [p for p in sweep_dir.glob("*/levels.csv") if (p.parent / "levels.json").read_text().count(f'"rate": {m["prune.rate"]}')]
        assert float(m["test_acc_mean"]) == read_levels_csv(job)[int(m["level"])]["test_acc"]
        assert m["test_acc_std"] == "", "one run: no std"
    assert len(read_csv(sweep_dir / "sweep.csv")) == 4


EXPERIMENTS = {  # the original study's model/dataset pairs
    "lenet_mnist": ("lenet_300_100", "mnist", ["real3", "quat"]),
    "conv2_cifar10": ("conv2", "cifar10", ["real3", "real4", "quat"]),
    "conv4_cifar10": ("conv4", "cifar10", ["real3", "real4", "quat"]),
    "conv6_cifar10": ("conv6", "cifar10", ["real3", "real4", "quat"]),
    "conv4_cifar100": ("conv4", "cifar100", ["real3", "real4", "quat"]),
    "conv6_cifar100": ("conv6", "cifar100", ["real3", "real4", "quat"]),
}


def test_every_experiment_sweeps_valid_runs():
    sweeps = [p.stem for p in (config_dir() / "experiment").glob("*.yaml") if p.stem != "smoke"]  # smoke: a preset, no sweep
    assert sorted(sweeps) == sorted(EXPERIMENTS)
    for name, (model, dataset, algebras) in EXPERIMENTS.items():
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
            params = cfg.hydra.sweeper.params
            assert params.algebra.split(",") == algebras and params.seed == "0,1,2"
            assert f"/multirun/{name}-" in cfg.hydra.sweep.dir
            for algebra in algebras:  # (the seed cannot make a run invalid)
                job = compose("config", overrides=[f"experiment={name}", f"algebra={algebra}", "seed=2"])
                s = Settings.from_config(job)
                assert (s.model, s.dataset.name, s.algebra.name, s.seed) == (model, dataset, algebra, 2)


def test_launcher_configs_extend_the_plugins():
    expected = {
        "slurm": ("SlurmLauncher", {"gpus_per_node": 1, "max_num_timeout": 3, "timeout_min": 720}),
        "local": ("LocalLauncher", {"gpus_per_node": 1, "timeout_min": 4320}),
        "parallel": ("JoblibLauncher", {"n_jobs": 2}),
    }
    for name, (target, values) in expected.items():
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith(target)
        assert {k: launcher[k] for k in values} == values


def test_a_failing_job_does_not_stop_the_sweep(data_root, cache_dir, tmp_path):
    """A sweep with an invalid job is refused before anything runs. A job that fails while running
    (job 0: its data is missing) does not stop the others: job 1 still runs, and the sweep files,
    written as each job ends, hold it although Hydra stops with the failure at the end.
    (logger=csv: no W&B files even where W&B would log.)"""
    invalid = run_qprune(["-m", *TINY, "algebra=real4,real3"], data_root, cache_dir, tmp_path, check=False)
    assert invalid.returncode == 2 and not (tmp_path / "outputs").exists()
    assert invalid.stderr.startswith("qprune: error: job 0 (") and "algebra=real4 appends a grayscale channel to RGB" in invalid.stderr
    result = run_qprune(["-m", *TINY, "train.max_steps=5", "prune.levels=0", "algebra=real3", "logger=csv",
                         "data.download=false", f"data.root={tmp_path / 'missing'},{data_root}"],
                        data_root, cache_dir, tmp_path, check=False, WANDB_MODE="offline")
    assert result.returncode != 0
    assert "qprune: error: mnist not found under data.root=" in result.stderr
    sweep_dir = the_sweep(tmp_path)
    (job,) = sweep_dir.glob("*/levels.csv")
    assert job.parent.name.startswith("1-lenet_300_100-real3-")
    rows = read_csv(sweep_dir / "sweep.csv")
    assert [(r["algebra.name"], r["level"]) for r in rows] == [("real3", "0")]
    assert (job.parent / "training_curves.png").is_file()
    assert not list(sweep_dir.rglob("wandb")), "logger=csv writes local files only"
