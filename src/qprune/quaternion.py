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
device from a 4x4 component table and a 4x4 sign table, in two kernels forward and three
backward (no Python loop over components, no host copy, no scatter): on CUDA by one gather
(fewest kernels, which is what a CUDA-graph step pays for), on the CPU by copying whole rows
with ``index_select`` (the CPU gather kernel is several times slower than row copies).
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(component (4, 4), sign (4, 4), rows by component (16,)) on ``device``, made once per device.

    ``rows by component`` lists the rows 4a + b of the (a, b) block grid grouped by their
    component c = a ^ b, for the CPU backward. Cached so that a step captured in a CUDA graph
    creates no tensors (the warm-up before the capture fills the cache).
    """
    a = torch.arange(4)
    component = a[:, None] ^ a[None, :]
    rows_by_component = (4 * a[None, :] + component.t()).flatten()  # [c, a] -> row 4a + (a ^ c)
    sign = torch.tensor(_SIGN, dtype=dtype)
    return component.to(device), sign.to(device), rows_by_component.to(device)


def _block_gather(weight: Tensor) -> Tensor:
    """(4, M, N·k) -> (4, M, 4, N·k) block: one gather with a broadcast index, one sign multiply."""
    _, m, nk = weight.shape
    component, sign, _ = _tables(weight.device, weight.dtype)
    index = component.view(4, 1, 4, 1).expand(4, m, 4, nk)
    source = weight.reshape(4, m, 1, nk).expand(4, m, 4, nk)
    return torch.gather(source, 0, index) * sign.view(4, 1, 4, 1)


def _block_gather_backward(grad: Tensor) -> Tensor:
    """(4, M, 4, N·k) -> (4, M, N·k): grad[c] = sum_b sign[c^b, b] * grad_block[c^b, :, b, :]."""
    _, m, _, nk = grad.shape
    component, sign, _ = _tables(grad.device, grad.dtype)
    signed = grad * sign.view(4, 1, 4, 1)
    return torch.gather(signed, 0, component.view(4, 1, 4, 1).expand(4, m, 4, nk)).sum(2)


def _block_rows(weight: Tensor) -> Tensor:
    """The same block by row copies: (a, b) rows of components, signed, then laid out (a, M, b, N·k)."""
    _, m, nk = weight.shape
    component, sign, _ = _tables(weight.device, weight.dtype)
    rows = torch.index_select(weight.reshape(4, m * nk), 0, component.flatten()).view(4, 4, m, nk)
    return (rows * sign.view(4, 4, 1, 1)).transpose(1, 2).contiguous()


def _block_rows_backward(grad: Tensor) -> Tensor:
    _, m, _, nk = grad.shape
    _, sign, rows_by_component = _tables(grad.device, grad.dtype)
    signed = (grad.transpose(1, 2) * sign.view(4, 4, 1, 1)).reshape(16, m * nk)
    return torch.index_select(signed, 0, rows_by_component).view(4, 4, m, nk).sum(1)


class _HamiltonBlock(torch.autograd.Function):
    """(4, M, N·k) components -> (4, M, 4, N·k) block; the backward gathers instead of scattering."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: Tensor) -> Tensor:
        return _block_gather(weight) if weight.is_cuda else _block_rows(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_block: Tensor):
        return _block_gather_backward(grad_block) if grad_block.is_cuda else _block_rows_backward(grad_block)


def hamilton_block(weight: Tensor) -> Tensor:
    """Real weight ``(4M, 4N, *k)`` of the Hamilton product with components ``weight (4, M, N, *k)``."""
    if weight.shape[0] != 4:
        raise ValueError(f"quaternion weight needs 4 components on dim 0, got shape {tuple(weight.shape)}")
    m, n, kernel = weight.shape[1], weight.shape[2], weight.shape[3:]
    block = _HamiltonBlock.apply(weight.reshape(4, m, -1))
    return block.reshape(4 * m, 4 * n, *kernel)


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


INIT_SCHEMES = ("he", "study")


