import pytest
import torch

from qprune import MODELS, build_model, count_parameters, dense_real_parameters
from qprune.errors import ConfigError

# (real3, real4, quat) parameter counts, weights + biases (+ batch norm; quat: qbn=norm), 10 classes.
# The real ResNet-20 / ResNet-18 / MobileNet counts are the usual CIFAR ones (0.27M, 11.2M, 3.2M).
EXPECTED = {
    "lenet_300_100": (266_610, None, 67_710),
    "lenet_12": (9_550, None, 2_494),  # 784-12-10; quat 196 -> 3 quaternions -> real 12 -> 10
    "conv2": (4_301_642, 4_302_218, 1_077_962),
    "conv4": (2_425_930, 2_426_506, 609_226),
    "conv6": (2_262_602, 2_263_178, 568_778),
    "resnet20": (272_474, 272_618, 69_230),
    "resnet18": (11_173_962, 11_174_538, 2_801_082),
    "mobilenet": (3_217_226, 3_217_514, 853_754),
}


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("algebra", ["real3", "real4", "quat"])
def test_parameter_counts(name, algebra):
    expected = dict(zip(("real3", "real4", "quat"), EXPECTED[name]))[algebra]
    if expected is None:  # real4 on MNIST has no RGB to add gray to
        with pytest.raises(ConfigError, match="already grayscale"):
            build_model(name, algebra)
        return
    with torch.device("meta"):  # counts only: no need to initialise 11M weights
        assert count_parameters(build_model(name, algebra)) == expected


def test_every_model_is_covered():
    assert set(EXPECTED) == set(MODELS)


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "mobilenet"])
def test_quaternion_models_have_a_quarter_of_the_hidden_weights(name):
    """Conv and linear weights, and the batch norm scales of qbn=norm (one per quaternion channel)."""
    with torch.device("meta"):
        real, quat = build_model(name, "real3"), build_model(name, "quat")
    real_hidden = [p.numel() for n, p in real.named_parameters() if n.endswith("weight") and not n.startswith("output")]
    quat_hidden = [p.numel() for n, p in quat.named_parameters() if n.endswith("weight") and not n.startswith("output")]
    # the first layer differs (3 real input channels vs one quaternion of 4): compare the rest
    assert [q * 4 for q in quat_hidden[1:]] == real_hidden[1:]


def test_quaternion_mobilenet_keeps_the_depthwise_weights_and_quarters_the_pointwise():
    real, quat = dict(build_model("mobilenet", "real3").named_parameters()), dict(build_model("mobilenet", "quat").named_parameters())
    depthwise = [n for n in real if n.endswith("depthwise.weight")]
    pointwise = [n for n in real if n.endswith("pointwise.weight")]
    assert len(depthwise) == len(pointwise) == 13
    # a quaternion depthwise filter maps one channel's 4 components to 4: 4 weights per 4 real channels
    assert [quat[n].numel() for n in depthwise] == [real[n].numel() for n in depthwise]
    assert [4 * quat[n].numel() for n in pointwise] == [real[n].numel() for n in pointwise]
    assert quat["features.blocks.0.depthwise.weight"].shape == (4, 8, 1, 3, 3)  # 8 quaternion groups of one


@pytest.mark.parametrize("name,algebra,shape", [
    ("lenet_300_100", "real3", (1, 28, 28)), ("lenet_300_100", "quat", (1, 28, 28)),
    ("lenet_300_100", "real4", (4, 32, 32)), ("conv2", "quat", (4, 32, 32)), ("conv6", "real3", (3, 32, 32)),
])
def test_forward_shapes(name, algebra, shape):
    image = (1,) + shape[1:] if shape[0] == 1 else (3,) + shape[1:]
    model = build_model(name, algebra, num_classes=7, image_shape=image)
    assert model(torch.randn(5, *shape)).shape == (5, 7)


def test_classes_need_not_divide_by_four():
    model = build_model("conv4", "quat", num_classes=100)
    assert model.output.out_features == 100
    assert count_parameters(model) == 609_226 + 90 * 257


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("algebra", ["real3", "quat"])
def test_the_head_follows_the_class_count(name, algebra):
    with torch.device("meta"):
        model = build_model(name, algebra, num_classes=100)
        ten = build_model(name, algebra, num_classes=10)
    assert model.output.out_features == 100
    assert count_parameters(model) - count_parameters(ten) == 90 * (model.output.in_features + 1)


