"""Complex and PHM models: exact parameter counts, input layouts, config errors, pruning, training
(eager, engine, trials, stand-in graphs) and the runner's accounting, on real data slices."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import mnist_slice, pruned_model
from qprune import build_model, count_parameters
from qprune.algebra import Algebra
from qprune.errors import ConfigError
from qprune.models import MODELS, parameter_counts
from qprune.pruning import Masks, PruneSettings, prunable_weights, prune
from qprune.training import TrainSettings, make_optimizer, train_level

COMPLEX, PHM2, PHM4 = Algebra("complex"), Algebra("phm", n=2), Algebra("phm", n=4)
PHM4_QUATERNION = Algebra("phm", n=4, rules="quaternion")

# Each model by hand, from its definition (10 classes; [R, G, B, gray] input for the convnets,
# 784 pixels for LeNet): hypercomplex weights as in the real4 twin (in x out x kernel area per layer),
# depthwise weights (9 per real channel in any algebra), batch-normed real channels, hidden biases,
# the real head (weights + biases) and the number of hypercomplex layers (each holds n^3 PHM rules).
ARCHITECTURE = {
    #                (weights,     depthwise, norm,  biases, head,   layers)
    "lenet_300_100": (784 * 300 + 300 * 100, 0, 0, 400, 1_010, 2),
    "lenet_12": (784 * 12, 0, 0, 12, 130, 1),
    "conv2": (4 * 64 * 9 + 64 * 64 * 9 + 16_384 * 256 + 256 * 256, 0, 0, 640, 2_570, 4),
    "conv4": (2_423_040, 0, 0, 896, 2_570, 6),      # 4·64·9 + 64·64·9 + 64·128·9 + 128·128·9 + 8192·256 + 256·256
    "conv6": (2_259_200, 0, 0, 1_408, 2_570, 8),    # conv4's convs + 128·256·9 + 256·256·9, then 4096·256 + 256·256
    "resnet20": (270_400, 0, 784, 0, 650, 21),      # 19 3x3 convs + 2 1x1 shortcuts; 784 normed channels
    "resnet18": (11_159_808, 0, 4_800, 0, 5_130, 20),
    "mobilenet": (1_152 + 3_139_584, 44_640, 10_944, 0, 10_250, 27),  # stem + pointwise; 13 depthwise
}


def expected_count(model: str, n: int, phm: bool) -> int:
    """Weights / n, depthwise as real, batch norm per number channel (one scale per n channels, a shift
    per real channel: C/n + C), biases and head as real, n³ rules per hypercomplex layer for PHM."""
    weights, depthwise, norm, biases, head, layers = ARCHITECTURE[model]
    return weights // n + depthwise + norm // n + norm + biases + head + (n**3 * layers if phm else 0)


def test_the_architecture_table_adds_up_to_the_known_real4_counts():
    """The table above, read as a real model of 4 input channels, gives README's real4 counts."""
    real4 = {"conv2": 4_302_218, "conv4": 2_426_506, "conv6": 2_263_178, "resnet20": 272_618,
             "resnet18": 11_174_538, "mobilenet": 3_217_514}
    for model, count in real4.items():
        weights, depthwise, norm, biases, head, _ = ARCHITECTURE[model]
        assert weights + depthwise + 2 * norm + biases + head == count, model
    assert set(ARCHITECTURE) == set(MODELS)


def test_the_issues_counts():
    with torch.device("meta"):
        assert count_parameters(build_model("conv4", COMPLEX)) == 1_214_986
        assert count_parameters(build_model("conv4", PHM4)) == 609_610 == 609_226 + 6 * 4**3
        assert count_parameters(build_model("conv4", PHM2)) == 1_215_034
        assert count_parameters(build_model("lenet_300_100", PHM4)) == 67_838 == 67_710 + 2 * 64


@pytest.mark.parametrize("model", list(ARCHITECTURE))
@pytest.mark.parametrize("algebra", [COMPLEX, PHM2, PHM4, PHM4_QUATERNION], ids=["complex", "phm2", "phm4", "phm4q"])
def test_parameter_counts_of_every_model(model, algebra):
    with torch.device("meta"):
        built = build_model(model, algebra)
    assert count_parameters(built) == expected_count(model, algebra.components, algebra.name == "phm")


def test_build_model_takes_the_phm_options():
    model = build_model("conv4", "phm", n=4)
    assert count_parameters(model) == 609_610
    first = model.features[0]
    assert first.weight.shape == (4, 16, 1, 3, 3) and first.rules.shape == (4, 4, 4) and first.rule_init == "random"
    assert build_model("lenet_300_100", "phm", n=4, rules="quaternion").hidden[0].rule_init == "quaternion"
    with pytest.raises(ConfigError, match="algebra.n"):
        build_model("conv4", "phm")


