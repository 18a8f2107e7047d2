"""Training one level: the optimizer, the (eager, reference) training loop and evaluation.

Pruned weights stay exactly zero without touching the weights after each step: their
gradients are masked before the optimizer step, and the optimizer state is fresh at every
level, so Adam's and SGD's moments at pruned positions stay zero and the update there is
exactly zero. Metrics accumulate on the device and are read once per epoch — which is also when
a diverged level is noticed: a loss sum that is not finite stops the level after that epoch (no
per-step check, which would cost a host sync every step).

This loop is the reference (and the CPU path); :mod:`qprune.engine` runs the same step as
one CUDA graph, and several runs at once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DeviceData, Split
from .errors import ConfigError
from .pruning import Masks

OPTIMIZERS = ("adam", "sgd")
ENGINES = ("auto", "eager", "graph")    # auto: graph on CUDA, eager on the CPU
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    optimizer: str = "adam"
    lr: float = 1.2e-3
    batch_size: int = 60
    epochs: int = 40
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_steps: int | None = None   # stop a level after this many steps (smoke tests, quick looks)
    drop_last: bool = False        # drop the last partial batch of each epoch
    eval_batch_size: int = 1000
    engine: str = "auto"           # auto | eager (the reference loop) | graph (the step as one CUDA graph)
    precision: str = "fp32"        # fp32 (TF32 off) | tf32 | bf16 (autocast)

    def __post_init__(self):
        for key, value, allowed in (
            ("optimizer", self.optimizer, OPTIMIZERS), ("engine", self.engine, ENGINES),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in allowed:
                raise ConfigError(f"train.{key} must be one of {', '.join(allowed)}, got {value!r}")
        for key in ("batch_size", "epochs", "eval_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"train.{key} must be a positive integer, got {value}")
        for key in ("lr", "weight_decay", "momentum"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), (int, float)):
                raise ConfigError(f"train.{key} must be a number, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ConfigError(f"train.max_steps must be a positive integer or null, got {self.max_steps}")

    def steps_per_epoch(self, n_train: int) -> int:
        full, partial = divmod(n_train, self.batch_size)
        return full + (1 if partial and not self.drop_last else 0)


@dataclass
class EpochStats:
    epoch: int           # 1-based
    step: int            # optimizer steps so far in this level
    train_loss: float
    test_acc: float      # percent
    val_acc: float | None
    seconds: float       # training time so far in this level (evaluation excluded)


@dataclass
class LevelTraining:
    epochs: list[EpochStats] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    engine: str = "eager"  # what trained it: eager | graph | eager (fallback: why the graph was not used)
    diverged: bool = False   # the loss was not finite: training stopped after that epoch

    @property
    def test_acc(self) -> float:
        return self.epochs[-1].test_acc

    @property
    def best_val_acc(self) -> float | None:
        vals = [e.val_acc for e in self.epochs if e.val_acc is not None]
        return max(vals) if vals else None


class Observer:
    """Hooks the level runner passes in (progress bars, rewind snapshots); all optional."""

    def on_epoch_start(self, epoch: int, steps: int) -> None: ...
    def on_step(self, step: int) -> None: ...
    def on_epoch_end(self, stats: EpochStats) -> None: ...


def make_optimizer(
    model: nn.Module | Iterable[Tensor], settings: TrainSettings, *, fused: bool | None = None, capturable: bool = False,
) -> torch.optim.Optimizer:
    """The level's optimizer. ``fused``/``capturable`` are for the CUDA-graph engine (state on the device)."""
    params = list(model.parameters() if isinstance(model, nn.Module) else model)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused,
                                capturable=capturable)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
                           fused=fused)


def set_precision(precision: str) -> None:
    """TF32 for matmuls and cuDNN convolutions on (``tf32``, ``bf16``) or off (``fp32``), for the process.

    ``fp32`` turns cuDNN's TF32 off too (PyTorch's default leaves it on), so fp32 numbers are
    really fp32. The legacy switches are used because they work on every torch >= 2.4.
    """
    allow = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass and the loss (``bf16``); nothing otherwise. Weights stay fp32.

    Without autocast's weight-cast cache, which must be off inside a captured CUDA graph (each weight is
    used once per forward here, so the cache saves nothing anyway).
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


# On the CPU a convolution's activations for 1,000 images overflow the caches: evaluating in chunks
# of 100 is ~1.4x faster for Conv-4 (measured with one thread) and gives the same counts.
CPU_EVAL_BATCH = 100


