"""Quaternion batch norm: the statistics it promises, running statistics, gradients, rotations."""

import pytest
import torch
from torch.func import functional_call

from qprune.algebra import Algebra
from qprune.errors import ConfigError
from qprune.quaternion import hamilton_product
from qprune.quaternion_norm import QBatchNorm2d

N, C, H, W = 32, 3, 5, 6  # C quaternion channels


def correlated_input(seed=0, dtype=torch.float32, n=N):
    """(n, 4C, H, W) with a different mean and a strongly correlated 4x4 covariance per channel."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(C, 4, 4, generator=g, dtype=dtype) + 2 * torch.eye(4, dtype=dtype)
    mix[:, :, 0] += 1.5  # every component leans on the first one: correlated
    mean = 3 * torch.randn(4, C, generator=g, dtype=dtype)
    z = torch.randn(n, C, 4, H, W, generator=g, dtype=dtype)
    q = torch.einsum("cab,ncbhw->nachw", mix, z) + mean[None, :, :, None, None]
    return q.reshape(n, 4 * C, H, W)


def quaternions(x):
    """(N, 4C, H, W) component-major -> (N, C, H, W, 4) quaternions."""
    n, _, h, w = x.shape
    return x.view(n, 4, -1, h, w).permute(0, 2, 3, 4, 1)


def channels(q):
    """Inverse of `quaternions`."""
    n, c, h, w, _ = q.shape
    return q.permute(0, 4, 1, 2, 3).reshape(n, 4 * c, h, w)


def statistics(y):
    """Per quaternion channel: mean (C, 4), covariance (C, 4, 4), E|q|² (C,)."""
    q = quaternions(y).transpose(0, 1).reshape(C, -1, 4)
    mean = q.mean(1)
    centred = q - mean[:, None]
    return mean, centred.transpose(1, 2) @ centred / q.shape[1], q.pow(2).sum(-1).mean(1)


def test_input_is_really_correlated():
    _, cov, _ = statistics(correlated_input())
    corr = cov / (cov.diagonal(dim1=1, dim2=2)[:, :, None] * cov.diagonal(dim1=1, dim2=2)[:, None, :]).sqrt()
    assert (corr - torch.eye(4)).abs().amax() > 0.5


def test_norm_mode_centres_and_gives_unit_quaternion_power():
    x = correlated_input()
    y = QBatchNorm2d(4 * C, "norm").train()(x)
    mean, cov, power = statistics(y)
    assert mean.abs().max() < 1e-5
    torch.testing.assert_close(power, torch.ones(C), atol=1e-4, rtol=0)
    # one variance for the quaternion, not one per component: the components keep their ratios
    _, cov_in, _ = statistics(x)
    ratio = cov.diagonal(dim1=1, dim2=2) / cov_in.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(ratio, ratio[:, :1].expand(C, 4), rtol=1e-4, atol=0)


def test_norm_mode_is_the_formula_with_scale_and_shift():
    x = correlated_input(1, torch.float64)
    bn = QBatchNorm2d(4 * C, "norm").double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    q = quaternions(x)
    mu = q.mean((0, 2, 3), keepdim=True)
    v = (q - mu).pow(2).sum(-1).mean((0, 2, 3))
    expected = bn.weight.view(1, C, 1, 1, 1) * (q - mu) / (v + bn.eps).sqrt().view(1, C, 1, 1, 1)
    expected = channels(expected) + bn.bias.view(1, 4 * C, 1, 1)
    torch.testing.assert_close(bn(x), expected, rtol=1e-10, atol=1e-10)


def test_whiten_mode_gives_identity_covariance():
    y = QBatchNorm2d(4 * C, "whiten").train()(correlated_input())
    mean, cov, _ = statistics(y)
    assert mean.abs().max() < 1e-4
    torch.testing.assert_close(cov, torch.eye(4).expand(C, 4, 4), atol=2e-3, rtol=0)


def test_whiten_mode_copes_with_the_rank_3_covariance_of_rgb_and_gray():
    x = quaternions(correlated_input(2))
    gray = 0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]  # the 4th input channel
    x = channels(torch.cat((x[..., :3], gray[..., None]), -1))
    y = QBatchNorm2d(4 * C, "whiten").train()(x)
    assert torch.isfinite(y).all()
    _, cov, _ = statistics(y)
    torch.testing.assert_close(cov[:, :3, :3], torch.eye(3).expand(C, 3, 3), atol=2e-3, rtol=0)
    assert cov[:, 3, 3].max() < 0.05, "the redundant component carries (almost) nothing"


@pytest.mark.parametrize("mode", ["norm", "whiten"])
def test_eval_mode_uses_the_running_statistics(mode):
    bn = QBatchNorm2d(4 * C, mode, momentum=1.0).double()  # momentum 1: running = last batch's
    a, b = correlated_input(3, torch.float64), 2 * correlated_input(4, torch.float64) + 1
    bn.train()(a)
    qa = quaternions(a).transpose(0, 1).reshape(C, -1, 4)
    m = qa.shape[1]
    torch.testing.assert_close(bn.running_mean.view(4, C).t(), qa.mean(1))
    centred = qa - qa.mean(1, keepdim=True)
    if mode == "norm":
        # the mean component variance E|q - μ|²/4, unbiased over the 4m pooled samples
        torch.testing.assert_close(bn.running_var, centred.pow(2).sum((1, 2)) / (4 * m - 1))
    else:
        torch.testing.assert_close(bn.running_cov, centred.transpose(1, 2) @ centred / (m - 1))
    evaluated = bn.eval()(b)  # b normalised with a's statistics
    if mode == "norm":
        qb = quaternions(b)
        mu, v = bn.running_mean.view(4, C).t(), bn.running_var
        expected = channels((qb - mu[None, :, None, None]) / (4 * v + bn.eps).sqrt()[None, :, None, None, None])
    else:
        lower = torch.linalg.cholesky(bn.running_cov + bn.eps * torch.eye(4, dtype=torch.float64))
        qb = quaternions(b) - bn.running_mean.view(4, C).t()[None, :, None, None]
        expected = channels(torch.linalg.solve_triangular(lower[None, :, None, None], qb[..., None], upper=False)[..., 0])
    torch.testing.assert_close(evaluated, expected)
    assert (evaluated - bn.train()(b)).abs().max() > 0.1, "batch statistics would give another output"


@pytest.mark.parametrize("mode", ["norm", "whiten"])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_finite_differences(mode, training):
    torch.manual_seed(0)
    bn = QBatchNorm2d(8, mode).double().train(training)
    with torch.no_grad():
        bn.weight.add_(0.3 * torch.randn_like(bn.weight))
        bn.bias.normal_()
        if not training:  # non-trivial running statistics
            bn.train()(correlated_input(5, torch.float64)[:, :8])
            bn.eval()
    x = (torch.randn(3, 8, 2, 3, dtype=torch.float64) + torch.arange(8.0, dtype=torch.float64).view(1, 8, 1, 1)).requires_grad_()
    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()

    def f(inp, w, b):
        return functional_call(bn, {"weight": w, "bias": b}, (inp,))

    assert torch.autograd.gradcheck(f, (x, weight, bias))


def random_unit_quaternion(g, dtype=torch.float64):
    u = torch.randn(4, generator=g, dtype=dtype)
    return u / u.norm()


def conjugate(u):
    return u * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=u.dtype)


def test_norm_mode_is_equivariant_to_left_and_right_multiplication():
    g = torch.Generator().manual_seed(6)
    x = correlated_input(6, torch.float64)
    bn = QBatchNorm2d(4 * C, "norm").double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)  # a real scale commutes with quaternions; the shift stays 0
    u, v = random_unit_quaternion(g), random_unit_quaternion(g)
    rotated = channels(hamilton_product(hamilton_product(u, quaternions(x)), v))   # u q v
    expected = channels(hamilton_product(hamilton_product(u, quaternions(bn(x))), v))
    torch.testing.assert_close(bn(rotated), expected, rtol=1e-10, atol=1e-10)


def test_whiten_mode_is_invariant_to_lower_triangular_mixing():
    g = torch.Generator().manual_seed(7)
    x = correlated_input(7, torch.float64)
    bn = QBatchNorm2d(4 * C, "whiten", eps=1e-12).double().train()
    with torch.no_grad():
        bn.weight.add_(0.5 * torch.randn(bn.weight.shape, generator=g, dtype=torch.float64))
        bn.bias.normal_(generator=g)
    mixing = torch.randn(4, 4, generator=g, dtype=torch.float64).tril()
    mixing.diagonal().copy_(torch.rand(4, generator=g, dtype=torch.float64) + 0.2)  # positive diagonal
    mixed = channels(quaternions(x) @ mixing.t())
    torch.testing.assert_close(bn(mixed), bn(x), rtol=1e-8, atol=1e-8)


def test_whiten_mode_is_equivariant_only_to_sign_flipping_rotations():
    g = torch.Generator().manual_seed(8)
    x = correlated_input(8, torch.float64)
    bn = QBatchNorm2d(4 * C, "whiten", eps=1e-12).double().train()
    y = quaternions(bn(x))

    def rotate(u, q):  # u q ū
        return hamilton_product(hamilton_product(u, q), conjugate(u))

    i = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(quaternions(bn(channels(rotate(i, quaternions(x))))), rotate(i, y), rtol=1e-8, atol=1e-8)
    u = random_unit_quaternion(g)
    for transformed, expected in (
        (rotate(u, quaternions(x)), rotate(u, y)),
        (hamilton_product(u, quaternions(x)), hamilton_product(u, y)),
        (hamilton_product(quaternions(x), u), hamilton_product(y, u)),
    ):
        out = quaternions(bn(channels(transformed)))
        assert (out - expected).abs().max() > 0.1, "Cholesky whitening fixes a basis: not rotation-equivariant"
        _, cov, _ = statistics(channels(out))
        torch.testing.assert_close(cov, torch.eye(4, dtype=torch.float64).expand(C, 4, 4), atol=1e-8, rtol=0)


@pytest.mark.parametrize("mode", ["norm", "whiten"])
def test_a_pruned_away_channel_stays_zero(mode):
    x = correlated_input(9)
    x.view(N, 4, C, H, W)[:, :, 1] = 0  # every filter of quaternion channel 1 pruned: constant 0 output
    y = QBatchNorm2d(4 * C, mode).train()(x).view(N, 4, C, H, W)
    assert torch.isfinite(y).all() and y[:, :, 1].abs().max() == 0
    assert y[:, :, 0].abs().max() > 0.5


def test_bad_settings():
    with pytest.raises(ValueError, match="divisible by 4"):
        QBatchNorm2d(6)
    with pytest.raises(ValueError, match="mode"):
        QBatchNorm2d(8, "zca")
    with pytest.raises(ConfigError, match="algebra.qbn must be one of norm, whiten, got 'zca'"):
        Algebra("quat", qbn="zca")
    assert isinstance(Algebra("real4", qbn="whiten").batchnorm(8), torch.nn.BatchNorm2d)
    bn = Algebra("quat", qbn="whiten").batchnorm(8)
    assert isinstance(bn, QBatchNorm2d) and bn.mode == "whiten"
    # parameters per quaternion channel: norm 1 scale + 4 shifts, whiten a 4x4 scale + 4 shifts
    assert sum(p.numel() for p in QBatchNorm2d(64, "norm").parameters()) == 16 * 5
    assert sum(p.numel() for p in QBatchNorm2d(64, "whiten").parameters()) == 16 * 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["norm", "whiten"])
def test_no_host_syncs_on_the_gpu(mode):
    bn = QBatchNorm2d(64, mode).cuda()
    x = torch.randn(16, 64, 8, 8, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bn.train()(x).square().sum().backward()
        with torch.no_grad():
            bn.eval()(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
