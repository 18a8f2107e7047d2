"""What a captured CUDA-graph step must not do, checked on the CPU (docs/architecture.md, "The captured step").

- no host syncs, random numbers, data-dependent shapes or tensors made from host data in the step,
  for every model family and algebra (an audit of the step's aten ops);
- every tensor the step reads stays where the capture found it through whole runs (levels, rewinds,
  baselines, protocol=paper's optimizer state carried between rounds and into phase B, trials): the stand-in graphs check addresses;
- the capture sees training mode, the run's precision switches and cuDNN autotuning; bf16 autocast
  keeps no weight cache; changed optimizer hyperparameters are refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import graph_stand_in
from helpers import TINY
from qprune import build_model
from qprune.algebra import Algebra
from qprune.cli import config_dir
from qprune.data import RawSplits, device_data
from qprune.engine import Engine
from qprune.pruning import Masks, prunable_weights
from qprune.runner import LevelRunner
from qprune.settings import Settings
from qprune.training import TrainSettings, autocast

aten = torch.ops.aten


class GraphHazards(TorchDispatchMode):
    """Records the aten ops that a captured step cannot contain, with why."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if func is aten._local_scalar_dense.default:
            self.found.append(f"host sync: {name} (.item(), bool() or int() of a tensor)")
        elif torch.Tag.nondeterministic_seeded in func.tags:
            self.found.append(f"random numbers: {name}")
        elif func in (aten.lift_fresh.default, aten.lift_fresh_copy.default):
            self.found.append(f"a tensor from host data: {name} (torch.tensor(...))")
        elif torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags:
            boolean = any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                          for a in (*args, *(args[1] if func is aten.index.Tensor else [])) if a is not None)
            if func is not aten.index.Tensor or boolean:
                self.found.append(f"data-dependent shape: {name}")
        return func(*args, **kwargs)


def test_the_audit_finds_each_hazard():
    x = torch.randn(8)
    with GraphHazards() as audit:
        x.sum().item()
        if x.sum() > 0:
            pass
        torch.tensor([1.0, 2.0])
        torch.rand(3)
        x.nonzero()
        x[x > 0]
        x[torch.tensor([0, 2])]  # integer indexing: only the torch.tensor is a hazard
        torch.eye(3) + x.sum()   # device-side factories are fine
    kinds = [f.split(":")[0] for f in audit.found]
    assert kinds == ["host sync", "host sync", "a tensor from host data", "random numbers", "data-dependent shape",
                     "data-dependent shape", "a tensor from host data"]


@pytest.fixture(scope="module")
def rgb(mnist):
    """64 MNIST digits as 32x32 RGB images (real images through the convnets; [R, G, B, gray] for quat)."""
    x = F.pad(mnist.train_x[:64], (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    raw = RawSplits(x, mnist.train_y[:64], x[:16], mnist.train_y[:16], mnist.classes, "mnist as rgb")
    return {gray: device_data(raw, torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, add_gray=gray,
                              augment="crop_flip") for gray in (False, True)}


@pytest.fixture(scope="module")
def flat(mnist):
    raw = RawSplits(mnist.train_x[:64], mnist.train_y[:64], mnist.test_x[:16], mnist.test_y[:16], mnist.classes, "mnist")
    return device_data(raw, torch.device("cpu"), mean=(0.1307,), std=(0.3081,), add_gray=False)


STEPS = [  # model, algebra, runs, precision
    ("lenet_300_100", "real3", 1, "fp32"), ("lenet_300_100", "quat", 1, "fp32"), ("lenet_300_100", "quat", 2, "fp32"),
    ("conv4", "real3", 1, "bf16"), ("conv4", "quat", 1, "fp32"), ("conv4", "quat", 1, "bf16"), ("conv2", "real4", 2, "fp32"),
    ("resnet20", "real3", 1, "fp32"), ("resnet20", "quat", 1, "fp32"), ("resnet20", "quat-whiten", 1, "fp32"),
    ("resnet20", "quat", 2, "fp32"), ("mobilenet", "quat", 1, "fp32"),
]


@pytest.mark.parametrize("name,algebra,runs,precision", STEPS)
def test_the_step_has_no_graph_hazards(flat, rgb, name, algebra, runs, precision):
    """Forward, loss, backward, gradient masks and the step's bookkeeping. (The optimizer step is
    torch's: a capturable or fused optimizer is capture-safe, and torch refuses to capture one that is not.)"""
    algebra = Algebra("quat", qbn="whiten") if algebra == "quat-whiten" else Algebra(algebra)
    data = flat if name.startswith("lenet") else rgb[algebra.adds_gray]
    models = []
    for seed in range(runs):
        torch.manual_seed(seed)
        models.append(build_model(name, algebra, 10, data.image_shape))
    weights = prunable_weights(models[0])
    engine = Engine(models, data, TrainSettings(batch_size=4, epochs=1, precision=precision), [w.name for w in weights])
    engine._load_epoch([torch.Generator().manual_seed(k) for k in range(runs)])
    engine.optimizer.step = lambda: None
    engine._step(4)  # a first step outside the audit: lazily built tables and caches
    with GraphHazards() as audit:
        engine._step(4)
    assert audit.found == []


def run_tiny(overrides, run_dir, data_root, cache_dir):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, "algebra=quat", *overrides, f"data.root={data_root}",
                                           f"data.cache={cache_dir}"])
    return LevelRunner(Settings.from_config(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True)).run()