def eval_batch_size(batch_size: int, device: torch.device) -> int:
    """The evaluation chunk: ``train.eval_batch_size`` on a GPU, at most :data:`CPU_EVAL_BATCH` on the CPU."""
    return batch_size if device.type == "cuda" else min(batch_size, CPU_EVAL_BATCH)


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, split: Split, batch_size: int = 1000, precision: str = "fp32") -> float:
    """Accuracy in percent; one host sync at the end."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    for x, y in data.batches(split, eval_batch_size(batch_size, data.device)):
        with autocast(precision, data.device):
            logits = model(x)
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return 100.0 * correct.item() / len(split)


def train_level(
    model: nn.Module, data: DeviceData, masks: Masks, settings: TrainSettings,
    generator: torch.Generator, observer: Observer | None = None, optimizer: torch.optim.Optimizer | None = None,
) -> LevelTraining:
    """Train ``model`` from its current weights, keeping ``masks`` applied.

    A fresh optimizer unless one is passed in (a protocol that keeps the optimizer state
    across pruning rounds passes the same one again).
    """
    observer = observer or Observer()
    optimizer = optimizer or make_optimizer(model, settings)
    set_precision(settings.precision)
    masked_params, float_masks = masks.parameters_of(model)
    steps_per_epoch = settings.steps_per_epoch(len(data.train))
    result, step, seconds = LevelTraining(), 0, 0.0
    model.train()
    for epoch in range(1, settings.epochs + 1):
        observer.on_epoch_start(epoch, steps_per_epoch)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=data.device)
        seen = 0
        for x, y in data.batches(data.train, settings.batch_size, generator, settings.drop_last):
            with autocast(settings.precision, data.device):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            _mask_gradients(masked_params, float_masks)
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            seen += y.shape[0]
            step += 1
            observer.on_step(step)
            if settings.max_steps is not None and step >= settings.max_steps:
                break
        seconds += _elapsed(start, data.device)
        stats = EpochStats(
            epoch, step, (loss_sum / max(seen, 1)).item(),
            evaluate(model, data, data.test, settings.eval_batch_size, settings.precision),
            evaluate(model, data, data.val, settings.eval_batch_size, settings.precision) if data.val is not None else None,
            seconds,
        )
        result.epochs.append(stats)
        observer.on_epoch_end(stats)
        if not math.isfinite(stats.train_loss):
            result.diverged = True
            break
        if settings.max_steps is not None and step >= settings.max_steps:
            break
    result.steps, result.seconds = step, seconds
    return result


class EagerTrainer:
    """One run through the reference loop, with the interface of :class:`qprune.engine.Engine`.

    ``train_level`` takes and returns lists (one entry per run: here one), starts from a fresh
    optimizer unless ``optimizer_states`` carries one on, and can train another epoch count.
    """

    def __init__(self, model: nn.Module, data: DeviceData, settings: TrainSettings):
        self.model, self.data, self.settings = model, data, settings
        self.optimizer: torch.optim.Optimizer | None = None

    def train_level(
        self, masks: list[Masks], generators: list[torch.Generator], observers: list[Observer] | None = None,
        optimizer_states: list[dict] | None = None, epochs: int | None = None,
    ) -> list[LevelTraining]:
        settings = self.settings if epochs is None else replace(self.settings, epochs=epochs)
        params = dict(self.model.named_parameters())
        self.optimizer = make_optimizer(params.values(), settings)
        if optimizer_states is not None:
            load_optimizer_state(self.optimizer, params, optimizer_states[0], masks[0])
        observer = observers[0] if observers else None
        return [train_level(self.model, self.data, masks[0], settings, generators[0], observer, self.optimizer)]

    def optimizer_states(self) -> list[dict]:
        return [optimizer_state(self.optimizer, dict(self.model.named_parameters()))]


def optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The optimizer's per-parameter state by parameter name (copies): to save it or to carry it on."""
    return {
        name: {key: value.detach().clone() for key, value in optimizer.state[p].items() if torch.is_tensor(value)}
        for name, p in params.items() if p in optimizer.state
    }


@torch.no_grad()
def load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]],
    masks: dict[str, Tensor] | None = None,
) -> None:
    """Carry on from ``state`` (in place where the optimizer already has state, as a captured step needs).

    The moments of the weights that ``masks`` prune are zeroed: with their gradients masked they
    then stay zero, and so do the pruned weights (as with torch's pruning, whose masked weights
    never reach the loss).
    """
    for name, param in params.items():
        current = optimizer.state[param]
        for key, value in state.get(name, {}).items():
            if value.shape == param.shape:  # moments (a scalar step stays where it was saved)
                value = value.to(param.device)
                if masks is not None and name in masks:
                    value = value * masks[name].to(value.dtype)
            if torch.is_tensor(current.get(key)):
                current[key].copy_(value)
            else:
                current[key] = value.clone()


def _mask_gradients(params: list[Tensor], masks: list[Tensor]) -> None:
    grads = [p.grad for p in params]
    if grads:
        torch._foreach_mul_(grads, masks)


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start

