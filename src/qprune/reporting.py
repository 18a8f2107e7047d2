"""What a person sees: the levels table (CSV/JSON), the accuracy-vs-sparsity and training plots, progress.

``pct_of_real`` — unpruned parameters as a percentage of the dense ``real3`` model's — is the
x-axis on which real and quaternion models are compared: a dense quaternion model already
sits at about 25%.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StorageError
from .files import atomic_write_bytes, atomic_write_text, strict_json
from .layer_density import density_table, layer_density, write_layer_density_csv
from .training import EpochStats, Observer

log = logging.getLogger("qprune")

LEVEL_COLUMNS = (
    "level", "prunable_remaining", "params_nonzero", "params_total", "pct_of_real",
    "test_acc", "best_val_acc", "train_loss", "epochs", "steps", "train_seconds",
    "mask_test_acc", "random_reinit_acc", "random_prune_acc",   # protocol=paper's phase A; baselines
    "status",                                                   # ok | diverged (a non-finite training loss)
)


def write_levels_csv(rows: Sequence[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LEVEL_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LEVEL_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def read_levels_csv(path: Path) -> list[dict[str, Any]]:
    def parse(value: str) -> Any:
        if value == "":
            return None
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return value  # status

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_levels_json(rows: Sequence[dict], config: dict, extra: dict, path: Path) -> None:
    atomic_write_text(path, strict_json({**extra, "config": config, "levels": list(rows)}, indent=2))


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """PNG through an atomic write (a half-written plot never replaces a good one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.1)  # captions below the axes included
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# other accuracies of a level drawn beside the ticket's: (line style, legend)
EXTRA_CURVES = {
    "mask_test_acc": ("-.", "phase A (mask rounds)"),
    "random_reinit_acc": ("--", "random reinit"),
    "random_prune_acc": (":", "random pruning"),
}


def _has_extra_curves(rows: Sequence[dict]) -> bool:
    return any(r.get(c) is not None for r in rows for c in EXTRA_CURVES)