def test_input_layouts():
    """complex and PHM-2/4 read [R, G, B, gray] (two complex channels R+iB, G+i·gray; one PHM-4 number);
    PHM-3 reads RGB as one number; every LeNet reads the flattened image."""
    for algebra, channels, gray in ((COMPLEX, 4, True), (PHM2, 4, True), (PHM4, 4, True),
                                    (Algebra("phm", n=3), 3, False), (Algebra("quat"), 4, True)):
        assert algebra.input_channels(3) == channels and algebra.adds_gray == gray, algebra
    assert build_model("conv2", "phm", n=3, plan=(63, 63, "M"), hidden=(255, 255)).features[0].weight.shape == (3, 21, 1, 3, 3)
    assert build_model("lenet_300_100", COMPLEX).hidden[0].weight.shape == (2, 150, 392)
    flat = Algebra("complex", "adjacent").flatten(1)
    assert flat(torch.arange(8.0).view(1, 1, 2, 4)).tolist() == [[0, 2, 4, 6, 1, 3, 5, 7]]  # pairs of pixels


@pytest.mark.parametrize("make,message", [
    (lambda: Algebra("phm"), "algebra=phm needs algebra.n"),
    (lambda: Algebra("phm", n=1), "algebra=phm needs algebra.n"),
    (lambda: Algebra("phm", n=2, rules="quaternion"), "needs algebra.n=4"),
    (lambda: Algebra("phm", n=4, rules="octonion"), "algebra.rules must be one of random, quaternion"),
    (lambda: Algebra("quat", n=4), "algebra.n applies to algebra=phm only"),
    (lambda: Algebra("complex", rules="random"), "algebra.rules applies to algebra=phm only"),
    (lambda: build_model("conv4", "phm", n=3), r"model.plan=64: a phm \(n=3\) layer's width must be divisible by 3"),
    (lambda: build_model("conv4", "complex", hidden=(256, 255)), "model.hidden=255"),
    (lambda: build_model("lenet_300_100", "phm", n=3), "the flattened image has 784 values"),
    (lambda: build_model("conv4", "phm", n=5, plan=(60, "M"), hidden=(60,)), "no input layout for RGB images"),
    (lambda: build_model("conv4", "complex", image_shape=(1, 28, 28)), "needs RGB data"),
])
def test_config_errors_name_the_key_and_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


# ---------------------------------------------------------------------------------------------- pruning
def test_rules_are_never_pruned_and_are_counted_as_unprunable_weights():
    model = build_model("resnet20", PHM4)
    weights = prunable_weights(model)
    assert not any("rules" in w.name for w in weights) and all(w.hypercomplex for w in weights if w.layer_type != "output")
    counts = parameter_counts(model, [w.name for w in weights], 272_474)
    assert counts["unprunable_weights"] == 21 * 64
    assert counts["prunable_total"] == 270_400 // 4 + 640      # hypercomplex weights + the real head's weights
    assert counts["norm_params"] == 784 // 4 + 784 and counts["biases"] == 10
    assert counts["params_total"] == count_parameters(model) == 70_574
    assert counts["pct_of_real"] == pytest.approx(100 * 70_574 / 272_474, abs=1e-4)


@pytest.mark.parametrize("algebra", [COMPLEX, PHM2, Algebra("phm", n=3)], ids=["complex", "phm2", "phm3"])
def test_whole_number_pruning_keeps_or_prunes_all_n_components(algebra):
    torch.manual_seed(0)
    model = build_model("conv2", algebra, plan=(24, 24, "M"), hidden=(48,))   # widths divisible by 2 and 3
    weights = prunable_weights(model)
    masks = Masks.ones(model, weights)
    for _ in range(2):
        masks = prune(model, masks, weights, PruneSettings(rate=0.2, unit="quaternion"))
        masks.apply_(model)
    for w in weights:
        if w.hypercomplex:
            assert (masks[w.name] == masks[w.name][0:1]).all(), w.name
    assert masks.remaining_fraction() == pytest.approx(0.64, abs=2e-3)
    component = prune(model, Masks.ones(model, weights), weights, PruneSettings(rate=0.5))
    first = component[weights[1].name]
    assert not (first == first[0:1]).all(), "unit=component ranks each component on its own"


