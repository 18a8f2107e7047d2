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

from .data import DeviceData, load_data
from .errors import ConfigError
from .models import build_model, count_parameters, dense_real_parameters
from .pruning import Masks, prunable_weights, prune
from .reporting import ProgressObserver, plot_accuracy_vs_sparsity, write_levels_csv, write_levels_json
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


class _RewindSnapshot(ProgressObserver):
    """Progress reporting plus a copy of the weights after ``rewind_step`` steps (level 0 only)."""

    def __init__(self, model: nn.Module, rewind_step: int, **progress):
        super().__init__(**progress)
        self.model, self.rewind_step, self.state = model, rewind_step, None

    def on_step(self, step: int) -> None:
        super().on_step(step)
        if step == self.rewind_step:
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


class LevelRunner:
    def __init__(self, settings: Settings, run_dir: Path, config: dict):
        self.s, self.config = settings, config
        self.store = RunDirectory(run_dir)
        self.run_dir = Path(run_dir)

    def run(self) -> list[dict]:
        s = self.s
        device = resolve_device(s.device)
        data = load_data(s.dataset, s.data, s.algebra.adds_gray, device)
        log.info("data: %s (%d train, %s val, %d test) on %s", data.source, len(data.train),
                 len(data.val) if data.val is not None else 0, len(data.test), device)
        torch.manual_seed(s.seed)
        model = build_model(s.model, s.algebra, data.num_classes, data.image_shape, **s.model_options).to(device)
        weights = prunable_weights(model, s.prune.prune_output)
        dense_real = dense_real_parameters(s.model, data.num_classes, data.image_shape, **s.model_options)
        counts = {"params_total": count_parameters(model), "params_dense_real": dense_real,
                  "prunable_total": sum(model.get_parameter(w.name).numel() for w in weights)}
        log.info("model %s/%s: %d parameters (%.1f%% of the dense real model), %d prunable",
                 s.model, s.algebra.name, counts["params_total"], 100 * counts["params_total"] / dense_real,
                 counts["prunable_total"])

        self.store.claim(run_identity(self.config), s.resume)
        records = self.store.finished_levels()
        init = self.store.load_checkpoint("init")
        if init is None:
            init = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.store.save_checkpoint("init", init)
        rewind_step = parse_step_count(s.prune.rewind, s.train.steps_per_epoch(len(data.train)))
        rewind = init if rewind_step == 0 else self.store.load_checkpoint("rewind")

        if records:
            log.info("resuming %s after level %d", self.run_dir, len(records) - 1)
        if len(records) > s.prune.levels:
            log.info("all %d levels are finished already", s.prune.levels + 1)
        for level in range(len(records), s.prune.levels + 1):
            if level == 0:
                masks = Masks.ones(model, weights)
                model.load_state_dict(init)
            else:
                previous_masks, previous_weights = self.store.load_level(level - 1)
                model.load_state_dict(previous_weights)
                masks = prune(model, Masks(previous_masks).to(device), weights, s.prune)
                model.load_state_dict(rewind)
                masks.apply_(model)
            observer = _RewindSnapshot(model, rewind_step if level == 0 else -1, level=level,
                                       levels=s.prune.levels, epochs=s.train.epochs, mode=s.progress)
            training = train_level(model, data, masks, s.train, level_generator(s.seed, level, device), observer)
            if level == 0 and rewind_step > 0:
                if observer.state is None:
                    raise ConfigError(f"prune.rewind={s.prune.rewind} is past the end of level 0 ({training.steps} steps)")
                rewind = observer.state
                self.store.save_checkpoint("rewind", rewind)
            record = {"row": level_row(level, masks, model, dense_real, training),
                      "epochs": [asdict(e) for e in training.epochs]}
            self.store.save_level(level, masks.state_dict(), model.state_dict(), record)
            if s.save_weights == "last" and level > 0:
                self.store.drop_weights(level - 1)
            records.append(record)
            row = record["row"]
            log.info("level %d: %.2f%% of prunable weights left, %.2f%% of the real model's parameters, test accuracy %.2f%%",
                     level, 100 * row["prunable_remaining"], row["pct_of_real"], row["test_acc"])
            self._write_results(records, data, counts)
        if records:
            self._write_results(records, data, counts)
        return [r["row"] for r in records]

    def _write_results(self, records: list[dict], data: DeviceData, counts: dict) -> None:
        rows = [r["row"] for r in records]
        write_levels_csv(rows, self.run_dir / "levels.csv")
        write_levels_json(rows, self.config, {"data_source": data.source, **counts,
                                              "epochs": {r["row"]["level"]: r["epochs"] for r in records}},
                          self.run_dir / "levels.json")
        title = f"{self.s.model} / {self.s.algebra.name} / {self.s.dataset.name} (seed {self.s.seed})"
        plot_accuracy_vs_sparsity(rows, self.run_dir / "accuracy_vs_sparsity.png", title)


def level_row(level: int, masks: Masks, model: nn.Module, dense_real: int, training: LevelTraining) -> dict:
    """One line of levels.csv. Unpruned biases and norm parameters count as nonzero parameters."""
    params_total = count_parameters(model)
    params_nonzero = params_total - (masks.total() - masks.kept())
    return {
        "level": level,
        "prunable_remaining": round(masks.remaining_fraction(), 6),
        "params_nonzero": params_nonzero,
        "params_total": params_total,
        "pct_of_real": round(100.0 * params_nonzero / dense_real, 4),
        "test_acc": round(training.test_acc, 2),
        "best_val_acc": None if training.best_val_acc is None else round(training.best_val_acc, 2),
        "train_loss": round(training.epochs[-1].train_loss, 5),
        "epochs": len(training.epochs),
        "steps": training.steps,
        "train_seconds": round(training.seconds, 2),
    }

