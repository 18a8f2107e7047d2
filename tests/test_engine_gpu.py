"""The CUDA-graph engine against the same step run eagerly on the same GPU: `pytest -m gpu tests/test_engine_gpu.py`.

Skipped without CUDA. Imports no Hydra/OmegaConf, so it runs with only torch and torchvision installed.
GPU kernels (cuDNN autotuning, fused Adam) differ from the eager loop's in the last bits, and some
training runs amplify such bits (measured on the CPU: conv2/quat with seed 2 moves 2% away after 21
steps from a 1e-7 perturbation of its initialisation), so runs are compared by how far they moved:
the two updates must agree to within 10% of the update's size — a wrong batch, mask or optimizer
state gives differences of the update's own size.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qprune import build_model
from qprune.algebra import Algebra
from qprune.data import RawSplits, device_data
from qprune.engine import Engine
from qprune.pruning import Masks, PruneSettings, prunable_weights, prune
from qprune.quaternion import _block_gather, _block_gather_backward, _block_rows, _block_rows_backward
from qprune.training import TrainSettings, set_precision, train_level

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
MNIST = dict(mean=(0.1307,), std=(0.3081,), add_gray=False)
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SIZES = dict(train_size=1220, test_size=1000)  # 20 full batches of 60 and a last one of 20


@pytest.fixture(scope="module")
def mnist_gpu(mnist):
    return device_data(mnist, CUDA, **MNIST, **SIZES)


@pytest.fixture(scope="module")
def rgb_gpu(mnist):
    """MNIST digits as 32x32 RGB images: real images through the convnets, with crop + flip and a gray channel."""
    def rgb(x):
        return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)

    raw = RawSplits(rgb(mnist.train_x[:5000]), mnist.train_y[:5000], rgb(mnist.test_x[:2000]), mnist.test_y[:2000],
                    mnist.classes, "mnist as rgb")
    return device_data(raw, CUDA, **IMAGENET, add_gray=True, augment="crop_flip", **SIZES)


def pruned(name, algebra, seed, image=None):
    torch.manual_seed(seed)
    model = build_model(name, algebra, image_shape=image).to(CUDA)
    weights = prunable_weights(model)
    masks = prune(model, Masks.ones(model, weights), weights, PruneSettings(rate=0.5))
    masks.apply_(model)
    return model, masks, [w.name for w in weights]


def assert_same_update(start, a, b, tolerance=0.1):
    """Runs a and b, both from ``start``, moved the weights the same way (relative to how far they moved)."""
    moved = torch.cat([(p - p0).flatten() for p0, p in zip(start.parameters(), a.parameters())])
    apart = torch.cat([(p - q).flatten() for p, q in zip(a.parameters(), b.parameters())])
    assert all((p - p0).abs().max() > 0 for p0, p in zip(start.parameters(), a.parameters())), "every tensor trains"
    assert apart.norm() <= tolerance * moved.norm(), f"{apart.norm():.3g} apart after an update of {moved.norm():.3g}"


def generator(seed):
    return torch.Generator(device=CUDA).manual_seed(seed)


@pytest.mark.parametrize("name,algebra,optimizer", [
    ("lenet_300_100", "quat", "adam"), ("lenet_300_100", "real3", "sgd"), ("conv2", "quat", "adam"), ("conv2", "real4", "adam"),
    ("conv2", "complex", "adam"), pytest.param("lenet_300_100", Algebra("phm", n=4), "sgd", id="lenet_300_100-phm4-sgd"),
])
def test_graph_step_equals_eager_on_cuda(mnist_gpu, rgb_gpu, name, algebra, optimizer):
    data = mnist_gpu if name == "lenet_300_100" else rgb_gpu
    settings = TrainSettings(optimizer=optimizer, lr=1e-3 if optimizer == "adam" else 0.05, epochs=2)
    start, masks, names = pruned(name, algebra, 0, data.image_shape)
    graphed, engine_eager, reference = (copy.deepcopy(start) for _ in range(3))
    g = Engine([graphed], data, settings, names, graph=True).train_level([masks], [generator(1)])[0]
    e = Engine([engine_eager], data, settings, names).train_level([masks], [generator(1)])[0]
    r = train_level(reference, data, masks, settings, generator(1))
    assert g.steps == e.steps == r.steps == 42
    assert_same_update(start, graphed, engine_eager)
    assert_same_update(start, graphed, reference)
    assert abs(g.test_acc - r.test_acc) <= 1.0
    assert g.epochs[-1].train_loss == pytest.approx(r.epochs[-1].train_loss, rel=0.02)
    params = dict(graphed.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in masks.items())


def test_graphs_are_captured_once_and_reused_across_levels(mnist_gpu):
    settings = TrainSettings(lr=1e-3, epochs=1)
    model, masks, names = pruned("lenet_300_100", "quat", 2)
    init = copy.deepcopy(model.state_dict())
    engine = Engine([model], mnist_gpu, settings, names, graph=True)
    engine.train_level([masks], [generator(0)])
    graphs = dict(engine._graphs)
    assert sorted(graphs) == [20, 60]  # full batches and the last partial batch

    masks_1 = prune(model, masks, prunable_weights(model), PruneSettings(rate=0.2))
    model.load_state_dict(init)
    masks_1.apply_(model)
    start, fresh = copy.deepcopy(model), copy.deepcopy(model)
    engine.train_level([masks_1], [generator(1)])
    Engine([fresh], mnist_gpu, settings, names, graph=True).train_level([masks_1], [generator(1)])
    assert engine._graphs == graphs, "no recapture for a new level"
    assert_same_update(start, model, fresh)
    params = dict(model.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in masks_1.items())


@pytest.mark.parametrize("name", ["lenet_300_100", "conv2"])
def test_graphed_trials_match_separate_graphed_runs(mnist_gpu, rgb_gpu, name):
    data = mnist_gpu if name == "lenet_300_100" else rgb_gpu
    settings = TrainSettings(lr=1e-3, epochs=1)
    runs = [pruned(name, "quat", seed, data.image_shape) for seed in range(3)]
    starts = [copy.deepcopy(m) for m, _, _ in runs]
    alone = [copy.deepcopy(m) for m, _, _ in runs]
    together = Engine([m for m, _, _ in runs], data, settings, runs[0][2], graph=True).train_level(
        [m for _, m, _ in runs], [generator(10 + k) for k in range(3)])
    for k, ((model, masks, names), single) in enumerate(zip(runs, alone)):
        result = Engine([single], data, settings, names, graph=True).train_level([masks], [generator(10 + k)])[0]
        assert_same_update(starts[k], model, single)
        assert abs(together[k].test_acc - result.test_acc) <= 1.0
        params = dict(model.named_parameters())
        assert all((params[n][~m] == 0).all() for n, m in masks.items()), f"run {k}"


@pytest.mark.parametrize("name", ["lenet_300_100", "conv2"])
def test_bf16_graph_trains_like_fp32(mnist_gpu, rgb_gpu, name):
    data = mnist_gpu if name == "lenet_300_100" else rgb_gpu
    fp32, masks, names = pruned(name, "quat", 0, data.image_shape)
    bf16 = copy.deepcopy(fp32)
    a = Engine([fp32], data, TrainSettings(lr=2e-3, epochs=3), names, graph=True).train_level([masks], [generator(0)])[0]
    b = Engine([bf16], data, TrainSettings(lr=2e-3, epochs=3, precision="bf16"), names, graph=True).train_level(
        [masks], [generator(0)])[0]
    assert a.test_acc > 60 and b.test_acc > 60  # 63 steps on 1220 digits (chance: 10%)
    assert abs(a.test_acc - b.test_acc) < 10
    assert b.epochs[-1].train_loss == pytest.approx(a.epochs[-1].train_loss, rel=0.25)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())


def test_block_formulations_agree_on_cuda():
    torch.manual_seed(0)
    w = torch.randn(4, 32, 32 * 9, device=CUDA)  # (components, out, in x kernel)
    assert torch.equal(_block_gather(w).cpu(), _block_rows(w.cpu()))
    grad = torch.randn(4, 32, 4, 32 * 9, device=CUDA)
    torch.testing.assert_close(_block_gather_backward(grad).cpu(), _block_rows_backward(grad.cpu()))


def test_fp32_turns_tf32_off_for_matmuls_and_convolutions():
    torch.manual_seed(0)
    a, b = torch.randn(512, 512, device=CUDA), torch.randn(512, 512, device=CUDA)
    x, w = torch.randn(8, 64, 16, 16, device=CUDA), torch.randn(64, 64, 3, 3, device=CUDA)

    def errors():
        mm = (a @ b).double() - a.double() @ b.double()
        conv = F.conv2d(x, w, padding=1).double() - F.conv2d(x.double(), w.double(), padding=1)
        return mm.abs().max().item() / 512 ** 0.5, conv.abs().max().item() / 24.0

    set_precision("tf32")
    tf32 = errors()
    set_precision("fp32")
    fp32 = errors()
    assert fp32[0] < 1e-5 and fp32[1] < 1e-5, fp32
    assert tf32[0] > 10 * fp32[0], "TF32 matmuls are visibly less exact (so the switch does something)"


# ---------------------------------------------------------------------------------------------- the check and the fallback
@pytest.mark.parametrize("name,algebra,optimizer,precision,runs", [
    ("lenet_300_100", "quat", "adam", "fp32", 1), ("lenet_300_100", "real3", "sgd", "tf32", 1),
    ("lenet_300_100", "quat", "adam", "bf16", 3), ("conv2", "quat", "adam", "fp32", 1), ("conv2", "real4", "adam", "bf16", 1),
    ("conv2", "quat", "adam", "tf32", 3), ("resnet20", "quat", "sgd", "fp32", 1), ("resnet20", "real4", "sgd", "bf16", 1),
])
def test_real_graphs_pass_their_check(mnist_gpu, rgb_gpu, name, algebra, optimizer, precision, runs):
    """The check's tolerances hold for real captures: auto mode would keep the graphs (no false fallback)."""
    data = mnist_gpu if name == "lenet_300_100" else rgb_gpu
    models = [pruned(name, algebra, seed, data.image_shape)[0] for seed in range(runs)]
    names = pruned(name, algebra, 0, data.image_shape)[2]
    settings = TrainSettings(optimizer=optimizer, lr=1e-3 if optimizer == "adam" else 0.05, precision=precision)
    set_precision(precision)
    engine = Engine(models, data, settings, names, graph=True)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    engine.prepare_graphs()  # raises GraphCheckError if a replay disagrees with the eager step
    assert sorted(engine._graphs) == [20, 60]
    for model, state in zip(models, before):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "capture and check leave no trace"
    set_precision("fp32")


