"""train.engine=auto falls back to the eager loop when the CUDA-graph step fails; train.engine=graph fails loudly.

The graphs are CPU stand-ins (tests/graph_stand_in.py) with injected faults: a capture that raises,
replays that raise, replay the wrong batch or produce NaNs. tests/test_engine_gpu.py checks on a GPU
that real graphs pass the check.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import graph_stand_in
from helpers import TINY, mnist_slice, pruned_model
from qprune.cli import config_dir
from qprune.engine import Engine
from qprune.fallback import FailSafeTrainer, describe
from qprune.graphs import GraphCheckError, disagreement
from qprune.runner import LevelRunner
from qprune.settings import Settings
from qprune.training import EagerTrainer, TrainSettings, train_level

CAPTURE_ERROR = "CUDA error: operation not permitted when stream is capturing"


@pytest.fixture(scope="module")
def data(mnist):
    return mnist_slice(mnist)


def next_batch(engine, run):
    """A wrong graph: it trains on the batch after the cursor's."""
    engine.cursor.copy_((engine.cursor + 1) % engine.steps_per_epoch)
    run()


def nan_weights(engine, run):
    run()
    with torch.no_grad():
        next(iter(engine.params.values())).fill_(math.nan)


def raising(engine, run):
    raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be reported later")


FAULTS = {
    "capture raises": (dict(capture_fault=RuntimeError(CAPTURE_ERROR)), f"RuntimeError: {CAPTURE_ERROR}"),
    "replay raises": (dict(replay_fault=raising), "RuntimeError: CUDA error: an illegal memory access was encountered"),
    "wrong batch": (dict(replay_fault=next_batch), "GraphCheckError: the graph step's loss differs from the eager step's"),
    "non-finite": (dict(replay_fault=nan_weights), "GraphCheckError: the graph step gives a non-finite loss"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_graph_step_falls_back_to_the_eager_loop(data, monkeypatch, caplog, fault):
    """Whatever fails, the level trains exactly as the eager loop would have from the same weights."""
    stand_in = graph_stand_in.install(monkeypatch)
    injected, cause = FAULTS[fault]
    for name, value in injected.items():
        setattr(stand_in, name, value)
    settings = TrainSettings(lr=1e-3, epochs=1)
    model, masks, names = pruned_model("quat", 0)
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="qprune"):
        trainer = FailSafeTrainer(lambda: Engine([model], data, settings, names, graph=True),
                                  lambda: EagerTrainer(model, data, settings), [model])
        result = trainer.train_level([masks], [torch.Generator().manual_seed(3)])[0]
        trainer.train_level([masks], [torch.Generator().manual_seed(4)])  # a second level: no second warning
    expected = train_level(reference, data, masks, settings, torch.Generator().manual_seed(3))

    assert isinstance(trainer.trainer, EagerTrainer)
    assert result.engine.startswith(f"eager (fallback: {cause}")
    assert [e.train_loss for e in result.epochs] == [e.train_loss for e in expected.epochs]
    assert result.test_acc == expected.test_acc
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and cause in warnings[0] and "eager loop" in warnings[0]


def test_a_graph_that_passes_its_check_is_used(data, monkeypatch, caplog):
    stand_in = graph_stand_in.install(monkeypatch)
    settings = TrainSettings(lr=1e-3, epochs=1)
    model, masks, names = pruned_model("real3", 1)
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="qprune"):
        trainer = FailSafeTrainer(lambda: Engine([model], data, settings, names, graph=True),
                                  lambda: pytest.fail("no fallback expected"), [model])
        result = trainer.train_level([masks], [torch.Generator().manual_seed(3)])[0]
    expected = train_level(reference, data, masks, settings, torch.Generator().manual_seed(3))
    assert result.engine == "graph" and trainer.fallback is None and not caplog.records
    assert stand_in.replays == 4 + 11  # the check's steps, then the epoch's
    assert result.epochs[-1].train_loss == pytest.approx(expected.epochs[-1].train_loss, rel=1e-5)


@pytest.mark.parametrize("fault", ["capture raises", "wrong batch"])
def test_train_engine_graph_fails_loudly(data, monkeypatch, fault):
    stand_in = graph_stand_in.install(monkeypatch)
    for name, value in FAULTS[fault][0].items():
        setattr(stand_in, name, value)
    model, masks, names = pruned_model("quat", 2)
    engine = Engine([model], data, TrainSettings(lr=1e-3, epochs=1), names, graph=True)
    with pytest.raises(RuntimeError, match=CAPTURE_ERROR if fault == "capture raises" else "graph step's loss differs") as error:
        engine.train_level([masks], [torch.Generator().manual_seed(0)])
    assert isinstance(error.value, GraphCheckError) == (fault == "wrong batch")
    assert not engine._graphs, "graphs that failed their check are not kept"


