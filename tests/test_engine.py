"""The engine's step against the eager reference loop, its in-place reuse across levels, and trials=K.

The engine's step logic runs eagerly on the CPU (only the CUDA-graph capture needs a GPU;
tests/test_engine_gpu.py checks that part), so everything here runs on real MNIST slices.
"""

from __future__ import annotations

import copy

import pytest
import torch

import graph_stand_in
from helpers import mnist_slice, pruned_model
from qprune.algebra import Algebra
from qprune.engine import Engine, resolve_engine
from qprune.errors import ConfigError
from qprune.pruning import Masks, PruneSettings, prunable_weights, prune
from qprune.training import TrainSettings, autocast, set_precision, train_level


@pytest.fixture(scope="module")
def data(mnist):
    return mnist_slice(mnist)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||a - b|| / ||b|| over all parameters together."""
    diff = torch.cat([(p - q).flatten() for p, q in zip(a.parameters(), b.parameters())])
    return (diff.norm() / torch.cat([q.flatten() for q in b.parameters()]).norm()).item()


def rounding_tolerance(steps: int, reduction: int, dtype: torch.dtype = torch.float32) -> float:
    """How far two float computations of the same training may drift apart, relative to the weights.

    A sum of ``reduction`` products rounds to within about sqrt(reduction) * eps (relative) whatever
    the summation order (threads, vmap's batched kernels); an optimizer step carries that relative
    error into the update, and ``steps`` steps add at most ``steps`` such errors. Independent of the
    thread count; a real bug (another seed's data, a wrong mask) moves the weights by percents.
    """
    return steps * reduction**0.5 * torch.finfo(dtype).eps


@pytest.mark.parametrize("algebra", ["real3", "quat"])
@pytest.mark.parametrize("optimizer,drop_last", [("adam", False), ("sgd", False), ("adam", True)])
def test_engine_step_equals_the_eager_loop(data, algebra, optimizer, drop_last):
    settings = TrainSettings(optimizer=optimizer, lr=1e-3 if optimizer == "adam" else 0.05, weight_decay=1e-4,
                             epochs=2, drop_last=drop_last)
    reference, masks, names = pruned_model(algebra, 0)
    model = copy.deepcopy(reference)
    eager = train_level(reference, data, masks, settings, torch.Generator().manual_seed(3))
    fast = Engine([model], data, settings, names).train_level([masks], [torch.Generator().manual_seed(3)])[0]

    assert fast.steps == eager.steps == (20 if drop_last else 22)  # the partial batch of 20 is a step of its own
    assert max_difference(model, reference) < 1e-6
    assert [e.test_acc for e in fast.epochs] == [e.test_acc for e in eager.epochs]
    assert [e.train_loss for e in fast.epochs] == pytest.approx([e.train_loss for e in eager.epochs], rel=1e-5)
    assert fast.test_acc > 60  # two epochs on 620 images reach well above chance
    params = dict(model.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in masks.items())


def test_max_steps_stops_inside_an_epoch(data):
    settings = TrainSettings(lr=1e-3, epochs=3, max_steps=13)
    reference, masks, names = pruned_model("quat", 1)
    model = copy.deepcopy(reference)
    eager = train_level(reference, data, masks, settings, torch.Generator().manual_seed(0))
    fast = Engine([model], data, settings, names).train_level([masks], [torch.Generator().manual_seed(0)])[0]
    assert fast.steps == eager.steps == 13 and len(fast.epochs) == len(eager.epochs) == 2
    assert max_difference(model, reference) < 1e-6


def test_levels_reuse_the_engine_in_place(data):
    """Level 1 on an engine that already trained level 0 equals level 1 on a fresh one; nothing is reallocated."""
    settings = TrainSettings(lr=1e-3, epochs=1)
    model, masks, names = pruned_model("quat", 2, rate=0.2)
    init = copy.deepcopy(model.state_dict())
    engine = Engine([model], data, settings, names)
    engine.train_level([masks], [torch.Generator().manual_seed(0)])
    tensors = [id(t) for t in (*engine.params.values(), *engine.masks)]
    state = [id(v) for s in engine.optimizer.state.values() for v in s.values()]

    weights = prunable_weights(model)
    masks_1 = prune(model, masks, weights, PruneSettings(rate=0.2))  # from level 0's trained weights
    model.load_state_dict(init)                                    # rewind in place
    masks_1.apply_(model)
    fresh = copy.deepcopy(model)
    engine.train_level([masks_1], [torch.Generator().manual_seed(1)])
    Engine([fresh], data, settings, names).train_level([masks_1], [torch.Generator().manual_seed(1)])

    assert max_difference(model, fresh) < 1e-6
    assert [id(t) for t in (*engine.params.values(), *engine.masks)] == tensors
    assert [id(v) for s in engine.optimizer.state.values() for v in s.values()] == state
    params = dict(model.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in masks_1.items())
    assert masks_1.kept() < masks.kept()


@pytest.mark.parametrize("algebra", ["real3", "quat"])
def test_trials_match_separate_runs(data, algebra):
    """K runs in one batched step: each equals the single run with its seed (init, data order, masks)."""
    settings = TrainSettings(lr=1e-3, epochs=2)
    runs = [pruned_model(algebra, seed, rate=0.3 + 0.1 * seed) for seed in range(3)]
    separate = [copy.deepcopy(model) for model, _, _ in runs]
    names = runs[0][2]
    engine = Engine([model for model, _, _ in runs], data, settings, names)
    together = engine.train_level([m for _, m, _ in runs], [torch.Generator().manual_seed(10 + k) for k in range(3)])

    for k, ((model, masks, _), alone) in enumerate(zip(runs, separate)):
        result = train_level(alone, data, masks, settings, torch.Generator().manual_seed(10 + k))
        # vmap's batched matmuls round differently from addmm (and both with the thread count):
        # equal up to float rounding, not bitwise. 22 steps, sums over up to 784 inputs.
        assert relative_difference(model, alone) < rounding_tolerance(result.steps, 784), f"run {k}"
        assert together[k].test_acc == pytest.approx(result.test_acc, abs=0.34)  # at most one of 300 images
        assert together[k].epochs[-1].train_loss == pytest.approx(result.epochs[-1].train_loss, rel=1e-4)
        params = dict(model.named_parameters())
        assert all((params[n][~m] == 0).all() for n, m in masks.items()), f"run {k} has pruned weights that moved"
    accuracies = [r.test_acc for r in together]
    assert len(set(accuracies)) > 1, "the runs are independent (different seeds), not copies"


def test_trial_models_are_views_of_the_stacked_weights(data):
    models = [pruned_model("real3", seed)[0] for seed in range(2)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    engine = Engine(models, data, TrainSettings(epochs=1), ["hidden.0.weight"])
    stacked = engine.params["hidden.0.weight"]
    assert stacked.shape == (2, 300, 784)
    for k, model in enumerate(models):
        assert all(torch.equal(model.state_dict()[n], before[k][n]) for n in before[k])
        assert model.hidden[0].weight.data_ptr() == stacked[k].data_ptr()
    with torch.no_grad():
        models[1].load_state_dict(before[0])  # a rewind writes into the engine's tensors
    assert torch.equal(stacked[1], before[0]["hidden.0.weight"])


def test_bf16_autocast_and_tf32_switches():
    set_precision("fp32")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    set_precision("tf32")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    set_precision("fp32")
    layer = torch.nn.Linear(8, 4)
    with autocast("bf16", torch.device("cpu")):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_bf16_training_runs_close_to_fp32(data):
    fp32, masks, names = pruned_model("quat", 4)
    bf16 = copy.deepcopy(fp32)
    a = Engine([fp32], data, TrainSettings(lr=1e-3, epochs=1), names).train_level([masks], [torch.Generator().manual_seed(0)])[0]
    b = Engine([bf16], data, TrainSettings(lr=1e-3, epochs=1, precision="bf16"), names).train_level(
        [masks], [torch.Generator().manual_seed(0)])[0]
    assert 0 < max_difference(fp32, bf16) < 5e-3  # bf16 rounding, not a different training
    assert abs(a.test_acc - b.test_acc) < 5


def test_engine_choice():
    cpu = torch.device("cpu")
    assert resolve_engine("auto", cpu) == "eager" and resolve_engine("eager", cpu) == "eager"
    assert resolve_engine("auto", torch.device("cuda")) == "graph"
    with pytest.raises(ConfigError, match="train.engine=graph needs a CUDA device"):
        resolve_engine("graph", cpu)
    with pytest.raises(ConfigError, match="train.precision must be one of fp32, tf32, bf16"):
        TrainSettings(precision="fp16")


@pytest.mark.parametrize("algebra", ["quat", pytest.param(Algebra("phm", n=4), id="phm4")])
def test_graph_orchestration_with_stand_in_graphs(data, monkeypatch, algebra):
    """The graph path's bookkeeping, on the CPU: warm-up undone, one graph per batch shape, reuse across levels.

    (The captured kernels themselves are checked on a GPU by tests/test_engine_gpu.py.)
    """
    stand_in = graph_stand_in.install(monkeypatch)
    settings = TrainSettings(lr=1e-3, epochs=2)
    model, masks, names = pruned_model(algebra, 5)
    init = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model)
    engine = Engine([model], data, settings, names, graph=True)
    first = engine.train_level([masks], [torch.Generator().manual_seed(0)])[0]
    train_level(reference, data, masks, settings, torch.Generator().manual_seed(0))
    assert sorted(engine._graphs) == [20, 60] and first.engine == "graph"
    assert max_difference(model, reference) < 1e-6, "the warm-up and check steps before training leave no trace"
    assert stand_in.replays == 4 + 2 * 11  # the check's (3 full batches, the last one), then 2 epochs

    graphs = dict(engine._graphs)
    masks_1 = prune(model, masks, prunable_weights(model), PruneSettings(rate=0.2))
    model.load_state_dict(init)
    masks_1.apply_(model)
    reference.load_state_dict(model.state_dict())
    engine.train_level([masks_1], [torch.Generator().manual_seed(1)])
    train_level(reference, data, masks_1, settings, torch.Generator().manual_seed(1))
    assert engine._graphs == graphs, "captured once per run, not per level"
    assert len(stand_in.captures) == 2 and stand_in.replays == 4 + 4 * 11
    assert max_difference(model, reference) < 1e-6


def test_trials_keep_batch_norm_statistics_per_run(data):
    """Batch-norm running statistics are state of each run: stacked with the weights, updated per run."""
    from torch import nn

    def model(seed):  # no conv bias before the norm: its true gradient is 0, so Adam would amplify rounding noise
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 13 * 13, 10))

    settings = TrainSettings(lr=1e-3, epochs=1)
    runs = [model(seed) for seed in range(2)]
    alone = [copy.deepcopy(m) for m in runs]
    names = ["0.weight", "4.weight"]
    masks = [Masks({n: torch.rand_like(m.get_parameter(n)) > 0.3 for n in names}) for m in runs]
    for m, a, mask in zip(runs, alone, masks):
        mask.apply_(m)
        mask.apply_(a)
    Engine(runs, data, settings, names).train_level(masks, [torch.Generator().manual_seed(k) for k in range(2)])
    for k, (m, a) in enumerate(zip(runs, alone)):
        train_level(a, data, masks[k], settings, torch.Generator().manual_seed(k))
        assert max_difference(m, a) < 1e-5
        torch.testing.assert_close(m[1].running_mean, a[1].running_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m[1].running_var, a[1].running_var, rtol=1e-4, atol=1e-6)
        assert m[1].num_batches_tracked.item() == a[1].num_batches_tracked.item() == 11
    assert not torch.equal(runs[0][1].running_mean, runs[1][1].running_mean)