@torch.no_grad()
def quaternion_init_(
    weight: Tensor, fan_in: int, generator: torch.Generator | None = None, scheme: str = "he",
) -> Tensor:
    """Parcollet et al.'s polar quaternion initialisation, in place, at one of two scales.

    The modulus follows a chi distribution with 4 degrees of freedom scaled by sigma, the phase
    is uniform in [-pi, pi] and the imaginary part points along a random unit axis, so
    E|q|^2 = 4·sigma^2 and every real component has standard deviation sigma on average.

    ``he``: sigma = 1/sqrt(2·fan_in) (fan_in = quaternion inputs x kernel area), so that each real
    output sees the variance of He's initialisation; the axis is uniform on the sphere.
    ``study``: the original study's code (hTorch), sigma = 1/sqrt(8·fan_in) with the fan-in *it*
    computed (see :func:`study_fan_in`), and the axis a U(-1, 1)^3 vector normalised to length 1.
    Drawn from torch's RNG (or ``generator``) so seeds reproduce.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"quaternion init must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
    shape, device, dtype = weight.shape[1:], weight.device, weight.dtype
    sigma = 1.0 / math.sqrt((2.0 if scheme == "he" else 8.0) * fan_in)
    modulus = sigma * torch.randn((4, *shape), generator=generator, device=device, dtype=dtype).norm(dim=0)
    phase = (torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1) * math.pi
    if scheme == "he":
        axis = torch.randn((3, *shape), generator=generator, device=device, dtype=dtype)
    else:
        axis = torch.rand((3, *shape), generator=generator, device=device, dtype=dtype) * 2 - 1
    axis = axis / axis.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)
    weight[0] = modulus * torch.cos(phase)
    weight[1:] = modulus * torch.sin(phase) * axis
    return weight


def study_fan_in(in_quaternions: int, kernel_size: int | tuple[int, ...] | None) -> int:
    """The fan-in the original code used: input quaternions x ``np.prod(kernel_size)`` *as given*.

    Its convolutions pass an integer kernel size, so a 3x3 conv counts 3 (not 9) per input
    quaternion; a tuple counts its product, a linear layer (None) counts 1.
    """
    if kernel_size is None:
        return in_quaternions
    return in_quaternions * (kernel_size if isinstance(kernel_size, int) else math.prod(kernel_size))


class _QuaternionLayer(nn.Module):
    """Shared parameter handling: components (4, out, in, *k), real bias per real output.

    ``init`` picks the initialisation scale (:func:`quaternion_init_`: ``he`` or ``study``).
    """

    in_quaternions: int
    out_quaternions: int
    init: str = "he"
    kernel_arg: int | tuple[int, ...] | None = None  # the kernel size as given (the study's fan-in reads it)

    def _init_parameters(self, kernel: tuple[int, ...], groups: int, bias: bool, init: str) -> None:
        if init not in INIT_SCHEMES:
            raise ValueError(f"quaternion init must be one of {', '.join(INIT_SCHEMES)}, got {init!r}")
        self.init = init
        self.weight = nn.Parameter(torch.empty(4, self.out_quaternions, self.in_quaternions // groups, *kernel))
        self.bias = nn.Parameter(torch.empty(4 * self.out_quaternions)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "he":
            fan_in = self.weight.shape[2] * math.prod(self.weight.shape[3:])
        else:
            fan_in = study_fan_in(self.weight.shape[2], self.kernel_arg)
        quaternion_init_(self.weight, fan_in, scheme=self.init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def block_weight(self) -> Tensor:
        """The real ``(4·out, 4·in/groups, *k)`` weight this layer multiplies with."""
        return hamilton_block(self.weight)


class QLinear(_QuaternionLayer):
    """Quaternion fully connected layer; ``in_features``/``out_features`` are real widths."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: str = "he"):
        super().__init__()
        _check_divisible(in_features, "in_features")
        _check_divisible(out_features, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self.in_quaternions, self.out_quaternions = in_features // 4, out_features // 4
        self._init_parameters((), 1, bias, init)

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
        init: str = "he",
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
        self.kernel_arg = kernel_size
        self.stride, self.padding = stride, padding
        self.dilation, self.groups = dilation, groups
        self._init_parameters(self.kernel_size, groups, bias, init)

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
