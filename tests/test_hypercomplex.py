"""Complex and PHM layers against their definitions: complex multiplication, the quaternion layer,
the Kronecker sum, finite differences, initialisation variance and batch norm of n components."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qprune.hypercomplex import HypercomplexConv2d, HypercomplexLinear, complex_rules, kronecker_block, quaternion_rules
from qprune.quaternion import QConv2d, QLinear, hamilton_product
from qprune.quaternion_norm import QBatchNorm2d

F64 = torch.float64


def complex_linear(n_in: int, n_out: int) -> HypercomplexLinear:
    torch.manual_seed(0)
    return HypercomplexLinear(2 * n_in, 2 * n_out, 2, "complex").double()


def test_complex_linear_is_complex_multiplication():
    layer = complex_linear(3, 5)
    torch.manual_seed(1)
    x = torch.randn(7, 6, dtype=F64)
    z = torch.complex(x[:, :3], x[:, 3:])                      # [re | im] -> 3 complex inputs
    w = torch.complex(layer.weight[0], layer.weight[1])         # a + ib, (out, in)
    expected = z @ w.t()
    y = layer(x) - layer.bias
    torch.testing.assert_close(y, torch.cat([expected.real, expected.imag], dim=1), rtol=0, atol=1e-12)


def test_complex_block_is_the_2x2_multiplication_matrix():
    a, b = 0.7, -1.3
    weight = torch.tensor([a, b], dtype=F64).view(2, 1, 1)
    block = kronecker_block(complex_rules(dtype=F64), weight)
    assert block.tolist() == [[a, -b], [b, a]]


def test_complex_conv_is_complex_convolution():
    torch.manual_seed(2)
    layer = HypercomplexConv2d(4, 6, 3, 2, "complex", padding=1).double()
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    xr, xi = x[:, :2], x[:, 2:]
    a, b = layer.weight[0], layer.weight[1]
    # (xr + i xi) * (a + ib) = (xr a - xi b) + i (xr b + xi a), each product a real convolution
    real = F.conv2d(xr, a, padding=1) - F.conv2d(xi, b, padding=1)
    imag = F.conv2d(xr, b, padding=1) + F.conv2d(xi, a, padding=1)
    y = layer(x) - layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, torch.cat([real, imag], dim=1), rtol=0, atol=1e-12)


def test_quaternion_rules_are_the_hamilton_product():
    """A_i is left multiplication by basis quaternion i: A_i q = e_i ⊗ q for every q."""
    rules = quaternion_rules(dtype=F64)
    torch.manual_seed(3)
    q = torch.randn(4, dtype=F64)
    for i in range(4):
        e = torch.zeros(4, dtype=F64)
        e[i] = 1
        torch.testing.assert_close(rules[i] @ q, hamilton_product(e, q), rtol=0, atol=1e-15)


def _copy_weights(phm, quat):
    with torch.no_grad():
        phm.weight.copy_(quat.weight)
        phm.bias.copy_(quat.bias)


def test_phm_with_quaternion_rules_is_the_quaternion_linear_layer_exactly():
    torch.manual_seed(4)
    quat = QLinear(12, 8)
    with torch.no_grad():
        quat.bias.normal_()
    phm = HypercomplexLinear(12, 8, 4, "quaternion")
    _copy_weights(phm, quat)
    x = torch.randn(5, 12)
    assert torch.equal(phm.block_weight(), quat.block_weight())
    assert torch.equal(phm(x), quat(x))


@pytest.mark.parametrize("groups", [1, 2])
def test_phm_with_quaternion_rules_is_the_quaternion_conv_exactly(groups):
    torch.manual_seed(5)
    quat = QConv2d(8, 16, 3, stride=2, padding=1, groups=groups)
    phm = HypercomplexConv2d(8, 16, 3, 4, "quaternion", stride=2, padding=1, groups=groups)
    _copy_weights(phm, quat)
    x = torch.randn(3, 8, 9, 9)
    assert torch.equal(phm(x), quat(x))


@pytest.mark.parametrize("init", ["he", "study"])
def test_phm_with_quaternion_rules_starts_with_the_quaternion_layers_weights(init):
    """Same seed, same draws, same scale: PHM-4 with quaternion rules *is* the quaternion layer at initialisation."""
    torch.manual_seed(6)
    quat = QConv2d(8, 12, 3, init=init)
    torch.manual_seed(6)
    phm = HypercomplexConv2d(8, 12, 3, 4, "quaternion", init=init)
    assert torch.equal(phm.weight, quat.weight) and torch.equal(phm.rules, quaternion_rules())
    torch.manual_seed(7)
    quat_linear = QLinear(16, 8, init=init)
    torch.manual_seed(7)
    assert torch.equal(HypercomplexLinear(16, 8, 4, "quaternion", init=init).weight, quat_linear.weight)


def test_a_phm4_model_with_quaternion_rules_is_the_quaternion_model():
    from qprune import build_model

    x = torch.randn(2, 4, 32, 32)
    for name in ("conv4", "resnet20"):
        torch.manual_seed(12)
        quat = build_model(name, "quat").eval()
        torch.manual_seed(12)
        phm = build_model(name, "phm", n=4, rules="quaternion").eval()
        assert torch.equal(phm(x), quat(x)), name


@pytest.mark.parametrize("n", [2, 3, 4])
def test_phm_weight_is_the_kronecker_sum(n):
    torch.manual_seed(7)
    linear = HypercomplexLinear(3 * n, 2 * n, n, "random").double()
    expected = sum(torch.kron(linear.rules[i], linear.weight[i]) for i in range(n))
    torch.testing.assert_close(linear.block_weight(), expected, rtol=0, atol=1e-14)

    conv = HypercomplexConv2d(2 * n, 3 * n, (2, 3), n, "random").double()
    block = conv.block_weight()
    assert block.shape == (3 * n, 2 * n, 2, 3)
    for u in range(2):
        for v in range(3):
            expected = sum(torch.kron(conv.rules[i], conv.weight[i, :, :, u, v]) for i in range(n))
            torch.testing.assert_close(block[:, :, u, v], expected, rtol=0, atol=1e-14)


def test_gradients_of_rules_and_weights_match_finite_differences():
    torch.manual_seed(8)
    conv = HypercomplexConv2d(6, 3, 2, 3, "random", padding=1, groups=1).double()
    x = torch.randn(2, 6, 3, 3, dtype=F64)

    def conv_out(rules, weight, bias):
        return torch.func.functional_call(conv, {"rules": rules, "weight": weight, "bias": bias}, (x,))

    inputs = tuple(p.detach().clone().requires_grad_() for p in (conv.rules, conv.weight, conv.bias))
    assert torch.autograd.gradcheck(conv_out, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)

    linear = HypercomplexLinear(4, 6, 2, "random").double()
    y = torch.randn(3, 4, dtype=F64)

    def linear_out(rules, weight):
        return torch.func.functional_call(linear, {"rules": rules, "weight": weight}, (y,))

    inputs = tuple(p.detach().clone().requires_grad_() for p in (linear.rules, linear.weight))
    assert torch.autograd.gradcheck(linear_out, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_depthwise_phm_conv_keeps_each_channel_to_itself():
    """groups = channels/n: number channel c of the output sees only number channel c of the input."""
    torch.manual_seed(9)
    conv = HypercomplexConv2d(6, 6, 3, 2, "random", padding=1, groups=3)
    assert conv.weight.shape == (2, 3, 1, 3, 3) and conv.rules.shape == (2, 2, 2)
    x = torch.randn(1, 6, 5, 5, requires_grad=True)
    conv(x)[:, [1, 4]].sum().backward()            # number channel 1: real channels 1 and 1 + 3
    touched = x.grad.abs().sum(dim=(0, 2, 3)) > 0
    assert touched.tolist() == [False, True, False, False, True, False]


@pytest.mark.parametrize("rules,n", [("complex", 2), ("random", 2), ("random", 4), ("quaternion", 4)])
def test_initialisation_gives_the_real_weight_he_variance(rules, n):
    """The real block W has variance 2 / real fan-in (He). Complex and quaternion rules put exactly one
    ±1 at each (a, b); PHM's random rules scale block (a, b) by sum_i A_i[a, b]^2, which is n·(1/n) = 1 in
    expectation: given the drawn rules the variance is 2 / fan-in times its mean over the n x n blocks."""
    torch.manual_seed(10)
    conv = HypercomplexConv2d(64, 256, 3, n, rules)
    block = conv.block_weight().detach()
    expected = 2.0 / (64 * 9)
    if rules == "random":
        expected *= conv.rules.detach().pow(2).sum(0).mean().item()
    # >= 36,864 independent weights behind the block: the relative std of their sample variance is below
    # 1.5% (kurtosis <= 9, the quaternion modulus-and-phase draw); 5% is more than three of it
    assert block.var().item() == pytest.approx(expected, rel=0.05)
    assert abs(block.mean().item()) < 5 * math.sqrt(expected / conv.weight.numel())


@pytest.mark.parametrize("n", [2, 3])
def test_batch_norm_of_n_components(n):
    """norm: per number channel mean 0 and E|q|^2 = 1; whiten: identity covariance — for n components."""
    torch.manual_seed(11)
    c = 3
    mix = torch.randn(c, n, n)
    z = torch.randn(64, c, n, 4, 4)
    q = torch.einsum("cab,ncbhw->ncahw", mix, z) + torch.randn(c, n)[None, :, :, None, None]
    x = q.permute(0, 2, 1, 3, 4).reshape(64, n * c, 4, 4)      # component-major channels

    norm = QBatchNorm2d(n * c, "norm", components=n).train()
    y = norm(x).view(64, n, c, 4, 4)
    samples = y.permute(2, 1, 0, 3, 4).reshape(c, n, -1)       # (channel, component, sample)
    torch.testing.assert_close(samples.mean(-1), torch.zeros(c, n), rtol=0, atol=1e-5)
    second_moment = samples.pow(2).sum(1).mean(-1)             # E|q|^2 per channel (biased, as in training)
    torch.testing.assert_close(second_moment, torch.ones(c), rtol=1e-4, atol=1e-4)
    assert norm.weight.shape == (c,) and norm.bias.shape == (n * c,)

    whiten = QBatchNorm2d(n * c, "whiten", eps=1e-6, components=n).train()
    w = whiten(x).view(64, n, c, 4, 4).permute(2, 1, 0, 3, 4).reshape(c, n, -1)
    cov = w @ w.transpose(1, 2) / w.shape[-1]
    torch.testing.assert_close(cov, torch.eye(n).expand(c, n, n), rtol=0, atol=1e-3)
    assert whiten.weight.shape == (c, n, n)


def test_layers_refuse_widths_and_rules_that_do_not_fit():
    with pytest.raises(ValueError, match="in_features divisible by 3"):
        HypercomplexLinear(10, 6, 3, "random")
    with pytest.raises(ValueError, match="needs n=2"):
        HypercomplexLinear(8, 8, 4, "complex")
    with pytest.raises(ValueError, match="needs n=4"):
        HypercomplexConv2d(6, 6, 3, 2, "quaternion")
    with pytest.raises(ValueError, match="rules"):
        HypercomplexLinear(8, 8, 2, "octonion")
