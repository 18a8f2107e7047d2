"""Masks, pruning rounds, and that pruned weights stay pruned through training and rewinding."""

import pytest
import torch

from qprune import build_model
from qprune.data import device_data
from qprune.errors import ConfigError
from qprune.pruning import Masks, PruneSettings, prunable_weights, prune
from qprune.training import TrainSettings, make_optimizer, train_level


def _rounds(model, settings, n):
    weights = prunable_weights(model, settings.prune_output)
    masks = Masks.ones(model, weights)
    history = [masks]
    for _ in range(n):
        masks = prune(model, masks, weights, settings)
        masks.apply_(model)
        history.append(masks)
    return weights, history


@pytest.mark.parametrize("algebra", ["real3", "quat"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_rate_removes_a_fraction_of_the_remaining_weights(algebra, scope):
    torch.manual_seed(0)
    model = build_model("conv2", algebra)
    weights, history = _rounds(model, PruneSettings(rate=0.2, scope=scope), 3)
    total = history[0].total()
    for level, masks in enumerate(history):
        # within one weight per layer of (1 - rate)^level
        assert abs(masks.kept() - total * 0.8**level) <= len(weights)
    if scope == "layerwise":
        for name, mask in history[2].items():
            assert abs(mask.float().mean().item() - 0.64) < 2 / mask.numel() + 1e-6, name


def test_global_pruning_removes_the_smallest_magnitudes():
    torch.manual_seed(1)
    model = build_model("lenet_300_100", "quat")
    weights, (before, after) = _rounds(model, PruneSettings(rate=0.5), 1)
    params = dict(model.named_parameters())
    torch.manual_seed(1)  # the same weights again: the magnitudes the masks were computed on
    init = dict(build_model("lenet_300_100", "quat").named_parameters())
    pruned = torch.cat([init[n].detach().abs()[~m].flatten() for n, m in after.items()])
    kept = torch.cat([init[n].detach().abs()[m].flatten() for n, m in after.items()])
    assert pruned.max() <= kept.min()
    assert all((params[n][~m] == 0).all() for n, m in after.items())


def test_layer_type_rates_and_an_unprunable_output():
    torch.manual_seed(0)
    model = build_model("conv4", "real3")
    settings = PruneSettings(rate=0.2, scope="layerwise", layer_rates={"conv": 0.15, "output": 0.1})
    weights, history = _rounds(model, settings, 2)
    kinds = {w.name: w.layer_type for w in weights}
    assert kinds["output.weight"] == "output" and kinds["features.0.weight"] == "conv" and kinds["hidden.0.weight"] == "fc"
    expected = {"conv": 0.85**2, "fc": 0.8**2, "output": 0.9**2}
    for name, mask in history[2].items():
        assert mask.float().mean().item() == pytest.approx(expected[kinds[name]], abs=2 / mask.numel() + 1e-6)
    no_output = prunable_weights(model, include_output=False)
    assert "output.weight" not in {w.name for w in no_output} and len(no_output) == len(weights) - 1


def test_quaternion_unit_prunes_whole_quaternions():
    torch.manual_seed(0)
    model = build_model("conv2", "quat")
    weights, history = _rounds(model, PruneSettings(rate=0.2, unit="quaternion"), 2)
    for w in weights:
        mask = history[2][w.name]
        if w.hypercomplex:
            assert (mask == mask[0:1]).all(), "the four components of a quaternion are kept or pruned together"
    assert abs(history[2].remaining_fraction() - 0.64) < 1e-3


def test_component_unit_prunes_components_independently():
    torch.manual_seed(0)
    model = build_model("conv2", "quat")
    weights, history = _rounds(model, PruneSettings(rate=0.5), 1)
    mask = history[1]["features.2.weight"]
    assert not (mask == mask[0:1]).all()


def test_bad_prune_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"prune.rate must be in \(0, 1\)"):
        PruneSettings(rate=1.5)
    with pytest.raises(ConfigError, match="prune.levels"):
        PruneSettings(levels=-1)
    with pytest.raises(ConfigError, match="prune.rates.conv"):
        PruneSettings(layer_rates={"conv": 0})
    with pytest.raises(ConfigError, match="prune.unit"):
        PruneSettings(unit="neuron")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_pruned_weights_stay_zero_and_get_no_optimizer_state(mnist, optimizer):
    torch.manual_seed(0)
    data = device_data(mnist, torch.device("cpu"), mean=(0.1307,), std=(0.3081,), add_gray=False, train_size=600, test_size=200)
    model = build_model("lenet_300_100", "quat")
    weights = prunable_weights(model)
    masks = prune(model, Masks.ones(model, weights), weights, PruneSettings(rate=0.5))
    masks.apply_(model)
    settings = TrainSettings(optimizer=optimizer, lr=1e-3, weight_decay=1e-4, epochs=1, max_steps=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = make_optimizer(model, settings)
    train_level(model, data, masks, settings, torch.Generator().manual_seed(0), optimizer=optimizer)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all(), name
        assert not torch.equal(params[name][mask], before[name][mask]), f"{name} did not train"
        state = optimizer.state[params[name]]
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state:
                assert (state[key][~mask] == 0).all(), f"{optimizer} {key} moved at pruned positions of {name}"


def test_random_masks_keep_each_layers_sparsity_but_not_its_pattern():
    from qprune.pruning import random_masks_like

    torch.manual_seed(0)
    model = build_model("conv2", "quat")
    _, history = _rounds(model, PruneSettings(rate=0.2), 3)
    ticket = history[3]
    random = random_masks_like(ticket, torch.Generator().manual_seed(5))
    for name, mask in ticket.items():
        assert random[name].sum() == mask.sum(), name
        overlap = (random[name] & mask).sum().item() / mask.sum().item()
        assert abs(overlap - mask.float().mean().item()) < 0.05, "random masks overlap the ticket only by chance"
