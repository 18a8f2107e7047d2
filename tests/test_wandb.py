"""W&B with no server: offline runs read back from disk, one run per job, failures never lose results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qprune.cli import config_dir
from qprune.errors import ConfigError
from qprune.reporting import RunInfo, read_levels_csv
from qprune.runner import LevelRunner
from qprune.settings import Settings
from qprune.training import EpochStats
from qprune.wandb_logger import WandbLogger, WandbSettings, resolve_mode
from wandb_offline import offline_runs

SYNC_HINT = "wandb sync"


@pytest.mark.parametrize("configured,environ,netrc,expected", [
    (None, {}, None, "offline"),                                    # no credentials: offline, with how to sync
    (None, {"WANDB_API_KEY": "k" * 40}, None, "online"),
    (None, {}, "machine api.wandb.ai login user password " + "k" * 40, "online"),   # `wandb login`
    (None, {}, "machine example.org login user password secret", "offline"),        # another host's key
    (None, {"WANDB_MODE": "disabled"}, None, "disabled"),
    (None, {"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}, None, "offline"),
    ("offline", {"WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40}, None, "offline"),  # the config beats the env
    ("disabled", {"WANDB_MODE": "online"}, None, "disabled"),
    ("online", {}, None, "offline"),                                # asked for online without a key: never prompts
])
def test_mode_comes_from_config_then_env_then_credentials(configured, environ, netrc, expected, tmp_path):
    netrc_file = tmp_path / "netrc"
    if netrc is not None:
        netrc_file.write_text(netrc + "\n")
    mode, note = resolve_mode(configured, {**environ, "NETRC": str(netrc_file)})
    assert mode == expected
    if expected == "offline" and configured != "offline" and environ.get("WANDB_MODE") != "offline":
        assert note is not None and SYNC_HINT in note and "\n" not in note
    else:
        assert note is None


def test_bad_modes_name_their_source():
    with pytest.raises(ConfigError, match="WANDB_MODE must be one of online, offline, disabled"):
        resolve_mode(None, {"WANDB_MODE": "sometimes"})
    with pytest.raises(ConfigError, match="logger.mode must be one of"):
        WandbSettings.from_config({"backend": "wandb", "mode": "sometimes"})


def test_two_jobs_of_one_process_are_two_finished_wandb_runs(basic_sweep):
    """The basic launcher runs every job in one process: each job must get (and finish) its own run."""
    sweep_dir, _ = basic_sweep
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "levels.csv").is_file())
    assert len(jobs) == 4
    run_ids = set()
    for job in jobs:
        (run,) = offline_runs(job / "wandb")
        run_ids.add(run.run_id)
        levels = json.loads((job / "levels.json").read_text())
        rows, config = read_levels_csv(job / "levels.csv"), levels["config"]
        assert run.exit_code == 0
        assert run.name == f"lenet_300_100-{config['algebra']['name']}-r0.2-s{config['seed']}"
        assert run.group == sweep_dir.name and run.job_type == "prune"
        assert run.config["seed"] == config["seed"] and run.config["algebra"]["name"] == config["algebra"]["name"]
        assert run.config["params"]["params_total"] == rows[0]["params_total"]
        # per epoch: the test accuracy the run directory holds, with its level and sparsity
        epochs = [h for h in run.history if "test/acc" in h]
        expected = [(int(level), e["test_acc"]) for level, es in levels["epochs"].items() for e in es]
        assert [(h["epoch/level"], h["test/acc"]) for h in epochs] == expected
        assert [h["sparsity/pct_of_real"] for h in epochs] == [r["pct_of_real"] for r in rows]
        # per level, plotted against % of real parameters
        per_level = [h for h in run.history if "level/test_acc" in h]
        assert [(h["level/pct_of_real"], h["level/test_acc"]) for h in per_level] == [(r["pct_of_real"], r["test_acc"]) for r in rows]
        assert run.metrics["level/test_acc"] == "level/pct_of_real"
        # at the end: the levels table (written beside the offline run) and a summary
        (table,) = (job / "wandb").rglob("levels_*.table.json")
        data = json.loads(table.read_text())
        assert [dict(zip(data["columns"], d))["test_acc"] for d in data["data"]] == [r["test_acc"] for r in rows]
        assert run.summary["final_test_acc"] == rows[-1]["test_acc"] and run.summary["levels_finished"] == 2
        assert (job / "training_curves.png").stat().st_size > 10_000
        images = sorted(p.name.split("_")[0] for p in (job / "wandb").rglob("media/images/plots/*.png"))
        assert images == ["accuracy", "layer", "training"], "the run's three plots are on its dashboard"
    assert len(run_ids) == 4, "a job's W&B run leaked into the next job"
    # the sweep's summary run, in the same group
    (summary,) = offline_runs(sweep_dir / "wandb")
    assert summary.job_type == "aggregate" and summary.group == sweep_dir.name and summary.exit_code == 0
    (logged,) = [h for h in summary.history if "sweep_mean/nrows" in h]
    assert logged["sweep_mean/nrows"] == 4  # 2 curves x 2 levels


def test_without_credentials_one_line_says_how_to_sync_later(basic_sweep):
    _, result = basic_sweep
    lines = (result.stdout + result.stderr).splitlines()
    notes = [line for line in lines if "W&B: no credentials" in line]
    assert len(notes) == 1, "once per process, not once per job"
    assert "logging offline" in notes[0] and "wandb sync" in notes[0]
    # quiet: none of W&B's own banners, one line per run (and one for the sweep's summary) from qprune
    assert not [line for line in lines if line.startswith("wandb:")]
    assert len([line for line in lines if "W&B run " in line and "(offline): " in line]) == 4
    assert len([line for line in lines if "W&B sweep summary run " in line]) == 1


def written(folder: Path):
    """The offline runs under ``folder`` once W&B's writer process has flushed them (in this process,
    ``run.finish`` may return before it has; a CLI run flushes when it exits)."""
    import wandb

    wandb.teardown()
    return offline_runs(folder)


def _info(tmp_path: Path, name: str) -> RunInfo:
    return RunInfo(tmp_path / name, name, name, {"seed": 0, "model": {"name": "lenet_300_100"}}, {"params_total": 10}, "test")


def _record(level: int, acc: float) -> dict:
    row = {"level": level, "prunable_remaining": 0.8**level, "params_nonzero": 10, "params_total": 10,
           "pct_of_real": 100 * 0.8**level, "test_acc": acc, "best_val_acc": None, "train_loss": 0.5,
           "epochs": 1, "steps": 3, "train_seconds": 0.1}
    return {"row": row, "epochs": [{"epoch": 1, "step": 3, "train_loss": 0.5, "test_acc": acc, "val_acc": None, "seconds": 0.1}]}


def test_a_failed_run_is_finished_as_failed_and_the_next_run_is_a_new_one(tmp_path):
    import wandb

    settings = WandbSettings(mode="offline")
    failed = WandbLogger(settings, group="g")
    failed.start(_info(tmp_path, "a"), [])
    failed.epoch(0, EpochStats(**_record(0, 50.0)["epochs"][0]), _record(0, 50.0)["row"])
    failed.finish([], RuntimeError("CUDA out of memory"))
    assert wandb.run is None
    # a resumed run re-logs the levels it finished before, so its W&B run shows the whole run
    resumed = WandbLogger(settings, group="g")
    resumed.start(_info(tmp_path, "b"), [_record(0, 60.0)])
    resumed.level(_record(1, 70.0), [])
    resumed.finish([_record(0, 60.0), _record(1, 70.0)], None)
    (a,), (b,) = written(tmp_path / "a"), written(tmp_path / "b")
    assert a.run_id != b.run_id and (a.exit_code, b.exit_code) == (1, 0)
    assert [h["test/acc"] for h in a.history if "test/acc" in h] == [50.0]
    assert [h["level/test_acc"] for h in b.history if "level/test_acc" in h] == [60.0, 70.0]
    assert [h["test/acc"] for h in b.history if "test/acc" in h] == [60.0]
    assert b.summary["status"] == "finished" and b.summary["final_test_acc"] == 70.0
    # started again with every level finished (a sweep rerun to resume it): no second W&B run
    again = WandbLogger(settings, group="g")
    info = _info(tmp_path, "b")
    info.levels = 2
    again.start(info, [_record(0, 60.0), _record(1, 70.0)])
    again.finish([_record(0, 60.0), _record(1, 70.0)], None)
    assert len(written(tmp_path / "b")) == 1


@pytest.fixture
def tiny_runner(data_root, tmp_path):
    """A LevelRunner for 2 levels of 5 steps on MNIST slices, with the W&B logger of ``logger.*``."""
    def make(*overrides: str) -> LevelRunner:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=["model=lenet_300_100", "algebra=quat", "train.max_steps=5", "prune.levels=1",
                                               "data.train_size=300", "data.test_size=200", "progress=none",
                                               f"data.root={data_root}", "data.download=false", *overrides])
        config = OmegaConf.to_container(cfg, resolve=True)
        logger = WandbLogger(WandbSettings.from_config(config["logger"]), group="test")
        return LevelRunner(Settings.from_config(cfg), tmp_path / "run", config, [logger])
    return make


def test_wandb_failing_mid_run_never_loses_the_results(tiny_runner, tmp_path, monkeypatch, caplog):
    import wandb.sdk.wandb_run

    def network_down(self, *args, **kwargs):
        raise ConnectionError("network is down")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", network_down)
    with caplog.at_level(logging.WARNING, logger="qprune"):
        rows = tiny_runner("logger.mode=offline").run()
    assert [r["level"] for r in rows] == [0, 1]
    assert [r["level"] for r in read_levels_csv(tmp_path / "run/levels.csv")] == [0, 1]
    assert (tmp_path / "run/training_curves.png").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("W&B:")]
    assert len(warnings) == 1 and "network is down" in warnings[0] and str(tmp_path / "run") in warnings[0]
    (run,) = written(tmp_path / "run/wandb")
    assert run.exit_code == 1 and run.history == []


def test_a_rejected_key_falls_back_to_offline(tiny_runner, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "bad-key")   # W&B refuses it before any network call
    with caplog.at_level(logging.WARNING, logger="qprune"):
        tiny_runner("logger.mode=online").run()
    assert any("going online failed" in r.getMessage() and SYNC_HINT in r.getMessage() for r in caplog.records)
    (run,) = written(tmp_path / "run/wandb")
    assert run.exit_code == 0 and [h["level/level"] for h in run.history if "level/level" in h] == [0, 1]


# --------------------------------------------------------------------------- W&B must never cost a run

def test_a_broken_wandb_install_turns_wandb_off_with_one_warning(data_root, cache_dir, tmp_path):
    """A `wandb` that fails on import (a broken install) must not stop the run: one warning, results written."""
    import os
    import sys

    from helpers import TINY, run_qprune

    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('protobuf does not match this wandb (a broken install)')\n")
    src = Path(__file__).resolve().parents[1] / "src"
    result = run_qprune([*TINY, "logger.mode=offline", f"hydra.run.dir={tmp_path / 'run'}"], data_root, cache_dir, tmp_path,
                        PYTHONPATH=os.pathsep.join([str(fake.parent), str(src), *sys.path[1:]]))
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "W&B" in line]
    assert len(warnings) == 1, warnings
    assert "`import wandb` failed" in warnings[0] and "broken install" in warnings[0] and "logger=csv" in warnings[0]
    assert [r["level"] for r in read_levels_csv(tmp_path / "run/levels.csv")] == [0, 1]
    assert not (tmp_path / "run/wandb").exists()


def test_a_failed_import_is_remembered_for_the_process(tmp_path, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
    with caplog.at_level(logging.WARNING, logger="qprune"):
        for name in ("a", "b"):
            logger = WandbLogger(WandbSettings(mode="offline"), group="g")
            logger.start(_info(tmp_path, name), [])
            logger.level(_record(0, 50.0), [])
            logger.finish([_record(0, 50.0)], None)
            assert logger.run is None
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("W&B: `import wandb` failed") and "import of wandb halted" in warning and str(tmp_path / "a") in warning


def test_an_unreachable_server_goes_offline_in_seconds_once_per_process(tmp_path, monkeypatch, caplog):
    """Online without a network used to wait ~91 s per run: a probe of a few seconds decides, once."""
    import socket
    import time

    import qprune.wandb_logger as wl

    attempts = []

    def no_route(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org:8443")
    with caplog.at_level(logging.WARNING, logger="qprune"):
        for name in ("a", "b"):
            start = time.perf_counter()
            logger = WandbLogger(WandbSettings(mode="online"), group="g")
            logger.start(_info(tmp_path, name), [])
            logger.level(_record(0, 50.0), [])
            logger.finish([_record(0, 50.0)], None)
            assert time.perf_counter() - start < 30, "bounded start-up"
    assert attempts == [(("wandb.example.org", 8443), wl.PROBE_SECONDS)], "probed once, with a timeout of a few seconds"
    assert wl.PROBE_SECONDS <= 5
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot reach wandb.example.org:8443" in warnings[0] and SYNC_HINT in warnings[0]
    for name in ("a", "b"):
        (run,) = written(tmp_path / name)
        assert run.exit_code == 0 and [h["level/test_acc"] for h in run.history if "level/test_acc" in h] == [50.0]


# --------------------------------------------------------------------------- one W&B run per qprune run

def test_a_resumed_and_extended_run_leaves_one_complete_offline_copy(tiny_runner, tmp_path):
    """Every session of a run logs under the same W&B id; offline, the newest copy is complete and the
    older ones are moved out of `wandb sync <run dir>/wandb/offline-run-*`'s way."""
    import hashlib

    tiny_runner("logger.mode=offline", "prune.levels=0").run()
    tiny_runner("logger.mode=offline", "prune.levels=1").run()     # extends the run by level 1
    (current,) = written(tmp_path / "run/wandb")
    (older,) = offline_runs(tmp_path / "run/wandb", superseded=True)
    identity = json.loads((tmp_path / "run/run.json").read_text())["identity"]
    run_id = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    assert current.run_id.startswith(run_id + "-") and older.run_id == current.run_id
    assert [h["level/level"] for h in current.history if "level/level" in h] == [0, 1], "the newest copy is complete"
    assert [h["level/level"] for h in older.history if "level/level" in h] == [0]
    assert current.summary["levels_logged"] == 2 and current.exit_code == 0