def plot_accuracy_vs_sparsity(rows: Sequence[dict], path: Path, title: str) -> None:
    """Test accuracy against % of the real model's parameters (log x-axis, sparser to the right)."""
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=120)
    x = [r["pct_of_real"] for r in rows]
    y = [r["test_acc"] for r in rows]
    ax.plot(x, y, marker="o", label="ticket" if _has_extra_curves(rows) else None)
    for r in rows:
        ax.annotate(str(r["level"]), (r["pct_of_real"], r["test_acc"]), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    for column, (style, label) in EXTRA_CURVES.items():
        points = [(r["pct_of_real"], r[column]) for r in rows if r.get(column) is not None]
        if points:
            ax.plot(*zip(*points), linestyle=style, marker=".", label=label)
    if _has_extra_curves(rows):
        ax.legend(fontsize=8)
    percent_of_real_axis(ax, x)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_layer_density(rows: Sequence[dict], path: Path, title: str) -> None:
    """% of each layer's weights kept against the level (log y): one line per layer."""
    layers, table = density_table(rows)
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=120)
    levels = sorted(table)
    for layer in layers:
        points = [(level, table[level][layer]) for level in levels if layer in table[level]]
        ax.plot(*zip(*points), marker=".", label=layer)
    ax.set_yscale("log")
    ax.set_xlabel("level")
    ax.set_ylabel("% of the layer's weights kept")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def training_curves_figure(records: Sequence[dict], title: str):
    """Test accuracy against epoch, one curve per level (colour: level; legend: % of real parameters).

    Shows whether a level had converged: a curve still rising at its last epoch means the
    level's accuracy (the last epoch's) understates what the sparse network can do. The colours
    run from dark to a mid green, never to a pale yellow that vanishes on white.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    cmap = plt.get_cmap("viridis")
    last = max(1, len(records) - 1)
    most = max((len(r["epochs"]) for r in records), default=1)
    for record in records:
        row, epochs = record["row"], record["epochs"]
        ax.plot([e["epoch"] for e in epochs], [e["test_acc"] for e in epochs], marker="o" if len(epochs) < 8 else None,
                markersize=3, color=cmap(0.7 * row["level"] / last), label=f"{row['level']}: {row['pct_of_real']:.3g}%")
    if most <= 12:  # every epoch a tick, and room around a lone one
        ax.set_xticks(range(1, most + 1))
        ax.set_xlim(0.5, most + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="level: % of real", fontsize=6, title_fontsize=7, ncol=1 + len(records) // 11, loc="lower right")
    fig.tight_layout()
    return fig


def plot_training_curves(records: Sequence[dict], path: Path, title: str) -> None:
    save_figure(training_curves_figure(records, title), path)


@dataclass
class RunInfo:
    """What loggers know about a run when it starts."""

    run_dir: Path
    name: str            # readable: model-algebra-rate-seed
    title: str           # for plots
    config: dict         # the resolved config
    counts: dict         # models.parameter_counts: params by role, params_dense_real, pct_of_real
    data_source: str
    levels: int | None = None   # how many levels the run is to have (None: not known)
    data_sizes: dict = field(default_factory=dict)   # images per split: train, val, test
    sessions: list = field(default_factory=list)     # provenance of each session (qprune.provenance), the last is this one


class RunLogger:
    """A destination for a run's results. The runner calls these hooks; all are optional.

    ``level_info`` carries the level's ``prunable_remaining`` and ``pct_of_real`` (known before
    training), ``record`` is what ``levels/level_NN/result.json`` holds: ``row`` and ``epochs``.
    ``finish`` is always called, with the exception when the run failed.
    """

    def start(self, info: RunInfo, finished: list[dict]) -> None: ...
    def epoch(self, level: int, stats: EpochStats, level_info: dict) -> None: ...
    def level(self, record: dict, records: list[dict]) -> None: ...
    def finish(self, records: list[dict], error: BaseException | None) -> None: ...


class LocalFiles(RunLogger):
    """levels.csv, levels.json, accuracy_vs_sparsity.png, training_curves.png and the layers' share
    kept (layer_density.csv/.png) in the run directory, after every level."""

    def start(self, info: RunInfo, finished: list[dict]) -> None:
        self.info, self.trained = info, False

    def level(self, record: dict, records: list[dict]) -> None:
        self.trained = True
        self.write(records)

    def finish(self, records: list[dict], error: BaseException | None) -> None:
        if not records:
            return
        try:
            self.write(records)
        except StorageError as exc:
            if self.trained:
                raise
            # nothing new: a finished run looked at where it cannot be written (a read-only filesystem)
            log.info("the run's tables and figures are left as they are (%s)", exc)

    def write(self, records: list[dict]) -> None:
        info, rows = self.info, [r["row"] for r in records]
        write_levels_csv(rows, info.run_dir / "levels.csv")
        extra = {"data_source": info.data_source, "data_sizes": info.data_sizes, **info.counts,
                 "sessions": info.sessions, "epochs": {r["row"]["level"]: r["epochs"] for r in records}}
        write_levels_json(rows, info.config, extra, info.run_dir / "levels.json")
        plot_accuracy_vs_sparsity(rows, info.run_dir / "accuracy_vs_sparsity.png", info.title)
        plot_training_curves(records, info.run_dir / "training_curves.png", info.title)
        if density := layer_density(info.run_dir):
            write_layer_density_csv(density, info.run_dir / "layer_density.csv")
            plot_layer_density(density, info.run_dir / "layer_density.png", info.title)


def percent_of_real_axis(ax, values: Sequence[float]) -> None:
    """Log x-axis of % of the real model's parameters, dense on the left.

    Labelled ticks at 1, 2 and 5 of every decade (so values below 10% are read off as easily as
    those above), unlabelled ones at the other integers; a range narrower than that gets the
    data's own values as labels.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = min(values), max(values)
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0**e for e in decades for m in (1, 2, 5) if lo / 1.1 <= m * 10.0**e <= hi * 1.1]
    if len(ticks) < 3:  # a narrow range: label the data's own values instead
        ticks = sorted({float(f"{v:.3g}") for v in values})[:: max(1, len(values) // 6)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(3, 4, 6, 7, 8, 9)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(hi * 1.15, lo / 1.15)
    ax.set_xlabel("% of the dense real model's parameters (log scale)")


def duration(seconds: float) -> str:
    """A readable duration: 42 s, 7.5 min, 3.2 h, 2.1 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class RunClock:
    """The run's pace in this session, for an ETA: the epochs of training still planned x the time an
    epoch has taken so far.

    Counting epochs rather than levels keeps the ETA right when trainings differ from level to level:
    ``protocol=paper`` trains a phase-A round beside each level (with ``carry``, all the rounds inside
    level 1), baselines add trainings. The time of an epoch is this session's wall time since the clock
    started divided by the epochs done, so evaluation, pruning and saving are included. The plan is an
    upper bound: a stopping rule or a diverged level ends a run sooner.
    """

    def __init__(self, planned_epochs: int):
        self.planned_epochs = planned_epochs
        self.epochs_done = 0
        self._start: float | None = None   # the first level's start: loggers' and W&B's start-up left out
        self._level_start = time.perf_counter()

    def level_started(self) -> None:
        self._level_start = time.perf_counter()
        if self._start is None:
            self._start = self._level_start

    def epoch_done(self) -> None:
        self.epochs_done += 1

    def level_done(self) -> float:
        """Seconds since the level started."""
        return time.perf_counter() - self._level_start

    def seconds_left(self) -> float | None:
        """Time until the planned epochs are done (None: no epoch measured yet)."""
        if not self.epochs_done or self._start is None:
            return None
        per_epoch = (time.perf_counter() - self._start) / self.epochs_done
        return max(self.planned_epochs - self.epochs_done, 0) * per_epoch

    def eta(self) -> str:
        """'run ETA 1.2 h (about 16:40)', or '' when nothing is left or nothing is measured yet."""
        seconds = self.seconds_left()
        if not seconds or seconds <= 0:
            return ""
        if seconds < 600:
            return f"run ETA {duration(seconds)}"
        at = time.strftime("%H:%M" if seconds < 86400 else "%a %H:%M", time.localtime(time.time() + seconds))
        return f"run ETA {duration(seconds)} (about {at})"


class ProgressObserver(Observer):
    """Progress bars on a terminal, a plain line per epoch otherwise (logs, CI, cluster jobs).

    Each epoch's line shows its training and evaluation time apart (evaluating a large test set can
    take longer than a small training epoch) and, with a ``clock``, the whole run's ETA.
    """

    def __init__(self, level: int, levels: int, epochs: int, mode: str = "auto", label: str = "",
                 clock: RunClock | None = None):
        self.level, self.levels, self.epochs, self.label, self.clock = level, levels, epochs, label, clock
        self.bars = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.quiet = mode == "none"
        self._bar = None
        self._epoch_start = time.perf_counter()
        self._train_seconds = 0.0   # EpochStats.seconds of the previous epoch (it counts from the level's start)

    def on_epoch_start(self, epoch: int, steps: int) -> None:
        self._epoch_start = time.perf_counter()
        if self.bars:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=steps, desc=f"{self.label}level {self.level}/{self.levels} epoch {epoch}/{self.epochs}", leave=False, unit="step")

    def on_step(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update()

    def on_epoch_end(self, stats: EpochStats) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        wall = time.perf_counter() - self._epoch_start
        train = stats.seconds - self._train_seconds if stats.seconds >= self._train_seconds else stats.seconds
        self._train_seconds = stats.seconds
        eta = ""
        if self.clock is not None:
            self.clock.epoch_done()
            eta = self.clock.eta()
        if self.quiet:
            return
        val = "" if stats.val_acc is None else f" val {stats.val_acc:.2f}%"
        log.info(
            "%slevel %d/%d epoch %d/%d: loss %.4f test %.2f%%%s (train %.1fs, eval %.1fs%s)",
            self.label, self.level, self.levels, stats.epoch, self.epochs, stats.train_loss, stats.test_acc, val,
            train, max(wall - train, 0.0), f"; {eta}" if eta else "",
        )
