"""Complex and learned (PHM) hypercomplex layers: a real weight that is a sum of Kronecker products.

An algebra of n components multiplies by left multiplication, which for every algebra used here
is a sum of Kronecker products

    W = Σᵢ Aᵢ ⊗ Sᵢ        (i = 1..n)

of an n×n *rule* matrix Aᵢ (the left multiplication by basis element i) and the layer's weight
component Sᵢ of shape ``(out/n, in/n, *kernel)``. Entry (a·M + m, b·K + k) of W is
Σᵢ Aᵢ[a, b] Sᵢ[m, k], so activations are component-major ``[c₀ | c₁ | … | cₙ₋₁]``, as in
:mod:`qprune.quaternion`, and one real matmul/conv does the whole product:

- **complex** (n = 2): A₁ = I, A₂ = [[0, −1], [1, 0]], so a weight a + ib acts as the block
  [[a, −b], [b, a]]: half the weights of a real layer of the same real width.
- **quaternion** (n = 4): the Aᵢ are the Hamilton block of the basis quaternions 1, i, j, k;
  :func:`quaternion_rules` takes them from :func:`qprune.quaternion.hamilton_block`, the one sign
  table. (The ``quat`` algebra keeps its own gather-based layers; these rules start PHM-4 as it.)
- **PHM** (parameterized hypercomplex multiplication, Zhang et al., ICLR 2021; its convolution is
  Grassucci et al.'s PHC, 2021): the Aᵢ are *learned* — n³ parameters a layer, never pruned —
  so the network learns its own multiplication rule; ``rules="quaternion"`` starts it as the
  quaternion algebra, ``"random"`` anywhere.

The weight is stored as one parameter ``weight`` of shape ``(n, out/n, in/n, *kernel)`` (Sᵢ =
``weight[i]``, the same layout as a quaternion layer, so pruning ranks components and whole
numbers alike) and, for PHM, ``rules`` of shape ``(n, n, n)``. W is assembled on the device by
one matmul ``(n², n) @ (n, M·K)`` and one permuting copy: no Python loop over components, and
plain differentiable ops, so autograd, ``vmap`` (``trials=K``) and CUDA-graph capture need nothing
special. The fixed rules (complex) are made once per device and dtype, never inside a step.
The assembly runs outside autocast: with ``train.precision=bf16`` W is built in fp32 and the
conv/matmul casts it, as for quaternion layers. (Under ``train.precision=tf32`` the assembly
matmul is a TF32 matmul like every other; ``fp32`` turns TF32 off.)

Initialisation, He's criterion for every real output (variance 2 / real fan-in):

- complex: real and imaginary parts drawn N(0, σ²), σ² = 1/fan_in (fan_in = complex inputs ×
  kernel area). This *is* Trabelsi et al.'s complex He initialisation: a Rayleigh modulus with
  scale σ and a uniform phase is the same distribution as two independent N(0, σ²) parts.
- PHM, ``rules="quaternion"`` (n = 4): Aᵢ the quaternion basis, Sᵢ by Parcollet et al.'s
  quaternion initialisation (:func:`qprune.quaternion.quaternion_init_`) at the layer's ``init``
  scale (``he``, or ``study``: the original study's code's): with the same seed the layer starts
  with exactly the quat layer's weights. (``init`` has no other use here: the study had no complex
  or learned-rule layers, so they keep the He scale.)
- PHM, ``rules="random"``: Aᵢ entries N(0, 1/n) and Sᵢ entries N(0, 2/(n·fan_in)), so each entry
  of W = Σᵢ Aᵢ ⊗ Sᵢ has variance n · (1/n) · 2/(n·fan_in) = 2 / real fan-in, as above.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quaternion import INIT_SCHEMES, hamilton_block, quaternion_init_, study_fan_in

RULES = ("complex", "random", "quaternion")   # fixed complex rules; learned (PHM) from random or quaternion
PHM_RULES = ("random", "quaternion")


def complex_rules(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """(2, 2, 2): the left multiplications by 1 and by i on [re, im]."""
    return _complex_rules(torch.device(device or "cpu"), dtype or torch.get_default_dtype())


@functools.lru_cache(maxsize=None)
def _complex_rules(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [1.0, 0.0]]], dtype=dtype, device=device)


def quaternion_rules(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """(4, 4, 4): Aᵢ = the Hamilton block of basis quaternion i (1, i, j, k) as a 1×1 quaternion weight."""
    basis = torch.eye(4, dtype=dtype or torch.get_default_dtype(), device=device).view(4, 4, 1, 1)
    return torch.stack([hamilton_block(e) for e in basis])


def kronecker_block(rules: Tensor, weight: Tensor) -> Tensor:
    """The real weight ``(n·M, n·K, *k)`` = Σᵢ rules[i] ⊗ weight[i], for rules ``(n, n, n)`` and weight ``(n, M, K, *k)``."""
    n, m, k, kernel = weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3:]
    if rules.shape != (n, n, n):
        raise ValueError(f"rules of shape {tuple(rules.shape)} do not fit a weight of {n} components (need ({n}, {n}, {n}))")
    with torch.autocast(weight.device.type, enabled=False):
        products = rules.reshape(n, n * n).t() @ weight.reshape(n, -1)   # rows (a, b), columns (m, k, kernel)
        return products.reshape(n, n, m, -1).transpose(1, 2).reshape(n * m, n * k, *kernel)


class _KroneckerLayer(nn.Module):
    """Shared parameter handling: components ``weight (n, out/n, in/n/groups, *k)``, PHM's ``rules``, a real bias."""

    components: int
    rule_init: str
    in_numbers: int
    out_numbers: int
    init: str = "he"                                   # quaternion rules: the quaternion init's scale
    kernel_arg: int | tuple[int, ...] | None = None    # the kernel size as given (the study's fan-in reads it)

    def _init_parameters(self, n: int, rules: str, kernel: tuple[int, ...], groups: int, bias: bool, init: str) -> None:
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)}, got {init!r}")
        self.init = init
        if rules not in RULES:
            raise ValueError(f"rules must be one of {', '.join(RULES)}, got {rules!r}")
        needs = {"complex": 2, "quaternion": 4}.get(rules)
        if needs is not None and n != needs:
            raise ValueError(f"rules={rules!r} needs n={needs} components, got n={n}")
        if n < 2:
            raise ValueError(f"a hypercomplex layer needs n >= 2 components, got n={n}")
        self.components, self.rule_init = n, rules
        self.weight = nn.Parameter(torch.empty(n, self.out_numbers, self.in_numbers // groups, *kernel))
        self.rules = nn.Parameter(torch.empty(n, n, n)) if self.learns_rules else None
        self.bias = nn.Parameter(torch.empty(n * self.out_numbers)) if bias else None
        self.reset_parameters()

    @property
    def learns_rules(self) -> bool:
        return self.rule_init != "complex"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = self.components
        fan_in = self.weight.shape[2] * math.prod(self.weight.shape[3:])
        if self.rule_init == "quaternion":
            self.rules.copy_(quaternion_rules(self.rules.device, self.rules.dtype))
            if self.init == "study":
                fan_in = study_fan_in(self.weight.shape[2], self.kernel_arg)
            quaternion_init_(self.weight, fan_in, scheme=self.init)
        else:
            if self.rules is not None:
                nn.init.normal_(self.rules, std=math.sqrt(1.0 / n))
            nn.init.normal_(self.weight, std=math.sqrt(2.0 / (n * fan_in)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def rule_matrices(self) -> Tensor:
        """The (n, n, n) rules Aᵢ: learned (PHM) or the complex numbers'."""
        if self.rules is not None:
            return self.rules
        return _complex_rules(self.weight.device, self.weight.dtype)

    def block_weight(self) -> Tensor:
        """The real ``(n·out, n·in/groups, *k)`` weight this layer multiplies with."""
        return kronecker_block(self.rule_matrices(), self.weight)

    def _describe(self) -> str:
        return f"n={self.components}, rules={self.rule_init}"


class HypercomplexLinear(_KroneckerLayer):
    """Fully connected layer of ``n`` components; ``in_features``/``out_features`` are real widths.

    ``rules="complex"`` (n = 2): complex numbers. ``"random"``/``"quaternion"``: PHM, learned rules.
    """

    def __init__(self, in_features: int, out_features: int, n: int, rules: str, bias: bool = True, init: str = "he"):
        super().__init__()
        check_divisible(in_features, n, "in_features")
        check_divisible(out_features, n, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self.in_numbers, self.out_numbers = in_features // n, out_features // n
        self._init_parameters(n, rules, (), 1, bias, init)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.block_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._describe()}, bias={self.bias is not None}"


class HypercomplexConv2d(_KroneckerLayer):
    """2-d convolution of ``n`` components; channel counts are real widths, ``groups`` counts groups of numbers.

    With ``groups > 1`` (depthwise: one filter per number channel) the component-major channels are
    regrouped so that each group's n components are adjacent, convolved with a real grouped conv,
    and put back; the rules are shared by the groups (one multiplication rule per layer).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], n: int, rules: str,
        stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, init: str = "he",
    ):
        super().__init__()
        check_divisible(in_channels, n, "in_channels")
        check_divisible(out_channels, n, "out_channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_numbers, self.out_numbers = in_channels // n, out_channels // n
        if self.in_numbers % groups or self.out_numbers % groups:
            raise ValueError(f"groups={groups} must divide the channel counts in numbers of {n} components "
                             f"({self.in_numbers} in, {self.out_numbers} out)")
        self.kernel_size, self.kernel_arg = nn.modules.utils._pair(kernel_size), kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._init_parameters(n, rules, self.kernel_size, groups, bias, init)

    def forward(self, x: Tensor) -> Tensor:
        weight, n, g = self.block_weight(), self.components, self.groups
        if g == 1:
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
        batch, _, h, w = x.shape
        gin, gout = self.in_numbers // g, self.out_numbers // g
        x = x.view(batch, n, g, gin, h, w).transpose(1, 2).reshape(batch, n * g * gin, h, w)
        weight = weight.view(n, g, gout, n * gin, *self.kernel_size).transpose(0, 1)
        weight = weight.reshape(n * g * gout, n * gin, *self.kernel_size)
        bias = None if self.bias is None else self.bias.view(n, g, gout).transpose(0, 1).reshape(-1)
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, g)
        ho, wo = y.shape[-2:]
        return y.view(batch, g, n, gout, ho, wo).transpose(1, 2).reshape(batch, n * g * gout, ho, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, {self._describe()}, bias={self.bias is not None}")


def check_divisible(width: int, n: int, what: str) -> None:
    if width % n:
        raise ValueError(f"a layer of {n}-component numbers needs its {what} divisible by {n} (real width), got {width}")
