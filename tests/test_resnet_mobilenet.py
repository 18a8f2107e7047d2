"""The batch-normed models in every algebra on real CIFAR-10 images: train, prune, rewind."""

import pytest
import torch

from qprune import build_model
from qprune.algebra import NORM_LAYERS, Algebra
from qprune.data import device_data
from qprune.pruning import Masks, PruneSettings, prunable_weights, prune
from qprune.training import TrainSettings, train_level

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
ALGEBRAS = {"real3": Algebra("real3"), "real4": Algebra("real4"), "quat-norm": Algebra("quat"),
            "quat-whiten": Algebra("quat", qbn="whiten"), "complex": Algebra("complex"),
            "phm4-whiten": Algebra("phm", qbn="whiten", n=4)}


@pytest.fixture(scope="module")
def cifar_crops(cifar10):
    """16x16 centre crops of 8 train and 8 test images: the models pool globally, so any size fits."""
    from qprune.data import RawSplits

    crop = (..., slice(8, 24), slice(8, 24))
    return RawSplits(cifar10.train_x[:8][crop], cifar10.train_y[:8], cifar10.test_x[:8][crop], cifar10.test_y[:8],
                     cifar10.classes, "cifar10 crops")


# ResNet-20 in every algebra; the two large models in real3 and quat by default, the rest with -m slow
# (the same code paths at 10-40x the parameters: ~4 min of the default suite on 2 cores).
CASES = [pytest.param(name, algebra, marks=() if name == "resnet20" or algebra in ("real3", "quat-norm") else pytest.mark.slow,
                      id=f"{name}-{algebra}")
         for name in ("resnet20", "resnet18", "mobilenet") for algebra in ALGEBRAS]


@pytest.mark.parametrize("name, algebra", CASES)
def test_trains_prunes_and_rewinds(cifar_crops, name, algebra):
    algebra = ALGEBRAS[algebra]
    data = device_data(cifar_crops, torch.device("cpu"), **IMAGENET, add_gray=algebra.adds_gray)
    torch.manual_seed(0)
    model = build_model(name, algebra, data.num_classes, data.image_shape)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    weights = prunable_weights(model)
    masks = Masks.ones(model, weights)

    # three steps on the same 8 images (batch 8, one step per epoch): the loss goes down
    settings = TrainSettings(optimizer="sgd", lr=0.01, batch_size=8, epochs=3, weight_decay=1e-4, eval_batch_size=8)
    training = train_level(model, data, masks, settings, torch.Generator().manual_seed(0))
    losses = [e.train_loss for e in training.epochs]
    assert training.steps == 3 and losses[-1] < losses[0], losses
    norms = [m for m in model.modules() if isinstance(m, NORM_LAYERS)]
    assert norms and all(isinstance(m, torch.nn.BatchNorm2d) != algebra.hypercomplex for m in norms)
    running = [k for k in init if "running_" in k]
    assert running and all(not torch.equal(model.state_dict()[k], init[k]) for k in running), "running statistics move"

    pruned = prune(model, masks, weights, PruneSettings(rate=0.2))
    assert pruned.remaining_fraction() == pytest.approx(0.8, abs=1e-3)
    model.load_state_dict(init)  # rewind: weights, norm parameters and running statistics
    pruned.apply_(model)
    state = model.state_dict()
    for key, value in init.items():
        if key in pruned:
            assert torch.equal(state[key][pruned[key]], value[pruned[key]]) and (state[key][~pruned[key]] == 0).all()
        else:
            assert torch.equal(state[key], value), key

    train_level(model, data, pruned, TrainSettings(optimizer="sgd", lr=0.01, batch_size=8, epochs=1, eval_batch_size=8),
                torch.Generator().manual_seed(1))
    params = dict(model.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in pruned.items())
    assert not torch.equal(params[weights[0].name], init[weights[0].name] * pruned[weights[0].name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algebra", ["quat-norm", "quat-whiten", "complex", "phm4-whiten"])
def test_a_quaternion_resnet_step_has_no_host_syncs(algebra):
    import torch.nn.functional as F

    from qprune.training import make_optimizer

    model = build_model("resnet20", ALGEBRAS[algebra]).cuda()
    optimizer = make_optimizer(model, TrainSettings(optimizer="sgd", lr=0.01))
    x, y = torch.randn(16, 4, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