def test_lenet_on_cifar_counts_its_input_channels():
    assert count_parameters(build_model("lenet_300_100", "real3", image_shape=(3, 32, 32))) == 3072 * 300 + 300 + 30_100 + 1010
    assert count_parameters(build_model("lenet_300_100", "quat", image_shape=(3, 32, 32))) == 1024 * 75 * 4 + 300 + 7_600 + 1010


def test_dense_real_parameters_uses_the_real3_twin():
    assert dense_real_parameters("conv4") == 2_425_930
    assert dense_real_parameters("lenet_300_100") == 266_610


def test_architecture_options_and_width_checks():
    assert count_parameters(build_model("lenet_300_100", "real3", hidden=(100,))) == 784 * 100 + 100 + 1010
    with pytest.raises(ConfigError, match="model.hidden=30"):
        build_model("conv4", "quat", hidden=(256, 30))
    with pytest.raises(ConfigError, match="no option"):
        build_model("conv4", "quat", depth=3)


def test_quaternion_convnets_refuse_grayscale_images():
    with pytest.raises(ConfigError, match="needs RGB data"):
        build_model("conv4", "quat", image_shape=(1, 28, 28))


def test_adjacent_pixel_grouping_reorders_the_input():
    from qprune.algebra import Algebra

    flat = Algebra("quat", "adjacent").flatten(1)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # quaternion t = pixels 4t..4t+3, component-major: r parts first
    assert flat(x).tolist() == [[0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]]
    assert Algebra("quat", "blocks").flatten(1)(x).tolist() == [list(range(16))]


def test_parameter_roles_of_a_resnet():
    """ResNet-20 has 784 batch-normed real channels: 2 parameters each (real), 5 per quaternion channel
    (qbn=norm: a scale and 4 shifts) or 20 (qbn=whiten: a 4x4 scale and 4 shifts)."""
    from qprune.algebra import Algebra
    from qprune.models import parameter_counts
    from qprune.pruning import prunable_weights

    for algebra, norm, prunable in (("real3", 784 * 2, 270_896), (Algebra("quat", qbn="norm"), 196 * 5, 68_240),
                                    (Algebra("quat", qbn="whiten"), 196 * 20, 68_240)):
        model = build_model("resnet20", algebra)
        counts = parameter_counts(model, [w.name for w in prunable_weights(model)], 272_474)
        assert counts["norm_params"] == norm and counts["prunable_total"] == prunable
        assert counts["biases"] == 10 and counts["unprunable_weights"] == 0
        assert counts["params_total"] == count_parameters(model)
        assert counts["pct_of_real"] == pytest.approx(100 * count_parameters(model) / 272_474, abs=1e-4)


@pytest.mark.parametrize("algebra,shortcut_weights", [("real3", 16 * 32 + 32 * 64), ("quat", (16 * 32 + 32 * 64) // 4)])
def test_shortcuts_prunable_or_not_alike_in_every_algebra(algebra, shortcut_weights):
    from qprune.models import parameter_counts
    from qprune.pruning import prunable_weights

    dense = build_model("resnet20", algebra)
    fixed = build_model("resnet20", algebra, prune_shortcuts=False)
    shortcuts = {w.name for w in prunable_weights(dense)} - {w.name for w in prunable_weights(fixed)}
    assert shortcuts == {"features.stage2.0.shortcut.0.weight", "features.stage3.0.shortcut.0.weight"}
    assert all(w.layer_type == "conv" for w in prunable_weights(dense) if w.name in shortcuts)
    counts = parameter_counts(fixed, [w.name for w in prunable_weights(fixed)], 272_474)
    assert counts["unprunable_weights"] == shortcut_weights
    assert counts["params_total"] == count_parameters(dense)


def test_resnet_options_are_checked():
    assert count_parameters(build_model("resnet20", "real3", blocks=(9, 9, 9))) == 855_770  # ResNet-56
    with pytest.raises(ConfigError, match="model.widths=18"):
        build_model("resnet20", "quat", widths=(18, 32, 64))
    with pytest.raises(ConfigError, match="one entry per stage"):
        build_model("resnet20", "real3", widths=(16, 32))
    with pytest.raises(ConfigError, match="model.plan item"):
        build_model("mobilenet", "real3", plan=(64, (128, 2, 1)))


def test_quaternion_groups_follow_the_real_groups():
    from qprune.algebra import Algebra

    quat = Algebra("quat")
    assert quat.conv2d(32, 32, 3, groups=32).groups == 8   # depthwise: one quaternion filter per quaternion channel
    assert quat.conv2d(32, 64, 3, groups=2).groups == 2    # two groups of 16 real channels, as in the real conv
    with pytest.raises(ConfigError, match="groups=3"):
        quat.conv2d(32, 64, 3, groups=3)