def test_whole_numbers_rank_by_their_rms():
    """A PHM-2 number (0.1, 0.6) scores sqrt((0.1² + 0.6²)/2) = 0.43: with unit=quaternion it goes before
    a real weight 0.5 (its norm 0.61 or its largest component 0.6 would not); unit=component prunes 0.1, 0.5."""
    torch.manual_seed(0)
    model = build_model("lenet_12", PHM2)
    with torch.no_grad():
        model.hidden[0].weight.fill_(1.0)
        model.hidden[0].weight[:, 0, 0] = torch.tensor([0.1, 0.6])
        model.output.weight.fill_(1.0)
        model.output.weight[0, 0] = 0.5
    weights = prunable_weights(model)
    rate = 2 / (784 * 12 // 2 + 120)                   # two of the 4,704 + 120 prunable weights
    whole = prune(model, Masks.ones(model, weights), weights, PruneSettings(rate=rate, unit="quaternion"))
    assert whole["hidden.0.weight"][:, 0, 0].tolist() == [False, False] and whole["output.weight"][0, 0]
    single = prune(model, Masks.ones(model, weights), weights, PruneSettings(rate=rate))
    assert single["hidden.0.weight"][:, 0, 0].tolist() == [False, True] and not single["output.weight"][0, 0]
    assert whole.total() - whole.kept() == single.total() - single.kept() == 2


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def data(mnist):
    return mnist_slice(mnist)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_pruned_components_stay_zero_while_the_rules_train(data, optimizer):
    model, masks, _ = pruned_model(PHM4, 0)
    rules = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("rules")}
    settings = TrainSettings(optimizer=optimizer, lr=1e-3 if optimizer == "adam" else 0.05, weight_decay=1e-4, epochs=1)
    opt = make_optimizer(model, settings)
    training = train_level(model, data, masks, settings, torch.Generator().manual_seed(0), optimizer=opt)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all(), name
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in opt.state[params[name]]:
                assert (opt.state[params[name]][key][~mask] == 0).all(), f"{key} moved at pruned positions of {name}"
    assert len(rules) == 2
    for name, before in rules.items():
        assert (params[name] - before).abs().max() > 1e-4, f"{name} did not train"
    assert training.test_acc > 30  # 11 steps on 620 images: well above chance (10%)


@pytest.mark.parametrize("algebra", [COMPLEX, PHM4_QUATERNION], ids=["complex", "phm4q"])
def test_engine_step_equals_the_eager_loop(data, algebra):
    from qprune.engine import Engine

    settings = TrainSettings(lr=1e-3, epochs=1)
    reference, masks, names = pruned_model(algebra, 1)
    model = copy.deepcopy(reference)
    eager = train_level(reference, data, masks, settings, torch.Generator().manual_seed(3))
    fast = Engine([model], data, settings, names).train_level([masks], [torch.Generator().manual_seed(3)])[0]
    assert fast.steps == eager.steps == 11
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())) < 1e-6
    assert [e.test_acc for e in fast.epochs] == [e.test_acc for e in eager.epochs]


@pytest.mark.parametrize("algebra", [COMPLEX, PHM2], ids=["complex", "phm2"])
def test_trials_match_separate_runs(data, algebra):
    """K runs in one vmapped step (PHM: rules stacked per run; complex: its fixed rules shared): each
    equals the single run of its seed."""
    from qprune.engine import Engine

    settings = TrainSettings(lr=1e-3, epochs=1)
    runs = [pruned_model(algebra, seed, rate=0.3 + 0.1 * seed) for seed in range(2)]
    separate = [copy.deepcopy(model) for model, _, _ in runs]
    engine = Engine([m for m, _, _ in runs], data, settings, runs[0][2])
    assert ("hidden.0.rules" in engine.params) == (algebra.name == "phm")
    together = engine.train_level([m for _, m, _ in runs], [torch.Generator().manual_seed(10 + k) for k in range(2)])
    for k, ((model, masks, _), alone) in enumerate(zip(runs, separate)):
        result = train_level(alone, data, masks, settings, torch.Generator().manual_seed(10 + k))
        # vmap's batched matmuls round differently: equal up to float rounding (as for real and quat runs)
        assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), alone.parameters())) < 2e-5
        assert together[k].test_acc == pytest.approx(result.test_acc, abs=0.34)  # at most one of 300 images
        params = dict(model.named_parameters())
        assert all((params[n][~m] == 0).all() for n, m in masks.items())
    assert not torch.equal(runs[0][0].hidden[0].weight, runs[1][0].hidden[0].weight)


# ---------------------------------------------------------------------------------------------- runs and configs
def compose_config(overrides):
    from hydra import compose, initialize_config_dir

    from qprune.cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=False)


