"""Magnitude pruning: which weights are prunable, masks, and one pruning round.

Prunable are the weights of conv and linear layers (real, quaternion, complex or PHM); biases,
norm layers and PHM's learned rules Aᵢ never are, nor a layer a model marks with ``prunable = False``
(ResNet shortcuts with ``model.prune_shortcuts=false``, whatever the algebra). Each prunable weight
has a layer type — ``conv``, ``fc`` or ``output`` (the real classifier head) — so that rates can
differ per type as in the lottery-ticket paper. A round removes ``rate`` of the *remaining* weights,
ranked globally (all weights that share a rate in one pool) or per layer. Hypercomplex weights are
ranked per component (r, i, j, k each on its own, as the original study did for quaternions) or
per whole number (``prune.unit=quaternion``: |q| of a quaternion, of a complex number or of a PHM
weight's n components Sᵢ[m, k] together).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .hypercomplex import HypercomplexConv2d, HypercomplexLinear
from .quaternion import QConv2d, QLinear

LAYER_TYPES = ("conv", "fc", "output")
SCOPES = ("global", "layerwise")
UNITS = ("component", "quaternion")   # quaternion: whole numbers of any hypercomplex algebra
CONV_LAYERS = (nn.Conv2d, QConv2d, HypercomplexConv2d)
LINEAR_LAYERS = (nn.Linear, QLinear, HypercomplexLinear)
HYPERCOMPLEX_LAYERS = (QConv2d, QLinear, HypercomplexConv2d, HypercomplexLinear)   # weight (n, out, in, *k)


@dataclass(frozen=True)
class PruneSettings:
    rate: float = 0.2                     # fraction of the remaining weights removed per level
    levels: int = 20                      # pruning rounds after the dense level 0
    scope: str = "global"                 # global | layerwise
    layer_rates: Mapping[str, float | None] = field(default_factory=dict)  # per layer type overrides
    prune_output: bool = True             # whether the output layer is prunable
    unit: str = "component"               # component | quaternion (whole hypercomplex numbers)
    rewind: str = "init"                  # init, or a point of level 0's training: "500it", "2ep"

    def __post_init__(self):
        for key, value in {"prune.rate": self.rate, **{f"prune.rates.{k}": v for k, v in self.layer_rates.items()}}.items():
            if value is not None and not 0 < value < 1:
                raise ConfigError(f"{key} must be in (0, 1) (the fraction of remaining weights removed per level), got {value}")
        if unknown := set(self.layer_rates) - set(LAYER_TYPES):
            raise ConfigError(f"prune.rates has unknown layer types {sorted(unknown)}; use {', '.join(LAYER_TYPES)}")
        if not isinstance(self.levels, int) or self.levels < 0:
            raise ConfigError(f"prune.levels must be an integer >= 0 (pruning rounds after the dense level), got {self.levels}")
        if self.scope not in SCOPES:
            raise ConfigError(f"prune.scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.unit not in UNITS:
            raise ConfigError(f"prune.unit must be one of {', '.join(UNITS)}, got {self.unit!r}")

    def rate_of(self, layer_type: str) -> float:
        override = self.layer_rates.get(layer_type)
        return self.rate if override is None else override


@dataclass(frozen=True)
class PrunableWeight:
    name: str            # its key in the model's state_dict
    layer_type: str      # conv | fc | output
    hypercomplex: bool   # stored as (n, out, in, *k) components (quaternion, complex, PHM)


def prunable_weights(model: nn.Module, include_output: bool = True) -> list[PrunableWeight]:
    """The prunable weights of a model, in module order; the model's ``output`` layer is typed ``output``.

    A module whose attribute ``prunable`` is False is left out (its weight stays dense).
    """
    output = getattr(model, "output", None)
    found = []
    for name, module in model.named_modules():
        if not getattr(module, "prunable", True):
            continue
        if module is output:
            if include_output:
                found.append(PrunableWeight(f"{name}.weight", "output", False))
        elif isinstance(module, CONV_LAYERS):
            found.append(PrunableWeight(f"{name}.weight", "conv", isinstance(module, HYPERCOMPLEX_LAYERS)))
        elif isinstance(module, LINEAR_LAYERS):
            found.append(PrunableWeight(f"{name}.weight", "fc", isinstance(module, HYPERCOMPLEX_LAYERS)))
    return found


class Masks(dict):
    """Weight name -> bool tensor of the weight's shape (True = kept). A plain dict, validated."""

    def __init__(self, masks: Mapping[str, Tensor]):
        super().__init__()
        for name, mask in masks.items():
            if mask.dtype != torch.bool:
                raise ValueError(f"mask {name} must be bool, got {mask.dtype}")
            self[name] = mask

    @classmethod
    def ones(cls, model: nn.Module, weights: Iterable[PrunableWeight]) -> "Masks":
        params = dict(model.named_parameters())
        return cls({w.name: torch.ones_like(params[w.name], dtype=torch.bool) for w in weights})

    def kept(self) -> int:
        return int(sum(m.sum().item() for m in self.values()))

    def total(self) -> int:
        return sum(m.numel() for m in self.values())

    def remaining_fraction(self) -> float:
        return self.kept() / max(self.total(), 1)

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Zero the pruned weights in place (a fill, not a product: NaN times zero would stay NaN)."""
        params = dict(model.named_parameters())
        for name, mask in self.items():
            params[name].masked_fill_(~mask, 0)

    def parameters_of(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """Matching lists (parameters, float masks) for fused masking in the training step."""
        params = dict(model.named_parameters())
        names = list(self)
        return [params[n] for n in names], [self[n].to(params[n].dtype) for n in names]

    def to(self, device: torch.device | str) -> "Masks":
        return Masks({k: v.to(device) for k, v in self.items()})

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.cpu() for k, v in self.items()}


def _unit_scores(weight: Tensor, mask: Tensor, whole_numbers: bool) -> tuple[Tensor, Tensor, int]:
    """(scores, alive) per pruning unit, and the unit's size in parameters.

    A whole number of n components scores |q|/sqrt(n) (a quaternion |q|/2), the root mean square
    of its components, so that it ranks on the same scale as single real weights when both share
    a global pool.
    """
    if whole_numbers:
        n = weight.shape[0]
        return weight.norm(dim=0).flatten() / n**0.5, mask.all(dim=0).flatten(), n
    return weight.abs().flatten(), mask.flatten(), 1


@torch.no_grad()
def prune(model: nn.Module, masks: Masks, weights: list[PrunableWeight], settings: PruneSettings) -> Masks:
    """One round of magnitude pruning: the new masks remove ``rate`` of each pool's remaining weights."""
    params = dict(model.named_parameters())
    pools: dict[object, list[PrunableWeight]] = {}
    for w in weights:
        key = settings.rate_of(w.layer_type) if settings.scope == "global" else w.name
        pools.setdefault(key, []).append(w)
    new = Masks(dict(masks))
    for pool in pools.values():
        rate = settings.rate_of(pool[0].layer_type)
        new.update(_prune_pool(params, masks, pool, rate, settings.unit == "quaternion"))
    return new