@pytest.mark.parametrize("overrides", [
    ["prune.levels=2", "prune.rewind=3it", "baselines=[random_reinit,random_prune]"],
    ["protocol=paper", "protocol.mask_epochs=2", "prune.levels=2", "protocol.phase_b_optimizer=carry",
     "protocol.stop_below=null"],
    ["trials=2"],
], ids=["lth-rewind-baselines", "paper-carry", "trials"])
def test_nothing_the_step_reads_moves_during_a_run(data_root, cache_dir, tmp_path, monkeypatch, overrides):
    """Every replay of a whole run finds weights, masks, optimizer state and data buffers where the capture
    did: rewinds, new masks, baselines and carried optimizer state all write in place."""
    stand_in = graph_stand_in.install(monkeypatch)
    rows = run_tiny([*overrides, "train.max_steps=6"], tmp_path / "run", data_root, cache_dir)
    assert {r["engine"] for r in rows} == {"graph"}, "the check passed: no fallback"
    assert len(stand_in.captures) == 2 and stand_in.replays >= 4 + 6 * 2  # the check's, then 2 levels at least


def test_the_stand_in_notices_a_reallocated_tensor(flat, monkeypatch):
    graph_stand_in.install(monkeypatch)
    torch.manual_seed(0)
    model = build_model("lenet_300_100", "quat")
    names = [w.name for w in prunable_weights(model)]
    engine = Engine([model], flat, TrainSettings(batch_size=8, epochs=1), names, graph=True)
    engine.prepare_graphs()
    engine.masks[0] = engine.masks[0].clone()  # what a level that replaced its masks would do
    with pytest.raises(graph_stand_in.MovedTensor, match=f"mask {names[0]}"):
        engine._run(8)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_the_capture_sees_training_mode_and_the_runs_switches(flat, monkeypatch, precision):
    stand_in = graph_stand_in.install(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    model.eval()  # e.g. evaluated before its first level
    engine = Engine([model], flat, TrainSettings(batch_size=8, epochs=1, precision=precision), ["1.weight"], graph=True)
    autotune = torch.backends.cudnn.benchmark
    engine.train_level([Masks({"1.weight": torch.ones(32, 784, dtype=torch.bool)})], [torch.Generator().manual_seed(0)])
    tf32 = precision == "tf32"
    assert stand_in.captures == [{"batch": 8, "training": True, "tf32": (tf32, tf32), "autotune": True}]
    assert torch.backends.cudnn.benchmark == autotune, "autotuning is on for the capture only"


def test_changed_optimizer_hyperparameters_are_refused(flat, monkeypatch):
    graph_stand_in.install(monkeypatch)
    torch.manual_seed(0)
    model = build_model("lenet_300_100", "real3")
    weights = prunable_weights(model)
    engine = Engine([model], flat, TrainSettings(batch_size=8, epochs=1), [w.name for w in weights], graph=True)
    masks = [Masks.ones(model, weights)]
    engine.train_level(masks, [torch.Generator().manual_seed(0)])
    engine.optimizer.param_groups[0]["lr"] *= 0.1  # a schedule would do this; the captured step cannot see it
    with pytest.raises(RuntimeError, match="hyperparameters changed after the CUDA-graph capture"):
        engine.train_level(masks, [torch.Generator().manual_seed(1)])


def test_bf16_autocast_keeps_no_weight_cache():
    """Autocast's cache would hold bf16 copies of the weights made during the capture: stale at every replay."""
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