class FakeRun:
    """What a resumed online W&B run looks like to qprune: its summary holds what it has already."""

    def __init__(self, summary: dict):
        self.id, self.dir, self.url, self.offline, self.resumed = "r", "/tmp/x/files", "https://wandb.ai/e/qprune/runs/r", False, True
        self.summary, self.logged, self.exit_code = dict(summary), [], None

    def log(self, metrics):
        self.logged.append(metrics)

    def define_metric(self, *args, **kwargs):
        pass

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_a_resumed_online_run_logs_only_the_levels_it_lacks(tmp_path, monkeypatch):
    import qprune.wandb_logger as wl

    opened = []
    fake = FakeRun({"levels_logged": 1, "epoch/step": 1})

    def open_run(mode, directory, results, **init):
        opened.append((mode, init["id"]))
        return fake

    monkeypatch.setattr(wl, "open_run", open_run)
    monkeypatch.setattr(WandbLogger, "_log_results", lambda self, records, error: None)
    logger = WandbLogger(WandbSettings(mode="disabled"), group="g")
    logger.mode = "online"
    info = _info(tmp_path, "run")
    logger.start(info, [_record(0, 60.0), _record(1, 70.0)])     # level 0 is in the W&B run already
    logger.finish([_record(0, 60.0), _record(1, 70.0)], None)
    assert opened == [("online", wl.wandb_id(info.config, "g", info.run_dir))]
    assert [m["level/test_acc"] for m in fake.logged if "level/test_acc" in m] == [70.0]
    assert [(m["epoch/step"], m["test/acc"]) for m in fake.logged if "test/acc" in m] == [(2, 70.0)]
    assert fake.summary["levels_logged"] == 2 and fake.exit_code == 0