def test_a_paper_run_of_phm_with_baselines_and_trials_accounts_for_the_rules(data_root, cache_dir, tmp_path):
    """protocol=paper, both baselines and trials=2 (the engine's vmapped step) with PHM-4 on LeNet:
    the rules (2 layers x 4³) are unprunable weights in levels.json and count in pct_of_real."""
    import json

    from omegaconf import OmegaConf

    from qprune.reporting import read_levels_csv
    from qprune.runner import LevelRunner
    from qprune.settings import Settings

    cfg = compose_config(["model=lenet_300_100", "algebra=phm", "algebra.n=4", "protocol=paper", "trials=2",
                          "baselines=[random_reinit,random_prune]", "train.epochs=1", "train.max_steps=20",
                          "prune.levels=1", "data.train_size=1200", "data.test_size=300", "progress=none",
                          "logger=csv", f"data.root={data_root}", f"data.cache={cache_dir}"])
    rows = LevelRunner(Settings.from_config(cfg), tmp_path, OmegaConf.to_container(cfg, resolve=True)).run()
    assert [r["seed"] for r in rows] == [0, 0, 1, 1]
    for k in range(2):
        run_dir = tmp_path / f"trial_{k}"
        meta = json.loads((run_dir / "levels.json").read_text())
        assert (meta["unprunable_weights"], meta["prunable_total"], meta["biases"]) == (128, 66_300 + 1_000, 410)
        assert meta["params_total"] == 67_838 and meta["config"]["algebra"]["n"] == 4
        level1 = read_levels_csv(run_dir / "levels.csv")[1]
        pruned = round(0.2 * 67_300)
        assert level1["params_nonzero"] == 67_838 - pruned
        assert level1["pct_of_real"] == pytest.approx(100 * (67_838 - pruned) / 266_610, abs=1e-3)
        assert all(level1[c] > 20 for c in ("test_acc", "mask_test_acc", "random_reinit_acc", "random_prune_acc"))
        masks = torch.load(run_dir / "levels/level_01/masks.pt", weights_only=True)
        assert not any("rules" in name for name in masks)


def test_an_lth_run_of_complex_prunes_whole_numbers(data_root, cache_dir, tmp_path):
    """protocol=lth with prune.unit=quaternion on a complex LeNet: masks keep both parts of a number together."""
    from omegaconf import OmegaConf

    from qprune.runner import LevelRunner
    from qprune.settings import Settings
    from qprune.store import RunDirectory

    cfg = compose_config(["model=lenet_300_100", "algebra=complex", "prune.unit=quaternion", "prune.rewind=5it",
                          "train.epochs=1", "train.max_steps=10", "prune.levels=2", "data.train_size=600",
                          "data.test_size=300", "progress=none", "logger=csv", f"data.root={data_root}",
                          f"data.cache={cache_dir}"])
    rows = LevelRunner(Settings.from_config(cfg), tmp_path, OmegaConf.to_container(cfg, resolve=True)).run()
    assert [r["prunable_remaining"] for r in rows] == pytest.approx([1.0, 0.8, 0.64], abs=1e-3)
    assert rows[0]["params_total"] == 134_010 and rows[0]["pct_of_real"] == pytest.approx(100 * 134_010 / 266_610, abs=1e-3)
    masks = RunDirectory(tmp_path).load_masks(2)
    assert masks["hidden.0.weight"].shape == (2, 150, 392)
    assert all(torch.equal(m[0], m[1]) for name, m in masks.items() if name.startswith("hidden"))


@pytest.mark.parametrize("experiment,model,tags", [
    ("conv4_cifar10", "conv4", ["real3", "real4", "complex", "quat", "phm4", "phm4q"]),
    ("lenet_300_100_mnist", "lenet_300_100", ["real3", "complex", "quat", "phm2", "phm4"]),
])
def test_hypercomplex_experiments_sweep_every_algebra(experiment, model, tags):
    from hydra import compose, initialize_config_dir

    from qprune.cli import config_dir
    from qprune.settings import Settings

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment=hypercomplex/{experiment}"], return_hydra_config=True)
        choices = cfg.hydra.sweeper.params.algebra.split(",")
        settings = [Settings.from_config(compose("config", overrides=[f"experiment=hypercomplex/{experiment}",
                                                                      f"algebra={a}"])) for a in choices]
    assert [s.algebra.tag for s in settings] == tags
    assert {s.model for s in settings} == {model}
    assert all(Algebra.from_tag(s.algebra.tag) == s.algebra for s in settings)


def test_phm_settings_from_the_command_line():
    from qprune.settings import Settings, run_identity

    s = Settings.from_config(compose_config(["model=conv4", "algebra=phm", "algebra.n=2"]))
    assert (s.algebra.name, s.algebra.n, s.algebra.rules, s.algebra.components) == ("phm", 2, "random", 2)
    identity = run_identity(compose_config(["model=conv4", "algebra=phm", "algebra.n=2"]))
    assert identity["algebra.n"] == 2 and identity["algebra.rules"] == "random"
    with pytest.raises(ConfigError, match="algebra.n applies to algebra=phm only"):
        Settings.from_config(compose_config(["model=conv4", "algebra=quat", "algebra.n=4"]))
    with pytest.raises(ConfigError, match="model.plan=64: a phm \\(n=3\\) layer"):
        Settings.from_config(compose_config(["model=conv4", "algebra=phm", "algebra.n=3"]))
