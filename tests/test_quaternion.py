"""The quaternion layers against the Hamilton product written out from its definition."""

import math

import pytest
import torch
import torch.nn.functional as F

from qprune.quaternion import QConv2d, QLinear, hamilton_block, hamilton_product, quaternion_init_


def _components(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Split a component-major axis [r|i|j|k] into a trailing quaternion axis."""
    return torch.stack(x.chunk(4, dim=dim), dim=-1)


@pytest.mark.parametrize("batch,n_in,n_out", [(1, 1, 1), (3, 2, 5), (4, 7, 3)])
def test_qlinear_equals_explicit_hamilton_products(batch, n_in, n_out):
    torch.manual_seed(batch * 100 + n_in)
    layer = QLinear(4 * n_in, 4 * n_out).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(batch, 4 * n_in, dtype=torch.float64)
    q_in = _components(x, 1)                        # (B, N, 4)
    w = layer.weight.permute(1, 2, 0)               # (M, N, 4)
    # y_m = sum_n w_mn ⊗ x_n  (left multiplication by the weight)
    expected = hamilton_product(w[None], q_in[:, None]).sum(2)  # (B, M, 4)
    expected = torch.cat(expected.unbind(-1), dim=1) + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "n_in,n_out,kernel,stride,padding,groups",
    [(1, 2, 3, 1, 1, 1), (2, 3, 1, 1, 0, 1), (3, 2, 3, 2, 0, 1), (4, 6, 3, 1, 1, 2), (3, 3, 3, 1, 1, 3)],
)
def test_qconv2d_equals_explicit_hamilton_products(n_in, n_out, kernel, stride, padding, groups):
    torch.manual_seed(n_in * 10 + n_out + groups)
    layer = QConv2d(4 * n_in, 4 * n_out, kernel, stride, padding, groups=groups).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4 * n_in, 6, 7, dtype=torch.float64)
    patches = F.unfold(x, kernel, padding=padding, stride=stride)        # (B, 4N·k², L)
    patches = patches.view(2, 4, n_in, kernel * kernel, -1)             # component-major channels
    q_in = patches.permute(0, 4, 2, 3, 1)                                # (B, L, N, k², 4)
    w = layer.weight.flatten(3).permute(1, 2, 3, 0)                      # (M, N/g, k², 4)
    gin, gout = n_in // groups, n_out // groups
    out = torch.zeros(2, q_in.shape[1], n_out, 4, dtype=torch.float64)
    for m in range(n_out):
        g = m // gout
        prod = hamilton_product(w[m][None, None], q_in[:, :, g * gin:(g + 1) * gin])
        out[:, :, m] = prod.sum(dim=(2, 3))
    h_out = (6 + 2 * padding - kernel) // stride + 1
    expected = out.permute(0, 3, 2, 1).reshape(2, 4 * n_out, h_out, -1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_block_is_the_documented_matrix():
    r, x, y, z = 1.0, 2.0, 3.0, 5.0
    w = torch.tensor([r, x, y, z]).view(4, 1, 1)
    expected = torch.tensor([[r, -x, -y, -z], [x, r, -z, y], [y, z, r, -x], [z, -y, x, r]])
    torch.testing.assert_close(hamilton_block(w), expected)


@pytest.mark.parametrize("make", [lambda: QLinear(8, 12), lambda: QConv2d(8, 8, 3, padding=1, groups=2)])
def test_gradients_match_finite_differences(make):
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(2, 8, *(() if isinstance(layer, QLinear) else (5, 5)), dtype=torch.float64, requires_grad=True)

    def f(inp, weight, bias):
        layer.weight, layer.bias = weight, bias
        return layer(inp)

    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    del layer.weight, layer.bias
    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(lambda w: hamilton_block(w).pow(2).sum(), (weight,))


def test_initialisation_variance_matches_the_formula():
    fan_in_q, k = 16, 3
    layer = QConv2d(4 * fan_in_q, 4 * 64, k)
    fan_in = fan_in_q * k * k
    w = layer.weight.detach().double()
    modulus_sq = w.pow(2).sum(0)
    # E|q|² = 4σ² = 2 / fan_in, i.e. He's variance per real output
    assert modulus_sq.mean().item() == pytest.approx(2 / fan_in, rel=0.03)
    # |q|²/σ² is chi-squared with 4 degrees of freedom: E|q|⁴ = (8 + 16)·σ⁴
    sigma_sq = 1 / (2 * fan_in)
    assert modulus_sq.pow(2).mean().item() == pytest.approx(24 * sigma_sq**2, rel=0.06)
    # uniform phase: E[r²] = E|q|²/2, and each imaginary axis gets a third of the rest
    assert w[0].pow(2).mean().item() == pytest.approx(2 * sigma_sq, rel=0.04)
    for c in (1, 2, 3):
        assert w[c].pow(2).mean().item() == pytest.approx(2 * sigma_sq / 3, rel=0.06)
    assert w.mean().abs().item() < 0.02 * math.sqrt(sigma_sq)
    assert layer.bias.abs().max().item() == 0


def test_initialisation_reproduces_with_seed():
    torch.manual_seed(7)
    a = QLinear(16, 16).weight.detach().clone()
    torch.manual_seed(7)
    b = QLinear(16, 16).weight.detach()
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(3)
    c = quaternion_init_(torch.empty(4, 5, 5), 5, generator=g)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(c, quaternion_init_(torch.empty(4, 5, 5), 5, generator=g))


def test_quaternion_layers_hold_a_quarter_of_the_real_parameters():
    q = QConv2d(64, 128, 3)
    r = torch.nn.Conv2d(64, 128, 3)
    assert q.weight.numel() * 4 == r.weight.numel()
    assert q.block_weight().shape == r.weight.shape


@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 2, 3, 3, 3)])
def test_both_block_formulations_equal_the_written_out_block(shape):
    """The CUDA (gather) and CPU (row copy) formulations give the same block and gradient on any device."""
    from qprune.quaternion import _block_gather, _block_gather_backward, _block_rows, _block_rows_backward

    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    r, x, y, z = w
    rows = [(r, -x, -y, -z), (x, r, -z, y), (y, z, r, -x), (z, -y, x, r)]
    expected = torch.cat([torch.cat(row, dim=1) for row in rows], dim=0)
    m = shape[1]
    flat = w.reshape(4, m, -1)
    for block in (_block_gather(flat), _block_rows(flat)):
        assert torch.equal(block.reshape(expected.shape), expected)
    grad = torch.randn_like(expected)
    w_ref = w.clone().requires_grad_()
    r, x, y, z = w_ref
    rows = [(r, -x, -y, -z), (x, r, -z, y), (y, z, r, -x), (z, -y, x, r)]
    torch.cat([torch.cat(row, dim=1) for row in rows], dim=0).backward(grad)
    for backward in (_block_gather_backward, _block_rows_backward):
        torch.testing.assert_close(backward(grad.reshape(4, m, 4, -1)).reshape(shape), w_ref.grad, rtol=1e-12, atol=1e-12)


def test_block_under_vmap_equals_one_weight_at_a_time():
    """trials=K stacks K quaternion weights and builds their blocks through vmap."""
    torch.manual_seed(0)
    weights = torch.randn(3, 4, 2, 5, 3, 3, requires_grad=True)
    batched = torch.func.vmap(hamilton_block)(weights)
    looped = torch.stack([hamilton_block(w) for w in weights])
    assert torch.equal(batched, looped)
    grad = torch.randn_like(batched)
    assert torch.equal(torch.autograd.grad(batched, weights, grad)[0], torch.autograd.grad(looped, weights, grad)[0])
