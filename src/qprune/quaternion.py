"""Quaternion algebra: Hamilton-product layers computed as one real matmul/conv.

A quaternion weight q = r + xi + yj + zk acting on a quaternion input by left multiplication
is the real 4x4 matrix

    [[r, -x, -y, -z],
     [x,  r, -z,  y],
     [y,  z,  r, -x],
     [z, -y,  x,  r]]

Putting that block at every (output, input) pair gives a real weight of shape 4M x 4N built
from 4·M·N numbers: a quarter of the parameters of a real layer of the same real width, and
the same FLOPs. Activations are *component-major*: along the channel (or feature) axis come
all real parts, then all i parts, then j, then k — ``[r | i | j | k]``.

The weight is stored as one parameter of shape ``(4, out, in, *kernel)``: ``weight[0]`` is
the real component r, ``weight[1:]`` are x, y, z. The block matrix is assembled on the
device by one gather plus a sign multiply (no Python loop over components, no host copy);
its backward pass is the transposed gather, so no scatter-add is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Entry (a, b) of the Hamilton block is SIGN[a][b] * component[a ^ b]: the component index
# table of the block is the XOR table of {0, 1, 2, 3} (the Klein four-group).
_SIGN = (
    (1.0, -1.0, -1.0, -1.0),
    (1.0, 1.0, -1.0, 1.0),
    (1.0, 1.0, 1.0, -1.0),
    (1.0, -1.0, 1.0, 1.0),
)


def _index_tables(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    a = torch.arange(4, device=device)
    component = a[:, None] ^ a[None, :]
    sign = torch.tensor(_SIGN, device=device, dtype=dtype)
    return component, sign


class _HamiltonBlock(torch.autograd.Function):
    """(4, M, N, *k) components -> (4, M, 4, N, *k) block; backward gathers instead of scattering."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: Tensor, component: Tensor, sign: Tensor) -> Tensor:
        m, n = weight.shape[1], weight.shape[2]
        rows = torch.arange(m, device=weight.device).view(1, m, 1, 1)
        cols = torch.arange(n, device=weight.device).view(1, 1, 1, n)
        block = weight[component.view(4, 1, 4, 1), rows, cols]  # (4, M, 4, N, *k)
        trailing = (1,) * (weight.dim() - 3)
        return block * sign.view(4, 1, 4, 1, *trailing)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, component, sign = inputs
        ctx.save_for_backward(component, sign)

    @staticmethod
    def backward(ctx, grad_block: Tensor):
        component, sign = ctx.saved_tensors
        # grad[c] = sum_a sign[a, a^c] * grad_block[a, :, a^c, :]
        m, n = grad_block.shape[1], grad_block.shape[3]
        a = torch.arange(4, device=grad_block.device)
        rows = torch.arange(m, device=grad_block.device).view(1, 1, m, 1)
        cols = torch.arange(n, device=grad_block.device).view(1, 1, 1, n)
        b = component  # b = a ^ c, indexed [c, a]
        picked = grad_block[a.view(1, 4, 1, 1), rows, b.t().reshape(4, 4, 1, 1), cols]  # (c, a, M, N, *k)
        trailing = (1,) * (grad_block.dim() - 4)
        signs = sign[a.view(1, 4), b.t()].view(4, 4, 1, 1, *trailing)
        return (picked * signs).sum(dim=1), None, None


def hamilton_block(weight: Tensor, component: Tensor | None = None, sign: Tensor | None = None) -> Tensor:
    """Real weight ``(4M, 4N, *k)`` of the Hamilton product with components ``weight (4, M, N, *k)``."""
    if weight.shape[0] != 4:
        raise ValueError(f"quaternion weight needs 4 components on dim 0, got shape {tuple(weight.shape)}")
    if component is None or sign is None:
        component, sign = _index_tables(weight.device, weight.dtype)
    block = _HamiltonBlock.apply(weight, component, sign.to(weight.dtype))
    m, n = weight.shape[1], weight.shape[2]
    return block.reshape(4 * m, 4 * n, *weight.shape[3:])


def hamilton_product(p: Tensor, q: Tensor) -> Tensor:
    """Reference Hamilton product p ⊗ q of quaternions stored on the last dim (r, x, y, z).

    Written out term by term from the definition; used by tests to check the layers.
    """
    a1, b1, c1, d1 = p.unbind(-1)
    a2, b2, c2, d2 = q.unbind(-1)
    return torch.stack(
        (
            a1 * a2 - b1 * b2 - c1 * c2 - d1 * d2,
            a1 * b2 + b1 * a2 + c1 * d2 - d1 * c2,
            a1 * c2 - b1 * d2 + c1 * a2 + d1 * b2,
            a1 * d2 + b1 * c2 - c1 * b2 + d1 * a2,
        ),
        dim=-1,
    )


