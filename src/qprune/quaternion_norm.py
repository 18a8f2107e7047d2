"""Quaternion batch normalisation: ``QBatchNorm2d`` in two modes, ``norm`` and ``whiten``.

Input channels are component-major real channels ``[r(C) | i(C) | j(C) | k(C)]``: C quaternion
channels, each with a real part and three imaginary parts. Per quaternion channel c, over the
batch and the image (M = N·H·W samples of a 4-vector q):

``norm`` (the default; cost close to real batch norm)
    four means μ (one per component), *one* variance v = E|q − μ|² of the quaternion, a shared
    real scale γ and a per-component shift β:  y = γ (q − μ) / sqrt(v + eps) + β.
    In training mode (γ = 1, β = 0) the output has mean 0 and E|y|² = 1, so each component has
    variance 1/4 on average. Computed as a per-component centring plus torch's own batch norm
    on the centred tensor with the four components pooled as samples of one channel (their pooled
    variance is v/4, which is what ``running_var`` tracks), so the heavy lifting is one fused
    kernel forward and one backward, and eval mode is a single fused kernel.

``whiten`` (full 4×4 whitening, Trabelsi-style for quaternions)
    mean μ, covariance Σ = E[(q − μ)(q − μ)ᵀ] + eps·I (eps makes the rank-3 covariance of an
    [R, G, B, gray] input invertible), its Cholesky factor Σ = L Lᵀ, and z = L⁻¹(q − μ), whose
    covariance is the identity (up to eps). A learnable 4×4 scale Γ (identity at init) and a shift β:
    y = Γ z + β. The 4×4 algebra runs batched on the device (``cholesky_ex`` without its error
    check, a triangular solve): no host syncs. The per-channel 4×4 map is applied as one 1×1
    conv with a block weight (dense over channels but zero off the diagonal blocks: 1/9 of a
    3×3 conv's FLOPs, one well-tuned kernel instead of a permute–bmm–permute).

Both keep running statistics (momentum, like ``nn.BatchNorm2d``; unbiased variance/covariance)
that eval mode uses instead of the batch's.

The same two modes serve every hypercomplex algebra (``components`` = n: 2 for complex numbers,
n for PHM): n means, one variance of the n-vector and a shared scale (``norm``), or n×n whitening
with an n×n scale (``whiten``), per number channel. With n = 4 and PHM's quaternion rules this is
exactly the quaternion network's batch norm, so PHM-4 starts as the quaternion network.

What a rotation of the inputs does (β = 0). Left and right multiplication of q by unit
quaternions u, v are orthogonal maps of R⁴, and so is the 3-d rotation q ↦ u q ū.

- ``norm`` is *equivariant* to all of them: the modulus variance is invariant under orthogonal
  maps and γ is real, so QBN(u q v) = u QBN(q) v, for left and right multiplication alike.
- ``whiten`` is *invariant* to every lower-triangular mixing of the components with a positive
  diagonal (q ↦ T q: rescaling a component, leaking the real part into i, j, k, ...), since the
  Cholesky factor of TΣTᵀ is T L. It is not equivariant to rotations in general (neither left nor
  right multiplication): Cholesky orders the components (r first), so a rotated input comes out
  whitened but in another orthonormal basis. The exceptions are the sign flips, e.g. the
  rotations by π about i, j or k (q ↦ i q ī flips the j and k parts): QBN(i q ī) = i QBN(q) ī.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QBN_MODES = ("norm", "whiten")


class _Centre(torch.autograd.Function):
    """(x − its mean per channel over batch and image, the mean). Centring is a symmetric
    projection, so its backward centres the gradient: two full-size ops instead of autograd's four
    (neg, sum, an expanded division, add). Written in the ``setup_context`` style so that
    ``vmap`` (``trials=K``) can batch it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        return x - mean, mean

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_mean: Tensor) -> Tensor:
        return grad - grad.mean(dim=(0, 2, 3), keepdim=True)


