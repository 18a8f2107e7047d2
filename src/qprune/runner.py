"""The level runner: iterative magnitude pruning with rewinding, lottery-ticket style.

Level 0 trains the dense model. Every later level prunes ``rate`` of the remaining weights of
the previous level's *trained* weights, rewinds the survivors to the rewind point (the
initialisation, or the weights after k steps of level 0), resets the optimizer and trains
again. Each level's data order comes from a generator seeded by (seed, level), and every
finished level is on disk, so a run stopped at any point resumes with exactly the results of
an uninterrupted run (on the CPU; GPU kernels may differ in the last bits).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .data import load_data
from .errors import ConfigError
from .models import build_model, count_parameters, dense_real_parameters, parameter_counts
from .pruning import Masks, prunable_weights, prune
from .reporting import LocalFiles, ProgressObserver, RunInfo, RunLogger
from .settings import Settings, run_identity
from .store import RunDirectory
from .training import LevelTraining, train_level

log = logging.getLogger("qprune")


def parse_step_count(value: str | int, steps_per_epoch: int, key: str = "prune.rewind") -> int:
    """'init' or 0 -> 0; '500it' -> 500; '2ep' -> 2 epochs of steps; a bare integer counts steps."""
    if value in ("init", 0, "0"):
        return 0
    if isinstance(value, int) and value > 0:
        return value
    match = re.fullmatch(r"(\d+)\s*(it|ep)", str(value).strip())
    if not match:
        raise ConfigError(f"{key} must be 'init', '<n>it' (steps) or '<n>ep' (epochs), got {value!r}")
    n = int(match.group(1))
    return n * steps_per_epoch if match.group(2) == "ep" else n


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    return torch.device(name)


def level_generator(seed: int, level: int, device: torch.device) -> torch.Generator:
    """The data-order and augmentation RNG of one level: a function of (seed, level) only."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + level)


class _LevelObserver(ProgressObserver):
    """Progress, per-epoch logging, and a copy of the weights after ``rewind_step`` steps (level 0)."""

    def __init__(self, model: nn.Module, rewind_step: int, loggers: list[RunLogger], level_info: dict, **progress):
        super().__init__(**progress)
        self.model, self.rewind_step, self.state = model, rewind_step, None
        self.loggers, self.level_info = loggers, level_info

    def on_step(self, step: int) -> None:
        super().on_step(step)
        if step == self.rewind_step:
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def on_epoch_end(self, stats) -> None:
        super().on_epoch_end(stats)
        for logger in self.loggers:
            logger.epoch(self.level, stats, self.level_info)


def run_name(s: Settings) -> str:
    return f"{s.model}-{s.algebra.name}-r{s.prune.rate:g}-s{s.seed}"


