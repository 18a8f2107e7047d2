"""The level runner: iterative magnitude pruning with rewinding, lottery-ticket style.

Level 0 trains the dense model. Every later level prunes ``rate`` of the remaining weights of
the previous level's *trained* weights, rewinds the survivors to the rewind point (the
initialisation, or the weights after k steps of level 0), resets the optimizer and trains
again. Each level's data order comes from a generator seeded by (seed, level), and every
finished level is on disk, so a run stopped at any point resumes with exactly the results of
an uninterrupted run (on the CPU; GPU kernels may differ in the last bits).

``trials=K`` runs K seeds (``seed``, ``seed+1``, ...) side by side: the same levels, trained by
one batched step of the engine, each run in its own directory ``trial_<k>/``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from .data import load_data
from .engine import Engine, resolve_engine
from .estimate import Sizes, remaining_work
from .errors import ConfigError, Interrupted, QpruneError, RunDirectoryError
from .fallback import FailSafeTrainer
from .models import build_model, count_parameters, dense_real_parameters, parameter_counts
from .levels import LevelContext, Trial, copy_state
from .protocols import baseline_init, make_protocol, train_baselines
from .pruning import Masks, prunable_weights
from .provenance import now, session
from .reporting import ProgressObserver, RunClock, RunInfo, RunLogger, duration
from .settings import Settings, run_identity
from .store import RunDirectory, level_fix
from .training import EagerTrainer, LevelTraining

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


class _LevelObserver(ProgressObserver):
    """Progress, per-epoch logging, and a copy of the weights after ``rewind_step`` steps (level 0)."""

    def __init__(self, model: nn.Module, rewind_step: int, loggers: list[RunLogger], level_info: dict, **progress):
        super().__init__(**progress)
        self.model, self.rewind_step, self.state = model, rewind_step, None
        self.loggers, self.level_info = loggers, level_info

    def on_step(self, step: int) -> None:
        super().on_step(step)
        if step == self.rewind_step:
            self.state = copy_state(self.model.state_dict())

    def on_epoch_end(self, stats) -> None:
        super().on_epoch_end(stats)
        for logger in self.loggers:
            logger.epoch(self.level, stats, self.level_info)


def run_name(s: Settings) -> str:
    return f"{s.model}-{s.algebra.tag}-r{s.prune.rate:g}-s{s.seed}"


LoggerFactory = Callable[[int], list[RunLogger]]


class LevelRunner:
    def __init__(
        self, settings: Settings, run_dir: Path, config: dict, loggers: list[RunLogger] | LoggerFactory | None = None,
    ):
        """``loggers``: extra result destinations; with ``trials > 1`` a function of the run's index
        that returns fresh loggers for each run (a logger follows one run)."""
        self.s, self.config, self.run_dir = settings, config, Path(run_dir)
        if settings.trials > 1 and isinstance(loggers, (list, tuple)) and loggers:
            raise TypeError("with trials > 1 pass loggers as a function of the run's index: each run needs its own")
        make_loggers = loggers if callable(loggers) else (lambda _: list(loggers or []))
        if settings.trials == 1:
            self.trials = [Trial(0, settings, self.run_dir, config, make_loggers(0))]
        else:
            self.trials = [
                Trial(k, replace(settings, seed=settings.seed + k), self.run_dir / f"trial_{k}",
                      {**config, "seed": settings.seed + k}, make_loggers(k))
                for k in range(settings.trials)
            ]

    def run(self) -> list[dict]:
        """Train every level not on disk yet; the rows of levels.csv (of every run, with its seed, when trials > 1).

        The run directory is locked for the whole run: the same command started twice refuses at once.
        """
        directory = RunDirectory(self.run_dir)
        with directory.lock() as lock:
            self.read_only = lock.read_only  # a run on a read-only filesystem: it can be looked at, not trained
            if removed := directory.sweep_temporaries():
                log.info("removed %d temporary files that an interrupted write left in %s", removed, self.run_dir)
            return self._run()

    def _run(self) -> list[dict]:
        try:
            s = self._prepare()
            for t in self.trials:
                title = f"{s.model} / {s.algebra.tag} / {s.dataset.name} (seed {t.s.seed})"
                info = RunInfo(t.run_dir, run_name(t.s), title, t.config, self.counts, self.data.source, s.prune.levels + 1,
                               self.data_sizes, t.sessions)
                for logger in t.loggers:
                    logger.start(info, t.records)
        except KeyboardInterrupt:
            raise Interrupted("interrupted before training started") from None
        first = min(len(t.records) for t in self.trials)
        if first > s.prune.levels:
            log.info("all %d levels are finished already", s.prune.levels + 1)
        error, level = None, first
        try:
            for level in range(first, s.prune.levels + 1):
                self.clock.level_started()   # before the stopping rule: under carry it trains phase A's rounds
                if reason := self.protocol.stop_reason(level):
                    log.info("stopping before level %d: %s", level, reason)
                    break
                if self.read_only:
                    raise RunDirectoryError(f"{self.run_dir} cannot be written (a read-only filesystem) and level {level} "
                                            "is left to train: copy it to a writable folder and rerun with "
                                            "hydra.run.dir=<the copy> to resume it")
                self._train_level(level)
        except KeyboardInterrupt:
            error = Interrupted(f"interrupted during level {level}")
            raise error from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            for t in self.trials:
                self._end_session(t, first, error)
                for logger in t.loggers:
                    logger.finish(t.records, error)
        if len(self.trials) == 1:
            return [r["row"] for r in self.trials[0].records]
        return [{"seed": t.s.seed, **r["row"]} for t in self.trials for r in t.records]

    def _prepare(self) -> Settings:
        """Data, the runs' models, counts, initial/rewind weights (from disk when resuming), the trainer."""
        s = self.s
        device = resolve_device(s.device)
        self.data = data = load_data(s.dataset, s.data, s.algebra.adds_gray, device)
        log.info("data: %s (%d train, %s val, %d test) on %s", data.source, len(data.train),
                 len(data.val) if data.val is not None else 0, len(data.test), device)
        for t in self.trials:
            torch.manual_seed(t.s.seed)  # run k's initialisation is the single run's with seed + k
            t.model = build_model(s.model, s.algebra, data.num_classes, data.image_shape, **s.model_options).to(device)
        model = self.trials[0].model
        self.weights = prunable_weights(model, s.prune.prune_output)
        self.dense_real = dense_real_parameters(s.model, data.num_classes, data.image_shape, **s.model_options)
        self.counts = parameter_counts(model, [w.name for w in self.weights], self.dense_real)
        log.info("model %s/%s: %d parameters (%.1f%% of the dense real model), %d prunable", s.model, s.algebra.name,
                 self.counts["params_total"], 100 * self.counts["params_total"] / self.dense_real, self.counts["prunable_total"])
        self.rewind_step = parse_step_count(s.prune.rewind, s.train.steps_per_epoch(len(data.train)))
        self.data_sizes = {"train": len(data.train), "val": len(data.val) if data.val is not None else 0, "test": len(data.test)}
        for t in self.trials:
            self._read_finished_levels(t, device)
        if any(len(t.records) <= s.prune.levels for t in self.trials):  # finished: no checkpoint needed (nor read)
            for t in self.trials:
                self._load_checkpoints(t)
        self.trainer = self._trainer(resolve_engine(s.train.engine, device))
        self.clock = RunClock(self._planned_epochs())
        self.context = LevelContext(s, self.trials, self.weights, self.trainer, device, self.clock)
        self.protocol = make_protocol(self.context)
        return s

    def _planned_epochs(self) -> int:
        """The epochs of training the runs have left (per run; the ETA's plan)."""
        sizes = Sizes(**self.data_sizes)
        levels = min(len(t.records) for t in self.trials)
        rounds = min(t.store.finished_rounds() for t in self.trials)
        return remaining_work(self.s, sizes, levels, rounds).evaluations // self.s.trials

    def _read_finished_levels(self, t: Trial, device: torch.device) -> None:
        """Claim the run's directory, read and check its finished levels."""
        s = self.s
        threads = torch.get_num_threads()
        started = t.store.claim(run_identity(t.config), s.resume, {"threads": threads})
        t.sessions = [*t.store.sessions(), session(device)]
        if not self.read_only:
            t.store.save_sessions(t.sessions)
        t.records = t.store.finished_levels()
        t.store.verify_levels(t.records)
        for stale in t.store.discard_levels_from(len(t.records)):
            log.info("removed %s: a level before it is missing, so it is retrained", stale)
        if t.records:
            log.info("resuming %s after level %d", t.run_dir, len(t.records) - 1)
            if device.type == "cpu" and started.get("threads", threads) != threads:
                log.warning("%s was started with %d CPU threads and now runs with %d: CPU results are reproducible "
                            "only at one thread count, so the levels trained now may differ from an uninterrupted "
                            "run's (set OMP_NUM_THREADS=%d to match)", t.run_dir, started["threads"], threads,
                            started["threads"])

    def _load_checkpoints(self, t: Trial) -> None:
        """The run's initial weights (made and saved when it starts) and rewind point; checked against its model."""
        s = self.s
        t.init = t.store.load_checkpoint("init")
        if t.init is None:
            t.init = copy_state(t.model.state_dict())
            t.store.save_checkpoint("init", t.init)
        _check_state(t.init, t.model, t.store.path / "checkpoints" / "init.pt")
        t.rewind = t.init if self.rewind_step == 0 else t.store.load_checkpoint("rewind")
        if t.rewind is None and t.records:
            level_0 = t.store.level_dir(0)
            raise RunDirectoryError(f"{t.store.path / 'checkpoints' / 'rewind.pt'} is missing: prune.rewind={s.prune.rewind} "
                                    f"rewinds every level to it; {level_fix(level_0)}")
        if t.rewind is not None:
            _check_state(t.rewind, t.model, t.store.path / "checkpoints" / "rewind.pt")
        if "random_reinit" in s.baselines:
            torch.manual_seed(baseline_init(t.s.seed))
            t.reinit = build_model(s.model, s.algebra, self.data.num_classes, self.data.image_shape,
                                   **s.model_options).state_dict()

    def _trainer(self, engine: str) -> EagerTrainer | Engine | FailSafeTrainer:
        """The eager reference loop for one run on the CPU, else the engine (K runs per step, CUDA graphs);
        ``train.engine=auto`` on CUDA falls back to the eager choice if the graph step fails (fallback.py)."""
        models = [t.model for t in self.trials]

        def build(choice: str) -> EagerTrainer | Engine:
            if choice == "eager" and len(models) == 1:
                return EagerTrainer(models[0], self.data, self.s.train)
            return Engine(models, self.data, self.s.train, [w.name for w in self.weights], graph=choice == "graph")

        if engine == "eager" and len(models) == 1:
            return build(engine)
        log.info("training with the %s engine%s", engine, f", {len(models)} runs per step" if len(models) > 1 else "")
        if engine == "graph" and self.s.train.engine == "auto":
            return FailSafeTrainer(lambda: build("graph"), lambda: build("eager"), models)
        return build(engine)

    def _end_session(self, t: Trial, first: int, error: BaseException | None) -> None:
        """This session's end time, levels and outcome in run.json (and levels.json, written after this)."""
        if not t.sessions or self.read_only:
            return  # stopped before the run was claimed, or looked at where nothing can be written
        trained = [first, len(t.records) - 1] if len(t.records) > first else []
        t.sessions[-1].update(ended=now(), levels_trained=trained,
                              outcome="finished" if error is None else f"stopped: {type(error).__name__}")
        try:
            t.store.save_sessions(t.sessions)
        except (OSError, QpruneError) as exc:  # the run's own outcome matters more than its provenance
            log.warning("could not record the session's end in %s/run.json (%s)", t.run_dir, exc)

    def _train_level(self, level: int) -> None:
        """Prune, rewind and train every run at ``level``; each run's record is saved to its directory."""
        s, several = self.s, len(self.trials) > 1
        masks = self.protocol.level_masks(level)
        infos = [sparsity(m, t.model, self.dense_real) for m, t in zip(masks, self.trials)]
        observers = [
            _LevelObserver(t.model, self.rewind_step if level == 0 else -1, t.loggers, info, level=level,
                           levels=s.prune.levels, epochs=s.train.epochs, label=f"seed {t.s.seed}: " if several else "",
                           mode=s.progress if t.index == 0 or s.progress == "none" else "plain",
                           clock=self.context.clock_of(t))
            for t, info in zip(self.trials, infos)
        ]
        trainings = self.trainer.train_level(masks, self.context.generators(level), observers,
                                             self.protocol.level_optimizers(level))
        extra = self.protocol.level_trained(level, trainings)
        if s.baselines and level > 0:
            weights = [copy_state(t.model.state_dict()) for t in self.trials]
            for k, columns in train_baselines(self.context, level, masks, self.protocol).items():
                extra.setdefault(k, {}).update(columns)
            for t, w in zip(self.trials, weights):
                t.model.load_state_dict(w)
        took = duration(self.clock.level_done())
        eta = self.clock.eta()
        for t, mask, info, observer, training in zip(self.trials, masks, infos, observers, trainings):
            if len(t.records) > level:
                continue  # finished in an earlier session (a resumed run ahead of the others): keep that result
            if level == 0 and self.rewind_step > 0:
                if observer.state is None:
                    raise ConfigError(f"prune.rewind={s.prune.rewind} is past the end of level 0 ({training.steps} steps)")
                t.rewind = observer.state
                t.store.save_checkpoint("rewind", t.rewind)
            if training.diverged:
                mask.apply_(t.model)  # NaN gradients times a zero mask are NaN: pruned weights must read zero
                log.warning("%slevel %d diverged: the training loss was not finite at epoch %d; its row is marked "
                            "status=diverged and the run stops after this level (lower train.lr?)",
                            f"seed {t.s.seed}: " if several else "", level, len(training.epochs))
            record = {"row": {"level": level, **info, **training_columns(training), **extra.get(t.index, {})},
                      "epochs": [asdict(e) for e in training.epochs], "threads": torch.get_num_threads()}
            t.store.save_level(level, mask.state_dict(), t.model.state_dict(), record)
            if s.save_weights == "last" and level > 0:
                t.store.drop_weights(level - 1)
            t.records.append(record)
            for logger in t.loggers:
                logger.level(record, t.records)
            row = record["row"]
            log.info("%slevel %d: %.2f%% of prunable weights left, %.2f%% of the real model's parameters, "
                     "test accuracy %.2f%% (level took %s%s)", f"seed {t.s.seed}: " if several else "", level,
                     100 * row["prunable_remaining"], row["pct_of_real"], row["test_acc"], took, f"; {eta}" if eta else "")


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
    """The accuracy and cost columns of levels.csv; ``status``: ok, or diverged (a non-finite loss stopped it)."""
    loss = training.epochs[-1].train_loss
    return {
        "test_acc": round(training.test_acc, 2),
        "best_val_acc": None if training.best_val_acc is None else round(training.best_val_acc, 2),
        "train_loss": round(loss, 5) if math.isfinite(loss) else None,
        "epochs": len(training.epochs),
        "steps": training.steps,
        "train_seconds": round(training.seconds, 2),
        "engine": training.engine,
        "status": "diverged" if training.diverged else "ok",
    }


def _check_state(state: dict, model: nn.Module, path: Path) -> None:
    """A checkpoint must hold this model's tensors (a file from another run would fail later, less clearly)."""
    expected = model.state_dict()
    if set(state) != set(expected) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in expected.items()):
        raise RunDirectoryError(f"{path} does not hold this model's weights: pass resume=false to start over")