@torch.no_grad()
def quaternion_init_(weight: Tensor, fan_in: int, generator: torch.Generator | None = None) -> Tensor:
    """Parcollet et al.'s polar quaternion initialisation (He criterion), in place.

    The modulus follows a chi distribution with 4 degrees of freedom scaled by
    sigma = 1/sqrt(2·fan_in) (fan_in = quaternion inputs × kernel area), the phase is uniform
    in [-pi, pi] and the imaginary axis is a uniformly random unit vector, so that
    E|q|² = 4·sigma² = 2/fan_in: each real output sees the variance of He's initialisation.
    Drawn from torch's RNG (or ``generator``) so seeds reproduce.
    """
    shape, device, dtype = weight.shape[1:], weight.device, weight.dtype
    sigma = 1.0 / math.sqrt(2.0 * fan_in)
    modulus = sigma * torch.randn((4, *shape), generator=generator, device=device, dtype=dtype).norm(dim=0)
    phase = (torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1) * math.pi
    axis = torch.randn((3, *shape), generator=generator, device=device, dtype=dtype)
    axis = axis / axis.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)
    weight[0] = modulus * torch.cos(phase)
    weight[1:] = modulus * torch.sin(phase) * axis
    return weight


class _QuaternionLayer(nn.Module):
    """Shared parameter handling: components (4, out, in, *k), real bias per real output."""

    in_quaternions: int
    out_quaternions: int

    def _init_parameters(self, kernel: tuple[int, ...], groups: int, bias: bool) -> None:
        self.weight = nn.Parameter(torch.empty(4, self.out_quaternions, self.in_quaternions // groups, *kernel))
        self.bias = nn.Parameter(torch.empty(4 * self.out_quaternions)) if bias else None
        component, sign = _index_tables(torch.device("cpu"), torch.float32)
        self.register_buffer("_component", component, persistent=False)
        self.register_buffer("_sign", sign, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.weight.shape[2] * math.prod(self.weight.shape[3:])
        quaternion_init_(self.weight, fan_in)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def block_weight(self) -> Tensor:
        """The real ``(4·out, 4·in/groups, *k)`` weight this layer multiplies with."""
        return hamilton_block(self.weight, self._component, self._sign)


class QLinear(_QuaternionLayer):
    """Quaternion fully connected layer; ``in_features``/``out_features`` are real widths."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        _check_divisible(in_features, "in_features")
        _check_divisible(out_features, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self.in_quaternions, self.out_quaternions = in_features // 4, out_features // 4
        self._init_parameters((), 1, bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.block_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QConv2d(_QuaternionLayer):
    """Quaternion 2-d convolution; channel counts are real widths, ``groups`` counts quaternion groups.

    With ``groups > 1`` (e.g. depthwise: one quaternion filter per quaternion channel) the
    component-major channels are regrouped so that each group's four components are adjacent,
    convolved with a real grouped conv, and put back.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        _check_divisible(in_channels, "in_channels")
        _check_divisible(out_channels, "out_channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_quaternions, self.out_quaternions = in_channels // 4, out_channels // 4
        if self.in_quaternions % groups or self.out_quaternions % groups:
            raise ValueError(
                f"groups={groups} must divide the quaternion channel counts "
                f"({self.in_quaternions} in, {self.out_quaternions} out)"
            )
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride, self.padding = stride, padding
        self.dilation, self.groups = dilation, groups
        self._init_parameters(self.kernel_size, groups, bias)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.block_weight()
        g = self.groups
        if g == 1:
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
        n, _, h, w = x.shape
        gin, gout = self.in_quaternions // g, self.out_quaternions // g
        x = x.view(n, 4, g, gin, h, w).transpose(1, 2).reshape(n, 4 * g * gin, h, w)
        weight = weight.view(4, g, gout, 4 * gin, *self.kernel_size).transpose(0, 1)
        weight = weight.reshape(4 * g * gout, 4 * gin, *self.kernel_size)
        bias = None if self.bias is None else self.bias.view(4, g, gout).transpose(0, 1).reshape(-1)
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, g)
        ho, wo = y.shape[-2:]
        return y.view(n, g, 4, gout, ho, wo).transpose(1, 2).reshape(n, 4 * g * gout, ho, wo)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}"
        )


def _check_divisible(width: int, what: str) -> None:
    if width % 4:
        raise ValueError(f"a quaternion layer's {what} must be divisible by 4 (real width), got {width}")
