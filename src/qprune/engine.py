"""The fast training path: the training step of one run, or of K runs at once, as one CUDA graph.

The eager loop (:func:`qprune.training.train_level`) is the reference; this engine runs the same
step — same data, same loss, same gradient masking, same optimizer — so that on the GPU nothing
but kernels is left between steps:

- each epoch is shuffled and augmented on the device in one go (:meth:`DeviceData.epoch`, the
  same random numbers as the eager loop) into a static ``uint8`` buffer; a step counter that
  lives on the device picks the step's batch, so a step needs no input from the host;
- every step has one of two fixed shapes: full batches, and the last partial batch of the epoch
  (unless ``train.drop_last``), each with its own graph, so no padding changes the loss or
  enters batch-norm statistics;
- forward, loss, backward, gradient masking (one foreach multiply) and a fused, capturable
  optimizer step are captured once (after a warm-up on a side stream) and replayed; loss sums
  accumulate on the device and are read once per epoch, with the evaluation (a run whose loss
  sum is not finite then stops: diverged, as in the eager loop; the others train on);
- the graphs are reused for every level: weights, masks and optimizer state are reset *in place*;
- before a run trusts them, the graphs' first steps are checked against the same steps run eagerly
  (:mod:`qprune.graphs`, which also lists what a captured step must not do).

``trials=K`` trains K runs of the same model (each with its own initialisation, data order,
masks and results) by one step: ``torch.func.vmap`` over their stacked parameters. The K models
stay ordinary modules whose parameters are views into the stacked tensors, so pruning,
rewinding and saving work on each run as if it were alone.

Without CUDA (or with ``graph=False``) the same step runs eagerly: that is how it is tested on
the CPU against the reference loop. ``train.engine=auto`` wraps the graph engine in
:class:`qprune.fallback.FailSafeTrainer`, which falls back to the eager loop if capture or check fail.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import graphs
from .data import DeviceData, Split
from .errors import ConfigError
from .pruning import Masks
from .training import (
    EpochStats, LevelTraining, Observer, TrainSettings, autocast, eval_batch_size, load_optimizer_state, make_optimizer,
    optimizer_state, set_precision,
)


def supports_graphs(device: torch.device) -> bool:
    """Whether the step can be captured on ``device`` (CUDA only; tests stand in for a GPU on the CPU)."""
    return device.type == "cuda"


def resolve_engine(engine: str, device: torch.device) -> str:
    """``train.engine`` -> ``eager`` or ``graph`` on ``device`` (auto: graph on CUDA, eager elsewhere)."""
    if engine == "auto":
        return "graph" if supports_graphs(device) else "eager"
    if engine == "graph" and not supports_graphs(device):
        raise ConfigError(f"train.engine=graph needs a CUDA device (device is {device.type}); use train.engine=auto or eager")
    return engine


class Engine:
    """Trains ``models`` (K >= 1 runs of one architecture) level after level with one step function.

    ``masked`` names the prunable weights: their masks are set per level by :meth:`train_level`.
    The models must already be on ``data.device``; the engine keeps training them in place.
    ``channels_last`` (one run only) stores real conv weights and inputs NHWC — for
    ``scripts/benchmark.py`` to measure; not a config key until it is shown to help.
    """

    def __init__(
        self, models: Sequence[nn.Module], data: DeviceData, settings: TrainSettings, masked: Sequence[str],
        graph: bool = False, channels_last: bool = False,
    ):
        device = data.device
        if graph and not supports_graphs(device):
            raise ConfigError("train.engine=graph needs a CUDA device; use train.engine=auto or eager")
        self.models, self.trials = list(models), len(models)
        self.data, self.settings, self.graph = data, settings, graph
        self.channels_last = channels_last and self.trials == 1
        if self.channels_last:  # 4-d (real conv) weights only; quaternion blocks are built contiguous each step
            for p in self.models[0].parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
        self.params, self.buffers = self._bind()
        self.masked_names = list(masked)
        self.masked = [self.params[name] for name in masked]
        self.masks = [torch.ones_like(p) for p in self.masked]  # float masks, set in place every level
        self.optimizer = make_optimizer(
            self.params.values(), settings, fused=True if device.type == "cuda" else None, capturable=graph
        )

        n, batch = len(data.train), settings.batch_size
        self.steps_per_epoch = steps = settings.steps_per_epoch(n)
        if steps == 0:
            raise ConfigError(f"train.batch_size={batch} is larger than the {n} training images with train.drop_last=true")
        self.used = min(n, steps * batch)                     # images trained per epoch
        self.tail = self.used - (steps - 1) * batch           # size of the last batch (== batch when it is full)
        k = self.trials
        self.x = torch.zeros(k, steps, batch, *data.image_shape, dtype=torch.uint8, device=device)
        self.y = torch.zeros(k, steps, batch, dtype=torch.long, device=device)
        self.cursor = torch.zeros((), dtype=torch.long, device=device)  # the step within the epoch
        self.loss_sum = torch.zeros(k, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._captured_with: list[dict] | None = None  # the optimizer's hyperparameters baked into the graphs

    # ------------------------------------------------------------------ the K runs' tensors
    def _bind(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The tensors the step trains: the model's own (K = 1), or stacked ones the K models view."""
        first = self.models[0]
        if self.trials == 1:
            return dict(first.named_parameters()), dict(first.named_buffers())
        self._base = copy.deepcopy(first)  # the architecture for functional_call (before rebinding)
        params = {name: _stack_and_view(self.models, name, parameter=True)
                  for name, _ in first.named_parameters()}
        buffers = {name: _stack_and_view(self.models, name, parameter=False)  # batch-norm statistics: per run
                   for name, _ in first.named_buffers()}
        call = lambda p, b, x: functional_call(self._base, (p, b), (x,))  # noqa: E731
        self._train_call = vmap(call, in_dims=(0, 0, 0))    # each run its own batch
        self._eval_call = vmap(call, in_dims=(0, 0, None))  # every run the same batch
        return {n: p.requires_grad_() for n, p in params.items()}, buffers

    def _logits(self, x: Tensor, shared: bool = False) -> Tensor:
        """(K, batch, classes) logits of ``x`` (K, batch, ...) — or (batch, ...) for every run when ``shared``."""
        if self.trials == 1:
            x = x if shared else x[0]
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.models[0](x).unsqueeze(0)
        call = self._eval_call if shared else self._train_call
        return call(self.params, self.buffers, x)

    def _set_training(self, mode: bool) -> None:
        for module in (*self.models, *([self._base] if self.trials > 1 else [])):
            module.train(mode)

    # ------------------------------------------------------------------ the step
    def _step(self, batch: int) -> None:
        """One optimizer step of every run on the cursor's batch (the first ``batch`` images of it)."""
        k, at = self.trials, self.cursor.view(1)
        x = self.x.index_select(1, at)[:, 0, :batch]          # (K, batch, C, H, W) uint8
        y = self.y.index_select(1, at)[:, 0, :batch]          # (K, batch)
        self.optimizer.zero_grad(set_to_none=True)            # the backward writes fresh (or captured) grads
        with autocast(self.settings.precision, self.data.device):
            inputs = self.data.model_input(x.reshape(k * batch, *x.shape[2:])).unflatten(0, (k, batch))
            logits = self._logits(inputs)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(k, batch).mean(1)
        losses.sum().backward()                               # runs do not interact: each gets its own gradient
        torch._foreach_mul_([p.grad for p in self.masked], self.masks)
        self.optimizer.step()
        with torch.no_grad():
            self.loss_sum.add_(losses.detach(), alpha=batch)
            self.cursor.add_(1)

    def _run(self, batch: int) -> None:
        if self.graph:
            self._graphs[batch].replay()
        else:
            self._step(batch)

    def batch_sizes(self) -> list[int]:
        """The step's shapes: full batches, and the last partial batch of the epoch if there is one."""
        return sorted({self.settings.batch_size, self.tail})

    def prepare_graphs(self) -> None:
        """Capture the step (once per engine) and check it against the eager step; raise if either fails.

        The capture records whatever the modules do now, so they are put in training mode first, and
        the data buffers hold a real epoch (from a fixed generator, not a run's) for the warm-up and
        the check; the level's own epoch replaces it.
        """
        if self._graphs:
            return
        self._set_training(True)
        device = self.data.device
        self._load_epoch([torch.Generator(device=device).manual_seed(graphs.CHECK_SEED + k) for k in range(self.trials)])
        captured = graphs.capture(self)
        graphs.check(self, captured)
        self._graphs, self._captured_with = captured, _hyperparameters(self.optimizer)

    # ------------------------------------------------------------------ levels and epochs
    @torch.no_grad()
    def _reset(self, masks: Sequence[Masks]) -> None:
        """A level starts from the weights the models hold now, these masks and a fresh optimizer (in place)."""
        for name, mask in zip(self.masked_names, self.masks):
            for k in range(self.trials):
                self._of_run(mask, k).copy_(masks[k][name])
        self.zero_optimizer_state()

    @torch.no_grad()
    def zero_optimizer_state(self) -> None:
        """Adam's step and moments, SGD's momentum to zero, in place: the same as a new optimizer."""
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()

    def _of_run(self, tensor: Tensor, k: int) -> Tensor:
        return tensor if self.trials == 1 else tensor[k]

    def _load_epoch(self, generators: Sequence[torch.Generator]) -> None:
        """Shuffle and augment each run's epoch into the static buffers; restart the step counter."""
        for k, generator in enumerate(generators):
            epoch = self.data.epoch(self.data.train, generator)
            self.x[k].view(-1, *self.x.shape[3:])[: self.used].copy_(epoch.x[: self.used])
            self.y[k].view(-1)[: self.used].copy_(epoch.y[: self.used])
        self.cursor.zero_()
        self.loss_sum.zero_()

    @torch.no_grad()
    def correct(self, split: Split) -> Tensor:
        """(K,) count of correctly classified images of ``split``, on the device (no host sync)."""
        correct = torch.zeros(self.trials, dtype=torch.long, device=self.data.device)
        self._set_training(False)
        for x, y in self.data.batches(split, eval_batch_size(self.settings.eval_batch_size, self.data.device)):
            with autocast(self.settings.precision, self.data.device):
                logits = self._logits(x, shared=True)
            correct += (logits.argmax(-1) == y).sum(-1)
        self._set_training(True)
        return correct

    def optimizer_states(self) -> list[dict]:
        """Each run's optimizer state by parameter name (copies; a scalar step is shared by the runs)."""
        states = optimizer_state(self.optimizer, self.params)
        return [{name: {key: v if v.dim() == 0 or self.trials == 1 else v[k] for key, v in state.items()}
                 for name, state in states.items()} for k in range(self.trials)]

    def _load_optimizer_states(self, states: Sequence[dict]) -> None:
        """Stack the runs' saved states into the optimizer, zeroing the moments of pruned weights."""
        stacked = states[0] if self.trials == 1 else {
            name: {key: v if v.dim() == 0 else torch.stack([s[name][key] for s in states]) for key, v in state.items()}
            for name, state in states[0].items()
        }
        load_optimizer_state(self.optimizer, self.params, stacked, dict(zip(self.masked_names, self.masks)))

    def train_level(
        self, masks: Sequence[Masks], generators: Sequence[torch.Generator], observers: Sequence[Observer] | None = None,
        optimizer_states: Sequence[dict] | None = None, epochs: int | None = None,
    ) -> list[LevelTraining]:
        """Train every run from the weights its model holds now; one :class:`LevelTraining` per run.

        ``generators[k]`` orders and augments run k's data (as in the eager loop), ``observers[k]``
        sees its steps and epochs. The optimizer starts fresh, or from ``optimizer_states`` (one per
        run, from :meth:`optimizer_states`); ``epochs`` overrides ``train.epochs``.
        """
        k_runs, s = self.trials, self.settings
        if not len(masks) == len(generators) == k_runs:
            raise ValueError(f"{k_runs} runs need {k_runs} masks and generators, got {len(masks)} and {len(generators)}")
        observers = list(observers) if observers is not None else [Observer() for _ in range(k_runs)]
        set_precision(s.precision)  # before the capture: the graphs keep the kernels chosen under it
        if self.graph:
            self.prepare_graphs()  # before the reset: the warm-up steps leave optimizer state behind
            if _hyperparameters(self.optimizer) != self._captured_with:
                raise RuntimeError("the optimizer's hyperparameters changed after the CUDA-graph capture; "
                                   "the graphs still use the old ones (build a new Engine)")
        self._reset(masks)
        if optimizer_states is not None:
            self._load_optimizer_states(optimizer_states)
        self._set_training(True)
        results = [LevelTraining(engine="graph" if self.graph else "eager") for _ in range(k_runs)]
        step, seconds, device = 0, 0.0, self.data.device
        for epoch in range(1, (epochs or s.epochs) + 1):
            for observer in observers:
                observer.on_epoch_start(epoch, self.steps_per_epoch)
            start = time.perf_counter()
            self._load_epoch(generators)
            steps = self.steps_per_epoch if s.max_steps is None else min(self.steps_per_epoch, s.max_steps - step)
            seen = 0
            for i in range(steps):
                batch = self.tail if i == self.steps_per_epoch - 1 else s.batch_size
                self._run(batch)
                seen += batch
                step += 1
                for observer in observers:
                    observer.on_step(step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
            numbers = [self.loss_sum / max(seen, 1), self.correct(self.data.test).float()]
            if self.data.val is not None:
                numbers.append(self.correct(self.data.val).float())
            numbers = torch.stack(numbers).tolist()  # the epoch's one host sync
            for k in range(k_runs):
                if results[k].diverged:
                    continue  # its weights are NaN; the other runs train on
                stats = EpochStats(
                    epoch, step, numbers[0][k], 100.0 * int(numbers[1][k]) / len(self.data.test),
                    100.0 * int(numbers[2][k]) / len(self.data.val) if self.data.val is not None else None, seconds,
                )
                results[k].epochs.append(stats)
                results[k].steps, results[k].seconds = step, seconds
                observers[k].on_epoch_end(stats)
                results[k].diverged = not math.isfinite(stats.train_loss)
            if all(r.diverged for r in results) or (s.max_steps is not None and step >= s.max_steps):
                break
        return results


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The parameter groups' settings (lr, betas, weight decay, ...): fixed in a captured step."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _stack_and_view(models: Sequence[nn.Module], name: str, parameter: bool) -> Tensor:
    """Stack tensor ``name`` of every model along a new dim 0; each model's tensor becomes a view of its slice."""
    get = (lambda m: m.get_parameter(name)) if parameter else (lambda m: m.get_buffer(name))
    stacked = torch.stack([get(m).detach() for m in models])
    owner_path, _, attr = name.rpartition(".")
    for k, model in enumerate(models):
        owner = model.get_submodule(owner_path)
        view = stacked.detach()[k]
        setattr(owner, attr, nn.Parameter(view) if parameter else view)
    return stacked
