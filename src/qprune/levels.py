"""What the level runner and the protocols share: the runs, their data order, and a level's context.

It sits below both :mod:`qprune.runner` (which drives the levels) and :mod:`qprune.protocols`
(which decide each level's masks, starting weights and optimizer state), so that a protocol is
handed the few things it needs — :class:`LevelContext` — and never the runner itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .pruning import PrunableWeight
from .reporting import LocalFiles, RunLogger
from .store import RunDirectory

if TYPE_CHECKING:
    from .settings import Settings
    from .training import LevelTraining, Observer
    from .pruning import Masks
    from .reporting import RunClock


def level_generator(seed: int, level: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """The data-order and augmentation RNG of one level: a function of (seed, level) only.

    ``stream`` > 0 gives other, independent numbers of the same level (a baseline's random masks).
    """
    return torch.Generator(device=device).manual_seed(seed * 100_003 + level + stream * 1_000_000_007)


class Trial:
    """One run of a level runner: its seed, directory, model, checkpoints and finished levels.

    With ``trials=K`` run k is exactly the single run with seed ``seed + k`` (same initialisation,
    data order and results), written to ``<run dir>/trial_<k>/``, a complete run directory.
    """

    def __init__(self, index: int, settings: "Settings", run_dir: Path, config: dict, loggers: list[RunLogger]):
        self.index, self.s, self.config = index, settings, config
        self.run_dir, self.store = Path(run_dir), RunDirectory(run_dir)
        self.loggers = [LocalFiles(), *loggers]
        self.records: list[dict] = []
        self.sessions: list[dict] = []    # provenance per session (run.json); the last one is this process's
        self.model: nn.Module | None = None
        self.init: dict | None = None
        self.rewind: dict | None = None
        self.reinit: dict | None = None   # the random-reinit baseline's initialisation


class Trainer(Protocol):
    """The eager loop or the engine: trains every run's level, optionally from carried optimizer states."""

    def train_level(
        self, masks: list["Masks"], generators: list[torch.Generator], observers: list["Observer"] | None = None,
        optimizer_states: list[dict] | None = None, epochs: int | None = None,
    ) -> list["LevelTraining"]: ...

    def optimizer_states(self) -> list[dict]: ...


@dataclass
class LevelContext:
    """What a protocol may use: the settings, the runs, the prunable weights, the trainer, the device,
    and the run's clock (its ETA counts every training's epochs)."""

    settings: "Settings"
    trials: list[Trial]
    weights: list[PrunableWeight]
    trainer: Trainer
    device: torch.device
    clock: "RunClock | None" = None

    def clock_of(self, t: Trial) -> "RunClock | None":
        """The clock for run ``t``'s progress: the first run's observers count the epochs of all of them."""
        return self.clock if t.index == 0 else None

    def generator(self, seed: int, level: int, stream: int = 0) -> torch.Generator:
        return level_generator(seed, level, self.device, stream)

    def generators(self, level: int, stream: int = 0) -> list[torch.Generator]:
        """Each run's data order and augmentation for ``level`` (``stream`` > 0: other numbers)."""
        return [self.generator(t.s.seed, level, stream) for t in self.trials]


def copy_state(state: dict[str, Any]) -> dict[str, Any]:
    """Detached copies of a state dict's tensors (a snapshot that later training does not change)."""
    return {k: v.detach().clone() for k, v in state.items()}
