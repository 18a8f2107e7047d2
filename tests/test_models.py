import pytest
import torch

from qprune import MODELS, build_model, count_parameters, dense_real_parameters
from qprune.errors import ConfigError

# (real3, real4, quat) parameter counts, weights + biases, 10 classes
EXPECTED = {
    "lenet_300_100": (266_610, None, 67_710),
    "conv2": (4_301_642, 4_302_218, 1_077_962),
    "conv4": (2_425_930, 2_426_506, 609_226),
    "conv6": (2_262_602, 2_263_178, 568_778),
}


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("algebra", ["real3", "real4", "quat"])
def test_parameter_counts(name, algebra):
    expected = dict(zip(("real3", "real4", "quat"), EXPECTED[name]))[algebra]
    if expected is None:  # real4 on MNIST has no RGB to add gray to
        with pytest.raises(ConfigError, match="already grayscale"):
            build_model(name, algebra)
        return
    assert count_parameters(build_model(name, algebra)) == expected


def test_every_model_is_covered():
    assert set(EXPECTED) == set(MODELS)


@pytest.mark.parametrize("name", EXPECTED)
def test_quaternion_models_have_a_quarter_of_the_hidden_weights(name):
    real, quat = build_model(name, "real3"), build_model(name, "quat")
    real_hidden = [p.numel() for n, p in real.named_parameters() if n.endswith("weight") and not n.startswith("output")]
    quat_hidden = [p.numel() for n, p in quat.named_parameters() if n.endswith("weight") and not n.startswith("output")]
    # the first layer differs (3 real input channels vs one quaternion of 4): compare the rest
    assert [q * 4 for q in quat_hidden[1:]] == real_hidden[1:]


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