def test_the_check_catches_a_graph_that_reads_stale_memory(mnist_gpu):
    from qprune.graphs import GraphCheckError, check

    model, _, names = pruned("lenet_300_100", "quat", 0)
    engine = Engine([model], mnist_gpu, TrainSettings(lr=1e-3), names, graph=True)
    engine.prepare_graphs()
    engine.x = torch.zeros_like(engine.x)  # the eager step reads this new buffer, the graphs the old one
    engine._load_epoch([generator(5)])
    with pytest.raises(GraphCheckError):
        check(engine, engine._graphs)


def test_auto_falls_back_to_the_eager_loop_when_the_capture_fails(mnist_gpu, monkeypatch):
    from qprune.fallback import FailSafeTrainer
    from qprune.training import EagerTrainer

    def failing_capture(*args, **kwargs):
        raise RuntimeError("injected capture failure")

    settings = TrainSettings(lr=1e-3, epochs=1)
    start, masks, names = pruned("lenet_300_100", "quat", 3)
    model, reference = copy.deepcopy(start), copy.deepcopy(start)
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    trainer = FailSafeTrainer(lambda: Engine([model], mnist_gpu, settings, names, graph=True),
                              lambda: EagerTrainer(model, mnist_gpu, settings), [model])
    result = trainer.train_level([masks], [generator(1)])[0]
    expected = train_level(reference, mnist_gpu, masks, settings, generator(1))
    assert result.engine == "eager (fallback: RuntimeError: injected capture failure)"
    assert_same_update(start, model, reference, tolerance=1e-3)  # the same eager loop from the same (restored) weights
    assert result.test_acc == pytest.approx(expected.test_acc, abs=0.2)


@pytest.mark.parametrize("name", ["lenet_300_100", "conv2"])
def test_the_engine_step_has_no_host_syncs(mnist_gpu, rgb_gpu, name):
    """The whole step, capturable fused Adam included, as the capture records it."""
    data = mnist_gpu if name == "lenet_300_100" else rgb_gpu
    model, _, names = pruned(name, "quat", 0, data.image_shape)
    engine = Engine([model], data, TrainSettings(lr=1e-3, precision="bf16"), names, graph=True)
    engine._load_epoch([generator(0)])
    engine._step(60)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine._step(60)
    finally:
        torch.cuda.set_sync_debug_mode("default")