class LevelRunner:
    def __init__(self, settings: Settings, run_dir: Path, config: dict, loggers: list[RunLogger] | None = None):
        self.s, self.config = settings, config
        self.store = RunDirectory(run_dir)
        self.run_dir = Path(run_dir)
        self.loggers = [LocalFiles(), *(loggers or [])]

    def run(self) -> list[dict]:
        """Train every level not on disk yet; returns all levels' rows."""
        s = self._prepare()
        records = self.store.finished_levels()
        if records:
            log.info("resuming %s after level %d", self.run_dir, len(records) - 1)
        if len(records) > s.prune.levels:
            log.info("all %d levels are finished already", s.prune.levels + 1)
        title = f"{s.model} / {s.algebra.name} / {s.dataset.name} (seed {s.seed})"
        info = RunInfo(self.run_dir, run_name(s), title, self.config, self.counts, self.data.source, s.prune.levels + 1)
        for logger in self.loggers:
            logger.start(info, records)
        error = None
        try:
            for level in range(len(records), s.prune.levels + 1):
                records.append(self._train_level(level))
                for logger in self.loggers:
                    logger.level(records[-1], records)
        except BaseException as exc:
            error = exc
            raise
        finally:
            for logger in self.loggers:
                logger.finish(records, error)
        return [r["row"] for r in records]

    def _prepare(self) -> Settings:
        """Data, model, counts and the initial/rewind weights (from disk when resuming)."""
        s = self.s
        device = resolve_device(s.device)
        self.data = data = load_data(s.dataset, s.data, s.algebra.adds_gray, device)
        log.info("data: %s (%d train, %s val, %d test) on %s", data.source, len(data.train),
                 len(data.val) if data.val is not None else 0, len(data.test), device)
        torch.manual_seed(s.seed)
        self.model = build_model(s.model, s.algebra, data.num_classes, data.image_shape, **s.model_options).to(device)
        self.weights = prunable_weights(self.model, s.prune.prune_output)
        self.dense_real = dense_real_parameters(s.model, data.num_classes, data.image_shape, **s.model_options)
        self.counts = parameter_counts(self.model, [w.name for w in self.weights], self.dense_real)
        log.info("model %s/%s: %d parameters (%.1f%% of the dense real model), %d prunable", s.model, s.algebra.name,
                 self.counts["params_total"], 100 * self.counts["params_total"] / self.dense_real, self.counts["prunable_total"])
        self.store.claim(run_identity(self.config), s.resume)
        self.init = self.store.load_checkpoint("init")
        if self.init is None:
            self.init = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.store.save_checkpoint("init", self.init)
        self.rewind_step = parse_step_count(s.prune.rewind, s.train.steps_per_epoch(len(data.train)))
        self.rewind = self.init if self.rewind_step == 0 else self.store.load_checkpoint("rewind")
        return s

    def _train_level(self, level: int) -> dict:
        """Prune from the previous level, rewind, train; the level's record, saved to disk."""
        s, model, device = self.s, self.model, self.data.device
        if level == 0:
            masks = Masks.ones(model, self.weights)
            model.load_state_dict(self.init)
        else:
            previous_masks, previous_weights = self.store.load_level(level - 1)
            model.load_state_dict(previous_weights)
            masks = prune(model, Masks(previous_masks).to(device), self.weights, s.prune)
            model.load_state_dict(self.rewind)
            masks.apply_(model)
        level_info = sparsity(masks, model, self.dense_real)
        observer = _LevelObserver(model, self.rewind_step if level == 0 else -1, self.loggers, level_info,
                                  level=level, levels=s.prune.levels, epochs=s.train.epochs, mode=s.progress)
        training = train_level(model, self.data, masks, s.train, level_generator(s.seed, level, device), observer)
        if level == 0 and self.rewind_step > 0:
            if observer.state is None:
                raise ConfigError(f"prune.rewind={s.prune.rewind} is past the end of level 0 ({training.steps} steps)")
            self.rewind = observer.state
            self.store.save_checkpoint("rewind", self.rewind)
        record = {"row": {"level": level, **level_info, **training_columns(training)},
                  "epochs": [asdict(e) for e in training.epochs]}
        self.store.save_level(level, masks.state_dict(), model.state_dict(), record)
        if s.save_weights == "last" and level > 0:
            self.store.drop_weights(level - 1)
        row = record["row"]
        log.info("level %d: %.2f%% of prunable weights left, %.2f%% of the real model's parameters, test accuracy %.2f%%",
                 level, 100 * row["prunable_remaining"], row["pct_of_real"], row["test_acc"])
        return record


def sparsity(masks: Masks, model: nn.Module, dense_real: int) -> dict:
    """The sparsity columns of levels.csv. Unpruned biases and norm parameters count as nonzero."""
    params_total = count_parameters(model)
    params_nonzero = params_total - (masks.total() - masks.kept())
    return {
        "prunable_remaining": round(masks.remaining_fraction(), 6),
        "params_nonzero": params_nonzero,
        "params_total": params_total,
        "pct_of_real": round(100.0 * params_nonzero / dense_real, 4),
    }


def training_columns(training: LevelTraining) -> dict:
    """The accuracy and cost columns of levels.csv."""
    return {
        "test_acc": round(training.test_acc, 2),
        "best_val_acc": None if training.best_val_acc is None else round(training.best_val_acc, 2),
        "train_loss": round(training.epochs[-1].train_loss, 5),
        "epochs": len(training.epochs),
        "steps": training.steps,
        "train_seconds": round(training.seconds, 2),
    }