class QBatchNorm2d(nn.Module):
    """Quaternion batch norm over ``num_features`` real channels (C = num_features / 4 quaternions);
    ``components=n`` normalises numbers of n components instead (C = num_features / n)."""

    def __init__(self, num_features: int, mode: str = "norm", eps: float = 1e-5, momentum: float = 0.1,
                 components: int = 4):
        super().__init__()
        k = self.components = components
        if k < 2 or num_features % k:
            raise ValueError(f"QBatchNorm2d needs a real width divisible by {k} (components >= 2), got {num_features}")
        if mode not in QBN_MODES:
            raise ValueError(f"QBatchNorm2d mode must be one of {', '.join(QBN_MODES)}, got {mode!r}")
        if not 0 < momentum <= 1:
            raise ValueError(f"QBatchNorm2d momentum must be in (0, 1], got {momentum}")
        self.num_features, self.quaternions = num_features, num_features // k   # number channels
        self.mode, self.eps, self.momentum = mode, eps, momentum
        c = self.quaternions
        self.bias = nn.Parameter(torch.zeros(num_features))              # β, component-major like the channels
        self.register_buffer("running_mean", torch.zeros(num_features))
        if mode == "norm":
            self.weight = nn.Parameter(torch.ones(c))                     # γ, one per quaternion channel
            self.register_buffer("running_var", torch.ones(c))           # E|q - μ|²/k, the mean component variance
            # the pooled view's mean, which torch's batch norm tracks too: 0 by construction, not kept
            self.register_buffer("_pooled_mean", torch.zeros(c), persistent=False)
        else:
            self.weight = nn.Parameter(torch.eye(k).repeat(c, 1, 1))      # Γ, a kxk matrix per channel
            self.register_buffer("running_cov", torch.eye(k).repeat(c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"QBatchNorm2d({self.num_features}) expects (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        return self._norm(x) if self.mode == "norm" else self._whiten(x)

    def _norm(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        c, k = self.quaternions, self.components
        # With the k (4) components of a channel pooled as kN samples of one channel, their pooled
        # variance is v/k, so scale γ/sqrt(k) and eps/k give γ(q - μ)/sqrt(v + eps).
        half_weight = self.weight * (1.0 / math.sqrt(k))
        if not self.training:  # one fused kernel per real channel: (x - μ)·(γ/2)/sqrt(v/4 + eps/4) + β
            return F.batch_norm(x, self.running_mean, self.running_var.repeat(k), half_weight.repeat(k),
                                self.bias, False, 0.0, self.eps / k)
        centred, mean = _Centre.apply(x)
        with torch.no_grad():
            # running = (1 - m)·running + m·mean, as torch's batch norm; not lerp_, which vmap (trials=K) runs one by one
            self.running_mean.mul_(1.0 - self.momentum).add_(mean.flatten(), alpha=self.momentum)
        pooled = centred.reshape(n * k, c, h, w)
        # torch's batch norm on the pooled view; it updates running_var (unbiased) in the same kernel
        y = F.batch_norm(pooled, self._pooled_mean, self.running_var, half_weight, None, True, self.momentum, self.eps / k)
        return y.reshape(n, k * c, h, w) + self.bias[:, None, None]

    def _whiten(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        c, k = self.quaternions, self.components
        if self.training:
            m = n * h * w
            mean = x.mean(dim=(0, 2, 3)).view(k, c)
            centred = (x - mean.view(-1, 1, 1)).reshape(n, k, c, h, w).permute(2, 1, 0, 3, 4).reshape(c, k, m)
            cov = centred @ centred.transpose(1, 2) / m                               # (C, k, k)
            with torch.no_grad():
                self.running_mean.mul_(1.0 - self.momentum).add_(mean.flatten(), alpha=self.momentum)
                self.running_cov.mul_(1.0 - self.momentum).add_(cov * (m / max(m - 1, 1)), alpha=self.momentum)
        else:
            mean, cov = self.running_mean.view(k, c), self.running_cov
        eye = torch.eye(k, device=x.device, dtype=x.dtype)
        lower = torch.linalg.cholesky_ex(cov + self.eps * eye).L                    # no error check: no sync
        whitening = torch.linalg.solve_triangular(lower, eye.expand(c, k, k), upper=False)  # L⁻¹
        a = self.weight @ whitening                                                   # Γ L⁻¹, (C, k, k)
        shift = self.bias.view(k, c) - torch.einsum("cab,bc->ac", a, mean)          # β - Γ L⁻¹ μ
        # block[(a, c), (b, d)] = A[c, a, b] if c == d: the per-channel maps as one 1x1 conv
        block = a.permute(1, 0, 2).unsqueeze(-1) * torch.eye(c, device=x.device, dtype=x.dtype)[:, None, :]
        return F.conv2d(x, block.reshape(k * c, k * c, 1, 1), shift.flatten())

    def extra_repr(self) -> str:
        return (f"{self.num_features}, mode={self.mode}, eps={self.eps}, momentum={self.momentum}"
                + (f", components={self.components}" if self.components != 4 else ""))