def _prune_pool(params, masks: Masks, pool: list[PrunableWeight], rate: float, whole_numbers: bool) -> dict[str, Tensor]:
    scores, alive, sizes, spans = [], [], [], []
    for w in pool:
        s, a, size = _unit_scores(params[w.name].float(), masks[w.name], whole_numbers and w.hypercomplex)
        scores.append(s)
        alive.append(a)
        sizes.append(torch.full_like(s, size))
        spans.append(s.numel())
    scores, alive, sizes = torch.cat(scores), torch.cat(alive), torch.cat(sizes)
    # A diverged weight (NaN, inf) is no evidence of importance: it ranks below every finite one.
    scores = torch.where(scores.isfinite(), scores, torch.full_like(scores, -0.5))
    to_remove = round(rate * float((sizes * alive).sum()))
    # Dead units sort first and stay dead; then prune alive units, smallest first, until
    # `to_remove` parameters are gone (exact when every unit is a single weight).
    order = torch.argsort(torch.where(alive, scores, torch.full_like(scores, -1.0)), stable=True)
    removed_so_far = torch.cumsum((sizes * alive)[order], 0)
    keep_sorted = alive[order] & (removed_so_far > to_remove)
    keep = torch.empty_like(alive)
    keep[order] = keep_sorted
    result = {}
    for w, unit_keep in zip(pool, keep.split(spans)):
        shape = params[w.name].shape
        if whole_numbers and w.hypercomplex:
            result[w.name] = unit_keep.view(shape[1:]).expand(shape).clone()
        else:
            result[w.name] = unit_keep.view(shape)
    return result


@torch.no_grad()
def random_masks_like(masks: Masks, generator: torch.Generator) -> Masks:
    """Random masks with the same number of kept weights in every layer (the random-pruning baseline)."""
    out = {}
    for name, mask in masks.items():
        scores = torch.rand(mask.shape, generator=generator, device=generator.device).to(mask.device)
        keep = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        keep[torch.topk(scores.flatten(), int(mask.sum())).indices] = True
        out[name] = keep.view(mask.shape)
    return Masks(out)