def test_trials_fall_back_to_the_engines_eager_step(data, monkeypatch):
    """K runs: the fallback is the engine's eager step (train.engine=eager's choice for K > 1), from the same weights."""
    stand_in = graph_stand_in.install(monkeypatch)
    stand_in.replay_fault = next_batch
    settings = TrainSettings(lr=1e-3, epochs=1)
    runs = [pruned_model("quat", seed) for seed in (5, 6)]
    models, masks, names = [m for m, _, _ in runs], [m for _, m, _ in runs], runs[0][2]
    alone = [copy.deepcopy(m) for m in models]
    trainer = FailSafeTrainer(lambda: Engine(models, data, settings, names, graph=True),
                              lambda: Engine(models, data, settings, names), models)
    results = trainer.train_level(masks, [torch.Generator().manual_seed(k) for k in range(2)])
    assert isinstance(trainer.trainer, Engine) and not trainer.trainer.graph
    assert all(r.engine.startswith("eager (fallback: GraphCheckError") for r in results)
    expected = Engine(alone, data, settings, names).train_level(masks, [torch.Generator().manual_seed(k) for k in range(2)])
    for k in range(2):
        assert all(torch.equal(p, q) for p, q in zip(models[k].parameters(), alone[k].parameters())), f"run {k}"
        assert results[k].test_acc == expected[k].test_acc


def run_tiny(overrides, run_dir, data_root, cache_dir):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, "algebra=quat", *overrides, f"data.root={data_root}",
                                           f"data.cache={cache_dir}"])
    return LevelRunner(Settings.from_config(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True)).run()


def test_the_runs_files_record_the_fallback(data_root, cache_dir, tmp_path, monkeypatch, caplog):
    """A whole run with train.engine=auto whose capture fails: one warning, the eager run's numbers, the cause on disk."""
    eager = run_tiny(["train.engine=eager"], tmp_path / "eager", data_root, cache_dir)
    stand_in = graph_stand_in.install(monkeypatch)  # 'a GPU' from here on
    stand_in.capture_fault = RuntimeError(CAPTURE_ERROR)
    with caplog.at_level(logging.WARNING, logger="qprune"):
        rows = run_tiny([], tmp_path / "auto", data_root, cache_dir)

    fallback = f"eager (fallback: RuntimeError: {CAPTURE_ERROR})"
    assert [r["engine"] for r in rows] == [fallback, fallback] and [r["engine"] for r in eager] == ["eager", "eager"]
    timing = ("train_seconds", "engine")
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows] == \
        [{k: v for k, v in r.items() if k not in timing} for r in eager]
    levels = json.loads((tmp_path / "auto/levels.json").read_text())["levels"]
    assert [r["engine"] for r in levels] == [fallback, fallback]
    assert json.loads((tmp_path / "auto/levels/level_01/result.json").read_text())["row"]["engine"] == fallback
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_the_check_compares_loss_and_update_within_the_precisions_tolerance():
    start = [torch.zeros(4, 3)]
    eager = (torch.tensor([[2.0], [1.9]]), [torch.full((4, 3), 0.01)])
    assert disagreement(start, eager, copy.deepcopy(eager), 1, "fp32") is None
    loss_off = (torch.tensor([[2.0], [1.9 * 1.02]]), eager[1])  # 2% apart: beyond fp32's tolerance, within bf16's
    assert "loss differs" in disagreement(start, eager, loss_off, 1, "fp32")
    assert disagreement(start, eager, loss_off, 1, "bf16") is None
    # the update of 0.01 per weight; one weight in 12 moved the other way: |apart| / |moved| = 0.02 / (0.01 * sqrt 12)
    update = [torch.full((4, 3), 0.01)]
    update[0][0, 0] = -0.01
    assert "0.58x the eager update" in disagreement(start, eager, (eager[0], update), 1, "fp32")
    nan = (torch.tensor([[2.0], [math.nan]]), eager[1])
    assert "non-finite" in disagreement(start, eager, nan, 1, "fp32")
    assert disagreement(start, nan, nan, 1, "fp32") is None, "a diverging training is not the graph's fault"
    # K runs are judged one by one: run 1 alone off by 0.58x
    two = [torch.full((2, 4, 3), 0.01)]
    off = [two[0].clone()]
    off[0][1, 0, 0] = -0.01
    losses = torch.tensor([[2.0, 2.1]])
    assert "0.58x" in disagreement([torch.zeros(2, 4, 3)], (losses, two), (losses, off), 2, "fp32")


def test_causes_fit_one_line():
    assert describe(RuntimeError("CUDA error: x\nmore text")) == "RuntimeError: CUDA error: x"
    assert describe(MemoryError()) == "MemoryError"
    assert len(describe(ValueError("y" * 500))) == 200
